"""RFC 5080 §2.2.2 duplicate detection: the retransmission cache.

Entries are keyed by (source address, source port, Identifier); the Request
Authenticator tells a retransmission (same) from a new request that reuses
the Identifier (different: the old entry is purged). A duplicate of a request
still being decided is dropped; a duplicate of a decided one gets the cached
reply bytes, unchanged, until the entry expires. Only packets that passed
validation (including Message-Authenticator) ever reach this cache.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

IN_PROGRESS = object()
"""`ReplyCache.lookup` result: the original is still being decided; drop the copy."""

Key = tuple[str, int, int]


class ReplyCache:
    """Remembers requests in flight and replies sent, for ``ttl`` seconds.

    Memory is bounded: at most ``max_entries`` entries; when full, the oldest
    completed entries go first. In-flight entries are never evicted (their
    number is bounded by the requests the daemon accepts at once).
    """

    def __init__(self, clock: IReactorTime, ttl: float = 30.0, max_entries: int = 100_000):
        self._clock = clock
        self.ttl = ttl
        self._max_entries = max_entries
        self._pending: dict[Key, bytes] = {}
        # key -> (authenticator, reply, expires), in completion order
        self._done: OrderedDict[Key, tuple[bytes, bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending) + len(self._done)

    def lookup(self, key: Key, authenticator: bytes):
        """Return IN_PROGRESS, the cached reply bytes, or None for a new request."""
        pending = self._pending.get(key)
        if pending is not None:
            if pending == authenticator:
                return IN_PROGRESS
            # Same port and Identifier, new authenticator: the NAS gave up on the
            # old request and reused the Identifier. Forget the old one.
            del self._pending[key]
            return None
        done = self._done.get(key)
        if done is None:
            return None
        cached_authenticator, reply, expires = done
        if expires <= self._clock.seconds():
            del self._done[key]
            return None
        if cached_authenticator == authenticator:
            return reply
        del self._done[key]
        return None

    def begin(self, key: Key, authenticator: bytes) -> None:
        """Record that a new request is being decided."""
        self._pending[key] = authenticator

    def complete(self, key: Key, authenticator: bytes, reply: bytes) -> None:
        """Record the reply sent for a request, for retransmissions to get."""
        if self._pending.get(key) == authenticator:
            del self._pending[key]
        now = self._clock.seconds()
        self._expire(now)
        self._done.pop(key, None)
        self._done[key] = (authenticator, reply, now + self.ttl)
        while len(self._done) > self._max_entries:
            self._done.popitem(last=False)

    def abandon(self, key: Key, authenticator: bytes) -> None:
        """Forget a request that got no reply (dropped, or the daemon is stopping)."""
        if self._pending.get(key) == authenticator:
            del self._pending[key]

    def _expire(self, now: float) -> None:
        done = self._done
        while done:
            key = next(iter(done))
            if done[key][2] > now:
                break
            del done[key]
