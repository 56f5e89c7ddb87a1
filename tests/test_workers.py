"""WorkerThreads: calls run on worker threads, results come back through callFromThread."""

import threading

from twisted.trial.unittest import SynchronousTestCase

from mfaserver.workers import WorkerThreads


class RecordingReactor:
    """Collects callFromThread calls; the test runs them on its own thread, like a reactor."""

    def __init__(self):
        self.calls = []
        self._lock = threading.Lock()

    def callFromThread(self, f, *args):
        with self._lock:
            self.calls.append((f, args))

    def run_pending(self):
        with self._lock:
            calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class WorkerThreadsTests(SynchronousTestCase):
    def test_result_and_failure_are_delivered_on_the_reactor_thread(self):
        reactor = RecordingReactor()
        workers = WorkerThreads(reactor, 2, "test")
        workers.start()
        threads = []
        ok = workers.run(lambda x: threads.append(threading.current_thread()) or x * 2, 21)
        bad = workers.run(lambda: 1 / 0)
        workers.stop()  # joins: every queued call has run
        self.assertNoResult(ok)
        reactor.run_pending()
        self.assertEqual(self.successResultOf(ok), 42)
        self.failureResultOf(bad, ZeroDivisionError)
        self.assertIsNot(threads[0], threading.current_thread())

    def test_stop_lets_queued_calls_finish(self):
        reactor = RecordingReactor()
        workers = WorkerThreads(reactor, 1, "test")
        workers.start()
        results = [workers.run(lambda i=i: i) for i in range(100)]
        workers.stop()
        reactor.run_pending()
        self.assertEqual([self.successResultOf(d) for d in results], list(range(100)))

    def test_a_call_cancelled_before_a_worker_takes_it_is_dropped(self):
        from twisted.internet import defer
        reactor = RecordingReactor()
        workers = WorkerThreads(reactor, 1, "test")
        ran = []
        d = workers.run(ran.append, "x")
        d.cancel()
        workers.start()
        workers.stop()
        reactor.run_pending()
        self.assertEqual(ran, [])
        self.failureResultOf(d, defer.CancelledError)

    def test_a_result_for_a_call_cancelled_while_running_is_ignored(self):
        from twisted.internet import defer
        reactor = RecordingReactor()
        workers = WorkerThreads(reactor, 1, "test")
        workers.start()
        d = workers.run(lambda: 42)
        workers.stop()
        d.cancel()
        reactor.run_pending()
        self.failureResultOf(d, defer.CancelledError)
