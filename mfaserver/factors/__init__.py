"""The second factors, each behind one of the core's factor Protocols.

`METHODS` is the one list of them: the core derives the method keywords
(``password,push``) and the challenge menu from it, the config the choices of
``[mfa] default_method``, the CLI those of ``user set-default``. Its order is
the order in which a default the user cannot use falls back.

Adding a factor: a module here with its `Method` and its factor class (see
`mfaserver.auth.interfaces`), its entry below, and the line in
`mfaserver.service` that builds it from the config.
"""

from mfaserver.factors.push import PUSH
from mfaserver.factors.sms import SMS
from mfaserver.factors.token import TOTP
from mfaserver.factors.voice import PHONE

METHODS = (PUSH, TOTP, SMS, PHONE)
METHOD_NAMES = tuple(method.name for method in METHODS)
