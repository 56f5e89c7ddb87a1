"""What the web features take from the running daemon: one object, built by service.py.

The web authenticator (`mfaserver.web.app`) and the self-service portal
(`mfaserver.web.portal`) are handed a `WebContext` rather than a list of
arguments: they reach the store, the core and the push registry through it,
and read settings that a reload may change through its functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mfaserver.auth.pipeline import Authenticator
from mfaserver.factors.push import PushTransactions
from mfaserver.store.threaded import ThreadedStore


@dataclass
class WebContext:
    """The running daemon as the web features see it.

    ``store``: the store on its database thread (its ``run(f, *args)`` runs
    any `Store` method there). ``authenticator``: the core; the portal signs
    users in through ``authenticate`` with client name "portal", as a NAS
    would, so lockout, audit and factors are the same as for RADIUS.
    ``hash_password(text)`` fires with an scrypt hash, computed off the
    reactor. ``public_url``: how browsers reach this server ([web]
    public_url). ``vapid_public_key()``: the Web Push application server key
    (base64url, uncompressed P-256 point) when ``[push] notify = "webpush"``,
    else None. ``portal_settings()``: the [portal] settings now (None: no
    portal). ``enrollment_minutes()``: how long a device enrollment link lasts.
    """

    clock: IReactorTime
    store: ThreadedStore
    authenticator: Authenticator
    push: PushTransactions
    hash_password: Callable[[str], Deferred[str]]
    public_url: str
    vapid_public_key: Callable[[], str | None]
    portal_settings: Callable[[], object | None]
    enrollment_minutes: Callable[[], float]
