"""An open-loop RADIUS load generator: Access-Requests at a fixed rate, latency per request.

radclient keeps N requests in flight (closed loop), so a slow server slows the
load down and hides its queueing delay; ``radclient -n`` paces only roughly.
`open_loop` sends request i at ``start + i / rate`` whatever the answers, from
several UDP sockets on 127.0.0.1 (8-bit Identifiers per socket, so at most
``256 x sockets`` requests can be outstanding), builds each packet at its send
time with `mfaserver.testing.access_request` (User-Password hidden,
Message-Authenticator first), and matches replies by socket (source port) and
Identifier, checked with the Response Authenticator. The latency of a request
is reply arrival minus its send time, both read from ``time.perf_counter``.
"""

from __future__ import annotations

import hashlib
import hmac
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from mfaserver.radius import codec
from mfaserver.testing import access_request


@dataclass
class OpenLoopResult:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    other: int = 0          # Access-Challenge or anything unexpected
    lost: int = 0           # no valid reply within the timeout
    bad_replies: int = 0    # wrong Response Authenticator or unknown Identifier
    late_sends: int = 0     # requests sent more than 5 ms after their slot
    duration: float = 0.0   # first send to last send
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the latencies, in seconds (nan if none)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), -(-int(p * len(ordered)) // 100)))
        return ordered[rank - 1]


def open_loop(host: str, port: int, secret: bytes, names: list[str],
              password_for: Callable[[str, float], str], *, rate: float, sockets: int = 8,
              timeout: float = 5.0) -> OpenLoopResult:
    """Send one Access-Request per name at ``rate``/s; wait up to ``timeout`` for replies.

    ``password_for(name, unix_time)`` gives the User-Password at send time.
    Bounded: ``len(names)`` sends, and at most ``len(names) / rate + timeout``
    seconds (plus scheduling slack).
    """
    result = OpenLoopResult()
    socks: list[socket.socket] = []
    try:
        _open_sockets(socks, host, [port], sockets)
        by_fd = {s.fileno(): n for n, s in enumerate(socks)}
        # (socket number, identifier) -> (request authenticator, send time)
        pending: dict[tuple[int, int], tuple[bytes, float]] = {}
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLIN)
        interval = 1.0 / rate
        start = time.perf_counter() + 0.01
        hard_stop = start + len(names) * interval + timeout + 5.0
        i = 0
        last_send = start

        def receive(now: float) -> None:
            for fd, _ in poller.poll(0):
                n = by_fd[fd]
                for _ in range(256):  # bounded drain
                    try:
                        data = socks[n].recv(4096)
                    except BlockingIOError:
                        break
                    arrived = time.perf_counter()
                    if len(data) < 20:
                        result.bad_replies += 1
                        continue
                    entry = pending.get((n, data[1]))
                    if entry is None or not _reply_matches(data, entry[0], secret):
                        result.bad_replies += 1
                        continue
                    del pending[(n, data[1])]
                    result.latencies.append(arrived - entry[1])
                    _count(result, data[0])

        while time.perf_counter() < hard_stop:
            now = time.perf_counter()
            while i < len(names) and now >= start + i * interval:
                n, identifier = i % sockets, (i // sockets) % 256
                if (n, identifier) in pending:  # unanswered for 256 x sockets sends: lost
                    del pending[(n, identifier)]
                    result.lost += 1
                if now - (start + i * interval) > 0.005:
                    result.late_sends += 1
                packet, authenticator = access_request(
                    secret, names[i], password_for(names[i], time.time()),
                    identifier=identifier)
                sent_at = time.perf_counter()
                socks[n].send(packet)
                pending[(n, identifier)] = (authenticator, sent_at)
                last_send = sent_at
                i += 1
                result.sent += 1
                now = time.perf_counter()
            receive(now)
            if i >= len(names):
                if not pending or now > last_send + timeout:
                    break
                wait = 0.01
            else:
                wait = max(0.0, start + i * interval - time.perf_counter())
            poller.poll(int(wait * 1000))
        result.lost += len(pending)
        result.duration = last_send - start
    finally:
        for s in socks:
            s.close()
    return result


def _open_sockets(socks: list, host: str, ports: list[int], count: int) -> None:
    """Append ``count`` non-blocking UDP sockets to ``socks``, socket k connected to
    ``ports[k % len(ports)]`` (appended one by one, so the caller closes what opened)."""
    for k in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((host, 0))
        s.connect((host, ports[k % len(ports)]))
        s.setblocking(False)


def _count(result, code: int) -> None:
    if code == codec.ACCESS_ACCEPT:
        result.accepted += 1
    elif code == codec.ACCESS_REJECT:
        result.rejected += 1
    else:
        result.other += 1


def _reply_matches(data: bytes, request_authenticator: bytes, secret: bytes) -> bool:
    """Whether the Response Authenticator of ``data`` answers that request."""
    length = int.from_bytes(data[2:4], "big")
    if length < 20 or length > len(data):
        return False
    expected = hashlib.md5(data[:4] + request_authenticator + data[20:length] + secret).digest()
    return hmac.compare_digest(expected, data[4:20])


@dataclass
class ClosedLoopResult:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    other: int = 0
    lost: int = 0
    bad_replies: int = 0
    wall: float = 0.0       # first send to last reply (or timeout)
    cpu: float = 0.0        # this generator's own CPU seconds over that time

    @property
    def rate(self) -> float:
        return self.accepted / self.wall if self.wall > 0 else 0.0


def closed_loop(host: str, ports: list[int], secret: bytes, logins: list[tuple[str, str]],
                *, sockets: int = 8, inflight: int = 64,
                timeout: float = 10.0) -> ClosedLoopResult:
    """Keep ``inflight`` Access-Requests outstanding (spread over ``sockets`` UDP
    sockets, socket k sending to ``ports[k % len(ports)]``) until every
    ``(name, password)`` of ``logins`` was sent once and answered or timed out.

    What radclient -p does, without its cost: radclient polls in a busy loop
    while requests are out (one process -p 64 used 0.95 s of CPU for 1,000
    logins in 1.02 s; eight of them took 1.6 of this machine's 2 cores), which
    leaves the server under test a fraction of the machine. Here every packet
    is built before the clock starts, and the loop sleeps in poll(): what
    remains is one send, one receive and one MD5 per login. No retransmissions:
    a request unanswered for ``timeout`` seconds is lost.
    """
    if not sockets <= inflight <= 255 * sockets:
        raise ValueError("from 1 to 255 requests in flight per socket")
    result = ClosedLoopResult()
    # Socket n sends its j-th request with Identifier j % 256; at most 255 are out
    # per socket, so an outstanding Identifier is never reused.
    queues: list[list[tuple[bytes, bytes]]] = [[] for _ in range(sockets)]
    for i, (name, password) in enumerate(logins):
        n = i % sockets
        queues[n].append(access_request(secret, name, password,
                                        identifier=len(queues[n]) % 256))
    limits = [inflight // sockets + (1 if n < inflight % sockets else 0)
              for n in range(sockets)]
    socks: list[socket.socket] = []
    try:
        _open_sockets(socks, host, ports, sockets)
        by_fd = {s.fileno(): n for n, s in enumerate(socks)}
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLIN)
        next_index = [0] * sockets
        # per socket: identifier -> (request authenticator, send time)
        pending: list[dict[int, tuple[bytes, float]]] = [{} for _ in range(sockets)]

        def send_more(n: int, now: float) -> None:
            queue = queues[n]
            while len(pending[n]) < limits[n] and next_index[n] < len(queue):
                packet, authenticator = queue[next_index[n]]
                socks[n].send(packet)
                pending[n][packet[1]] = (authenticator, now)
                next_index[n] += 1
                result.sent += 1

        cpu0 = time.process_time()
        start = time.perf_counter()
        for n in range(sockets):
            send_more(n, start)
        last_check = start
        while any(pending):
            events = poller.poll(100)
            now = time.perf_counter()
            for fd, _ in events:
                n = by_fd[fd]
                for _ in range(256):  # bounded drain
                    try:
                        data = socks[n].recv(4096)
                    except BlockingIOError:
                        break
                    entry = pending[n].get(data[1]) if len(data) >= 20 else None
                    if entry is None or not _reply_matches(data, entry[0], secret):
                        result.bad_replies += 1
                        continue
                    del pending[n][data[1]]
                    _count(result, data[0])
                send_more(n, now)
            if now - last_check > 1.0:  # requests out longer than the timeout are lost
                last_check = now
                for n in range(sockets):
                    expired = [k for k, (_, sent) in pending[n].items() if now - sent > timeout]
                    for k in expired:
                        del pending[n][k]
                        result.lost += 1
                    send_more(n, now)
        result.wall = time.perf_counter() - start
        result.cpu = time.process_time() - cpu0
    finally:
        for s in socks:
            s.close()
    return result
