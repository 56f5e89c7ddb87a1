"""First factors: the `Directory` implementations that check a username and password.

`local` (the store's own users), `ldap` (LDAP and Active Directory), `radius`
(an upstream RADIUS server) and `chain` (several, tried in order); `settings`
holds what [directory] configures, `sync` imports users from LDAP.
"""
