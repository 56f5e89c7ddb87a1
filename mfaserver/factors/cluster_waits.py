"""What a cluster node holds in memory for an approval any node may end (issue #12).

A push or a phone call of a cluster is a row (`mfaserver.store.cluster`);
the RADIUS requests this node holds for it are Deferreds here. `RowWaits`
keeps them by row id with the row's deadline: they are settled when a
notification or the poll says the row ended, or fail with
`defer.TimeoutError` at the deadline (one timer for all of them).
Cancelling a waiter only detaches it: the row lives on for the other nodes.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

# How long a notification of an ended row is kept for a waiter that was not
# yet in place when it arrived (a joined approval answered at that moment).
RECENT_ENDS_SECONDS = 10.0
MAX_RECENT_ENDS = 10_000


class RowWaits:
    """Deferreds waiting for rows to end, by row id."""

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._waiters: dict[str, list[Deferred]] = {}
        # (deadline, sequence, id) of the rows waited on; one timer for the earliest.
        self._deadlines: list[tuple[float, int, str]] = []
        self._expires: dict[str, float] = {}
        self._sequence = itertools.count()
        self._timer = None
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
            heapq.heappush(self._deadlines, (expires, next(self._sequence), key))
            self._arm()
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
        self._deadlines.clear()
        self._expires.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
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

    def _arm(self) -> None:
        while self._deadlines and self._deadlines[0][2] not in self._expires:
            heapq.heappop(self._deadlines)
        timer = self._timer
        if self._deadlines:
            deadline = self._deadlines[0][0]
            if timer is not None and timer.active() and timer.getTime() == deadline:
                return
        if timer is not None and timer.active():
            timer.cancel()
        self._timer = None
        if self._deadlines:
            delay = max(0.0, self._deadlines[0][0] - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._expired)

    def _expired(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, key = heapq.heappop(self._deadlines)
            if self._expires.get(key) is not None:
                del self._expires[key]
                for waiter in self._waiters.pop(key, []):
                    waiter.errback(defer.TimeoutError(key))
        self._arm()
