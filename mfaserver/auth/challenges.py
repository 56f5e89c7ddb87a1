"""Access-Challenge sessions: the State values we issued and what they stand for.

A State is 16 random bytes (nothing about the user is encoded in it: it is
visible on the wire), bound to the RADIUS client and the user, valid once,
for a limited time. Only a user's newest challenge is valid: issuing a new one
withdraws the old one. The registry is bounded; when full, the oldest entry
is dropped (memory stays bounded under a flood of correct passwords).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

STATE_BYTES = 16


@dataclass(frozen=True)
class PendingChallenge:
    """What a State stands for."""

    client_name: str
    username: str
    expires: float
    context: dict = field(default_factory=dict, compare=False)


class ChallengeRegistry:
    """Issues and redeems Access-Challenge State values."""

    def __init__(self, clock: IReactorTime, ttl: float = 300.0, max_entries: int = 100_000):
        self._clock = clock
        self.ttl = ttl
        self._max_entries = max_entries
        self._by_state: OrderedDict[bytes, PendingChallenge] = OrderedDict()
        self._state_of_user: dict[tuple[str, str], bytes] = {}

    def __len__(self) -> int:
        return len(self._by_state)

    def issue(self, client_name: str, username: str, context: dict | None = None) -> bytes:
        """Return a new State for this client and user, withdrawing their older one."""
        now = self._clock.seconds()
        self._expire(now)
        previous = self._state_of_user.pop((client_name, username), None)
        if previous is not None:
            self._by_state.pop(previous, None)
        while len(self._by_state) >= self._max_entries:
            _, dropped = self._by_state.popitem(last=False)
            self._state_of_user.pop((dropped.client_name, dropped.username), None)
        state = secrets.token_bytes(STATE_BYTES)
        self._by_state[state] = PendingChallenge(client_name, username, now + self.ttl,
                                                 context or {})
        self._state_of_user[(client_name, username)] = state
        return state

    def redeem(self, state: bytes, client_name: str, username: str) -> PendingChallenge | None:
        """Take the challenge for ``state`` if it is live and bound to this client and user.

        A State is single use: a match removes it. A State presented by the
        wrong client or for another user is left alone (it may still be
        answered by its owner) and None is returned.
        """
        entry = self._by_state.get(state)
        if entry is None:
            return None
        if entry.expires <= self._clock.seconds():
            self._forget(state, entry)
            return None
        if entry.client_name != client_name or entry.username != username:
            return None
        self._forget(state, entry)
        return entry

    def _forget(self, state: bytes, entry: PendingChallenge) -> None:
        del self._by_state[state]
        if self._state_of_user.get((entry.client_name, entry.username)) == state:
            del self._state_of_user[(entry.client_name, entry.username)]

    def _expire(self, now: float) -> None:
        # Entries are in issue order and share one TTL, so expired ones are at the front.
        while self._by_state:
            state, entry = next(iter(self._by_state.items()))
            if entry.expires > now:
                break
            self._forget(state, entry)
