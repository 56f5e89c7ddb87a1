"""The core: decides logins, does no I/O.

`model` holds the frozen values passed in and out, `interfaces` the seams
(directory, store, second factors) as Protocols, `pipeline` the
`Authenticator`, `challenges` the Access-Challenge States and `approvals` the
out-of-band logins in flight. Nothing here imports the edges or adapters
(checked by lint-imports, see pyproject.toml).
"""
