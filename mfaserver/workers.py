"""A small fixed set of worker threads for blocking calls (SQLite, password hashing).

Twisted's ThreadPool does the same job with more machinery per call (context
copying, its worker team); on the login path every call crosses threads
several times, so this lean version matters: a call is one queue put, one
queue get and one ``callFromThread``. Results are delivered on the reactor
thread, so Deferreds never fire anywhere else.
"""

from __future__ import annotations

import queue
import threading

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_STOP = object()


class WorkerThreads:
    """``count`` threads taking calls from one queue. ``run`` fires with the result."""

    def __init__(self, reactor, count: int, name: str):
        self._reactor = reactor
        self._count = count
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self._count):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Let queued calls finish, then end the threads (blocks until they have)."""
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def run(self, f, *args, **kwargs) -> Deferred:
        """Run ``f(*args, **kwargs)`` on a worker; fire with its result or failure.

        Cancelling the Deferred (e.g. by its timeout) before a worker took the
        call drops the call: a backlog behind a hung server drains at once.
        """
        cancelled = []
        d = Deferred(lambda _: cancelled.append(True))
        self._queue.put((d, cancelled, f, args, kwargs))
        return d

    def _work(self) -> None:
        call_from_thread = self._reactor.callFromThread
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            d, cancelled, f, args, kwargs = item
            if cancelled:
                continue
            try:
                result = f(*args, **kwargs)
            except BaseException:
                call_from_thread(_fire, d, Failure())
            else:
                call_from_thread(_fire, d, result)


def _fire(d: Deferred, result) -> None:
    """Deliver a worker's result, unless the Deferred was cancelled meanwhile."""
    if not d.called:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)
