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
        """Run ``f(*args, **kwargs)`` on a worker; fire with its result or failure."""
        d = Deferred()
        self._queue.put((d, f, args, kwargs))
        return d

    def _work(self) -> None:
        call_from_thread = self._reactor.callFromThread
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            d, f, args, kwargs = item
            try:
                result = f(*args, **kwargs)
            except BaseException:
                call_from_thread(d.errback, Failure())
            else:
                call_from_thread(d.callback, result)
