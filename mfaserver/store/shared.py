"""Access-Challenge States shared by the nodes of a cluster (issue #12).

`SharedChallenges` does what `mfaserver.auth.challenges.ChallengeRegistry`
does for one node, in the ``cluster_challenges`` table: a State issued by one
node is answered on any other, once. ``issue`` and ``redeem`` fire later
(a database thread); the pipeline waits for either kind.
"""

from __future__ import annotations

import secrets
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mfaserver.auth.challenges import STATE_BYTES, PendingChallenge
from mfaserver.store.cluster import ClusterState, context_from_text, context_to_text


class SharedChallenges:
    """Issues and redeems States in the database (``run``: `ThreadedStore.run_state`)."""

    def __init__(self, run: Callable[..., Deferred], clock: IReactorTime, ttl: float = 300.0):
        self._run = run
        self._clock = clock
        self.ttl = ttl

    def issue(self, client_name: str, username: str, context: dict | None = None
              ) -> Deferred[bytes]:
        """A new State for this client and user, replacing their older one."""
        state = secrets.token_bytes(STATE_BYTES)
        d = self._run(ClusterState.issue_challenge, state, client_name, username,
                      context_to_text(context or {}), self._clock.seconds() + self.ttl)
        d.addCallback(lambda _: state)
        return d

    def redeem(self, state: bytes, client_name: str, username: str
               ) -> Deferred[PendingChallenge | None]:
        """Take the live challenge for ``state`` bound to this client and user, or None."""
        now = self._clock.seconds()
        d = self._run(ClusterState.redeem_challenge, state, client_name, username, now)
        d.addCallback(lambda text: None if text is None else PendingChallenge(
            client_name, username, now, context_from_text(text)))
        return d
