"""Several directories tried in order ([directory] backend = ["ldap", "local"])."""

from __future__ import annotations

from typing import Sequence

from twisted.internet.defer import Deferred

from mfaserver.auth.interfaces import Directory, UnknownUser
from mfaserver.auth.model import Principal


class DirectoryChain:
    """`Directory` that asks each directory in turn.

    Only `UnknownUser` moves on to the next one. A wrong password and an
    unreachable directory end the login: falling through to another
    directory then would let a same-named user elsewhere stand in (and an
    outage must fail closed).
    """

    def __init__(self, directories: Sequence[Directory]):
        self.directories = tuple(directories)

    def authenticate(self, username: str, password: str) -> Deferred[Principal]:
        return Deferred.fromCoroutine(self._authenticate(username, password))

    async def _authenticate(self, username: str, password: str) -> Principal:
        for directory in self.directories:
            try:
                return await directory.authenticate(username, password)
            except UnknownUser:
                continue
        raise UnknownUser()
