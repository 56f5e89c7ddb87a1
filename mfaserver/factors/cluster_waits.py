"""What a cluster node holds in memory for an approval any node may end (issue #12).

A push or a phone call of a cluster is a row (`mfaserver.store.cluster`);
the RADIUS requests this node holds for it are Deferreds here. `RowWaits`
keeps them by row id with the row's deadline: they are settled when a
notification or the poll says the row ended, or fail with
`defer.TimeoutError` at the deadline (one timer for all of them).
Cancelling a waiter only detaches it: the row lives on for the other nodes.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mfaserver.factors.deadlines import Deadlines

# How long a notification of an ended row is kept for a waiter that was not
# yet in place when it arrived (a joined approval answered at that moment).
RECENT_ENDS_SECONDS = 10.0
MAX_RECENT_ENDS = 10_000


class RowWaits:
    """Deferreds waiting for rows to end, by row id."""

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._waiters: dict[str, list[Deferred]] = {}
        self._expires: dict[str, float] = {}   # the rows waited on, with their deadlines
        self._deadlines = Deadlines(clock, live=self._expires.__contains__,
                                    expire=self._expired)
        self._recent_ends: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._waiters)

    def __contains__(self, key: str) -> bool:
        return key in self._waiters

    def keys(self) -> list[str]:
        return list(self._waiters)

    def add(self, key: str, expires: float) -> Deferred:
        """A waiter for row ``key``: fires when `settle` is called for it, fails with
        `defer.TimeoutError` at ``expires``."""
        waiter = Deferred(lambda d: self._leave(key, d))
        self._waiters.setdefault(key, []).append(waiter)
        if key not in self._expires:
            self._expires[key] = expires
            self._deadlines.add(expires, key)
        return waiter

    def settle(self, key: str, outcome: Callable[[], Deferred]) -> None:
        """The row ended: every waiter gets ``outcome()`` (a fired Deferred each)."""
        waiters = self._waiters.pop(key, [])
        self._expires.pop(key, None)
        for waiter in waiters:
            outcome().chainDeferred(waiter)

    def note_end(self, key: str) -> None:
        """A notification said ``key`` ended, and nobody waits here for it (yet)."""
        if len(self._recent_ends) < MAX_RECENT_ENDS:
            self._recent_ends[key] = self._clock.seconds() + RECENT_ENDS_SECONDS

    def ended_recently(self, key: str) -> bool:
        """Whether a notification said ``key`` ended (read once)."""
        return self._recent_ends.pop(key, None) is not None

    def forget_old_ends(self) -> None:
        now = self._clock.seconds()
        for key, until in list(self._recent_ends.items()):
            if until <= now:
                del self._recent_ends[key]

    def close_all(self, error: Callable[[str], Exception]) -> None:
        """This node stops: every waiter fails with ``error(key)``."""
        waiters, self._waiters = self._waiters, {}
        self._expires.clear()
        self._deadlines.clear()
        for key, ds in waiters.items():
            for d in ds:
                d.errback(error(key))

    def _leave(self, key: str, waiter: Deferred) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[key]
                self._expires.pop(key, None)

    def _expired(self, key: str) -> None:
        del self._expires[key]
        for waiter in self._waiters.pop(key, []):
            waiter.errback(defer.TimeoutError(key))
