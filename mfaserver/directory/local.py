"""The local directory: users and scrypt password hashes kept in the SQLite store.

Hash checks are CPU-bound by design, so they run in a bounded thread pool,
never on the reactor thread. An unknown user costs the same hash check as a
known one (against a dummy hash), so timing does not tell them apart.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred

from mfaserver import passwords
from mfaserver.auth.interfaces import InvalidCredentials, UnknownUser
from mfaserver.auth.model import Principal


class LocalDirectory:
    """`Directory` over the store's users table.

    ``lookup(name)`` fires with ``(password_hash, phone)`` or None (the store,
    run on its own thread); ``run_hash(f, *args)`` runs ``f`` in the hashing
    pool and fires with its result.
    """

    def __init__(self, lookup: Callable[[str], Deferred], run_hash: Callable[..., Deferred]):
        self._lookup = lookup
        self._run_hash = run_hash

    def authenticate(self, username: str, password: str) -> Deferred[Principal]:
        return Deferred.fromCoroutine(self._authenticate(username, password))

    async def _authenticate(self, username: str, password: str) -> Principal:
        if not password:
            raise InvalidCredentials()
        row = await self._lookup(username)
        encoded = row[0] if row is not None and row[0] else passwords.dummy_hash()
        matches = await self._run_hash(passwords.verify_password, password, encoded)
        if row is None or not row[0]:
            raise UnknownUser()
        if not matches:
            raise InvalidCredentials()
        return Principal(username=username, phone=row[1])
