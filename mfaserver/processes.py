"""Several worker processes on one host, sharing the ports (issue #12, ``[server] workers``).

A CPython process uses one core for its Python code. With ``workers = N``
(PostgreSQL only) ``mfaserver run`` serves as worker 0 and starts N - 1
copies of itself (``run --worker K``); every worker is a cluster node
(`mfaserver.store.cluster`), named ``node_name`` (worker 0) and
``node_name-K``. They bind the same RADIUS and HTTP ports with
``SO_REUSEPORT``: the kernel spreads new senders over them and sends every
datagram of one NAS socket (the same 4-tuple) to the same worker, so a
retransmission meets its first copy; anything else (a retry from another
port, a device's answer) is shared through the database.

`Supervisor` restarts a worker that dies, forwards SIGHUP (reload), and
stops the workers when the daemon stops. A worker asks the kernel for
SIGTERM when its supervisor dies (``PR_SET_PDEATHSIG``), so none is left
behind by a ``kill -9`` of the supervisor.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.logger import Logger

log = Logger(namespace="mfaserver.workers")

RESTART_MIN = 1.0
RESTART_MAX = 30.0
STOP_GRACE_SECONDS = 15.0
PR_SET_PDEATHSIG = 1
# The supervisor's pid, in each worker's environment.
SUPERVISOR_PID = "MFASERVER_SUPERVISOR_PID"


def _bound_socket(kind: int, interface: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _SharedPort(service.Service):
    _port = None

    def stopService(self):
        super().stopService()
        port, self._port = self._port, None
        if port is not None:
            return port.stopListening()
        return None


class SharedUdpPort(_SharedPort):
    """A UDP listener other workers bind too (``SO_REUSEPORT``)."""

    def __init__(self, port: int, proto, *, interface: str, reactor,
                 max_packet_size: int = 8192):
        self._args = (port, interface)
        self._protocol = proto
        self._reactor = reactor
        self._max_packet_size = max_packet_size

    def startService(self) -> None:
        port, interface = self._args
        sock = _bound_socket(socket.SOCK_DGRAM, interface, port)
        try:
            self._port = self._reactor.adoptDatagramPort(
                sock.fileno(), sock.family, self._protocol, self._max_packet_size)
        finally:
            sock.close()    # the reactor holds its own duplicate
        super().startService()


class SharedTcpPort(_SharedPort):
    """A TCP listener other workers bind too; ``factory`` may be TLS-wrapped."""

    def __init__(self, port: int, factory, *, interface: str, reactor, backlog: int = 128):
        self._args = (port, interface, backlog)
        self._factory = factory
        self._reactor = reactor

    def startService(self) -> None:
        port, interface, backlog = self._args
        sock = _bound_socket(socket.SOCK_STREAM, interface, port)
        try:
            sock.listen(backlog)
            self._port = self._reactor.adoptStreamPort(sock.fileno(), sock.family,
                                                       self._factory)
        finally:
            sock.close()
        super().startService()


def worker_name(node_name: str, worker: int) -> str:
    """The cluster node name of worker ``worker``."""
    return node_name if worker == 0 else f"{node_name}-{worker}"


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux); exit at once if
    it is gone already (it may have died before the request took effect)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if str(os.getppid()) != os.environ.get(SUPERVISOR_PID):
        os._exit(0)


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", number: int):
        self.supervisor = supervisor
        self.number = number
        self.ended = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason)


class Supervisor(service.Service):
    """Starts workers 1 .. count-1 as ``mfaserver run --worker K`` and keeps them running."""

    def __init__(self, reactor, count: int, *, config_path: Path, log_format: str | None,
                 executable: str = sys.executable):
        self._reactor = reactor
        self._count = count
        self._argv = [executable, "-m", "mfaserver.cli.main", "--config", str(config_path),
                      "run"]
        if log_format is not None:
            self._argv += ["--log-format", log_format]
        self._workers: dict[int, tuple[_Worker, object]] = {}
        self._pause: dict[int, float] = {}
        self._restarts: dict[int, object] = {}

    def startService(self) -> None:
        super().startService()
        for number in range(1, self._count):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        worker = _Worker(self, number)
        # The worker writes its log lines to the same stdout and stderr.
        transport = self._reactor.spawnProcess(
            worker, self._argv[0], [*self._argv, "--worker", str(number)],
            env={**os.environ, SUPERVISOR_PID: str(os.getpid())},
            childFDs={0: "w", 1: 1, 2: 2})
        self._workers[number] = (worker, transport)
        log.info("worker {number} started (pid {pid})", number=number, pid=transport.pid)

    def _ended(self, worker: _Worker, reason) -> None:
        current = self._workers.get(worker.number)
        if current is None or current[0] is not worker:
            return
        del self._workers[worker.number]
        if not self.running:
            return
        pause = self._pause.get(worker.number, RESTART_MIN)
        self._pause[worker.number] = min(RESTART_MAX, pause * 2)
        status = ("exited" if reason.check(ProcessDone)
                  else f"ended: {reason.getErrorMessage()}")
        log.error("worker {number} {status}; starting it again in {pause:.0f} s",
                  number=worker.number, status=status, pause=pause)
        self._restarts[worker.number] = self._reactor.callLater(pause, self._spawn,
                                                                worker.number)

    def reload(self) -> None:
        """SIGHUP to every worker: each reloads the config file itself."""
        self._signal("HUP")

    def _signal(self, name: str) -> None:
        for _, transport in list(self._workers.values()):
            try:
                transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def stopService(self):
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        if not self._workers:
            return None
        ended = [worker.ended for worker, _ in self._workers.values()]
        self._signal("TERM")
        kill = self._reactor.callLater(STOP_GRACE_SECONDS, self._signal, "KILL")
        done = defer.DeferredList(ended)
        done.addCallback(lambda _: kill.active() and kill.cancel())
        return done
