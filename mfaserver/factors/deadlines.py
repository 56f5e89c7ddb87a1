"""One reactor timer for many deadlines (issue #12).

A node may hold tens of thousands of RADIUS requests waiting for a push and
a thousand devices' long polls. A timer each would cost memory and, on the
asyncio reactor, throughput; `Deadlines` keeps them in a heap and arms one
timer, for the earliest deadline of an item still waited on. Items that
ended early stay in the heap until they reach its top, where ``live(item)``
says they are gone and they are dropped without a timer.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")


class Deadlines(Generic[T]):
    """Calls ``expire(item)`` at each item's deadline, if ``live(item)`` still holds."""

    def __init__(self, clock: IReactorTime, *, live: Callable[[T], bool],
                 expire: Callable[[T], None]):
        self._clock = clock
        self._live = live
        self._expire = expire
        # (deadline, sequence, item), earliest first; the sequence keeps items uncompared.
        self._heap: list[tuple[float, int, T]] = []
        self._sequence = itertools.count()
        self._timer = None

    def add(self, deadline: float, item: T) -> None:
        heapq.heappush(self._heap, (deadline, next(self._sequence), item))
        self.arm()

    def arm(self) -> None:
        """Set the timer for the earliest live item (none: no timer). Call it when an
        item stopped being live, so that a timer for it alone goes."""
        while self._heap and not self._live(self._heap[0][2]):
            heapq.heappop(self._heap)
        timer = self._timer
        if self._heap:
            deadline = self._heap[0][0]
            if timer is not None and timer.active() and timer.getTime() == deadline:
                return
        if timer is not None and timer.active():
            timer.cancel()
        self._timer = None
        if self._heap:
            delay = max(0.0, self._heap[0][0] - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._reached)

    def clear(self) -> None:
        """Forget every item, and the timer."""
        self._heap.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _reached(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        while self._heap and self._heap[0][0] <= now:
            _, _, item = heapq.heappop(self._heap)
            if self._live(item):
                self._expire(item)
        self.arm()
