"""Phone calls across the nodes of a cluster: the ``cluster_calls`` table (issue #12).

`SharedVoiceCalls` is `mfaserver.factors.voice.VoiceCalls` for several nodes
on one PostgreSQL database. The provider's callbacks (answered, keys
pressed, call ended) may reach any node behind a load-balanced
``public_url``: each step is claimed in the table (the first set of keys
counts, once, wherever it arrives), and the decision is written with a
``NOTIFY`` that settles the RADIUS requests held for the call on any node.
The same login on another node (a retransmission, the NAS failing over)
joins the call in flight instead of ringing the phone again; the call limits
(pending calls, calls per user and per number) are the cluster's.

The node that recorded a new call places it through its gateway; if the
provider refuses, the call is ended as failed for every node holding it.
"""

from __future__ import annotations

import secrets
from typing import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mfaserver.auth.approvals import TooManyPending
from mfaserver.auth.interfaces import ApprovalWithdrawn
from mfaserver.auth.model import Verdict
from mfaserver.factors.cluster_waits import RowWaits
from mfaserver.factors.sms import SendRefused
from mfaserver.factors.voice import (_REPLIES, EXPIRED, FAILED, FINAL_STATUSES, GATHER_TIMEOUT,
                                     PIN_PROMPT, PLAIN_PROMPT, NO_KEYS, VoiceCalls)
from mfaserver.gateways.base import GatewayError, mask_number
from mfaserver.gateways.twilio import gather_twiml, say_twiml
from mfaserver.store.cluster import CALL_ENDED, ClusterState, login_key_text

log = Logger(namespace="mfaserver.factors.voice")

DECIDED = "decided"
FAILED_STATE = "failed"
CLOSED = "closed"


class CallNotPlaced(GatewayError):
    """The provider refused to place the call (said by the node that asked it)."""


class SharedVoiceCalls(VoiceCalls):
    """`VoiceCalls` whose calls are rows every node sees. ``run`` runs a
    `ClusterState` method on a database thread; ``node`` names this node."""

    # A fraud keypress is reported by the node it reaches, before the call is
    # decided: whether or not a node still holds the login, the user is blocked.
    reports_fraud = True

    def __init__(self, gateway, clock, *, run, node: str,
                 report_fraud: Callable[[str, str], Deferred], max_per_user: int = 1,
                 **settings):
        super().__init__(gateway, clock, **settings)
        self._report_fraud = report_fraud
        self._run = run
        self.node = node
        self._waits = RowWaits(clock)
        # [mfa] max_pending_per_user: pushes and calls pending count together.
        self.max_per_user = max_per_user

    def __len__(self) -> int:
        """Calls a request held on this node waits for."""
        return len(self._waits)

    # --- Starting (or joining) a call ----------------------------------------------------------

    def request_approval(self, user: str, phone: str, *, client: str, login_key=None,
                         timeout: float = 60.0) -> Deferred[Verdict]:
        """As `VoiceCalls.request_approval`, joining the login's call if one is pending
        on any node; a refusal over a limit comes as a `SendRefused` failure."""
        masked = mask_number(phone)
        opened = self._run(
            ClusterState.open_call, call_id=secrets.token_urlsafe(16),
            login_key=login_key_text(login_key or (user, client, None)), user=user,
            client=client, masked=masked, phone=phone, now=self._clock.seconds(),
            timeout=timeout, node=self.node, late_window=self.late_window,
            max_calls=self.max_calls, max_per_user=self.max_per_user,
            per_user=self._per_user.bucket, per_number=self._per_number.bucket)
        return opened.addCallback(self._opened, user, phone, masked, client)

    def _opened(self, result, user: str, phone: str, masked: str, client: str):
        call_id, expires, new, refused, state, verdict = result
        if refused == "rate":
            log.warn("Not calling {phone} for {user}: over the call rate limit", phone=masked,
                     user=user)
            raise SendRefused()
        if refused is not None:
            raise TooManyPending(refused)
        if state != "pending":
            return _result(call_id, state, verdict)     # decided with nobody waiting
        if self._waits.ended_recently(call_id):
            # Decided before this request could wait: it takes the verdict itself.
            return self._outcome_of(call_id, taken=True)
        waiter = self._waits.add(call_id, expires)
        if new:
            log.info("Calling {phone} for {user} (sign-in to {client})", phone=masked,
                     user=user, client=client)
            start = maybeDeferred(self.gateway.start_call, phone,
                                  answer_url=self.url(call_id, "answer"),
                                  status_url=self.url(call_id, "status"))
            start.addErrback(self._not_placed, call_id, user, masked)
        return waiter

    def _not_placed(self, failure: Failure, call_id: str, user: str, masked: str) -> None:
        log.warn("Call to {phone} for {user} not started: {error}", phone=masked, user=user,
                 error=str(failure.value))
        d = self._run(ClusterState.end_call, call_id, FAILED_STATE, None,
                      self._clock.seconds(), self.late_window)
        d.addErrback(self._lookup_failed)

    def withdraw_user(self, user: str) -> None:
        d = self._run(ClusterState.close_user_calls, user, self._clock.seconds(),
                      self.late_window)
        d.addErrback(lambda f: log.error("could not close the calls of {user}: {error}",
                                         user=user, error=f.getErrorMessage()))

    def close_all(self) -> None:
        """This node stops: its waiters go, the calls stay for the other nodes."""
        # Cancelled: no reply, so the NAS tries another node, which joins the call.
        self._waits.close_all(lambda call_id: defer.CancelledError(call_id))

    # --- The provider's callbacks, on any node -------------------------------------------------

    def answer_twiml(self, call_id: str) -> Deferred[bytes]:
        d = self._run(ClusterState.answer_call, call_id, self._clock.seconds())
        return d.addCallback(self._answer_twiml, call_id)

    def _answer_twiml(self, client: str | None, call_id: str):
        if client is None:
            return self._late_reply(call_id, "answer")
        action = self.url(call_id, "gather")
        if self.pin_mode:
            return gather_twiml(PIN_PROMPT.format(client=client), action,
                                timeout=GATHER_TIMEOUT, finish_on_key="#", goodbye=NO_KEYS)
        return gather_twiml(PLAIN_PROMPT.format(client=client), action, num_digits=1,
                            timeout=GATHER_TIMEOUT, finish_on_key="", goodbye=NO_KEYS)

    def gather(self, call_id: str, digits: str) -> Deferred[bytes]:
        # Twilio hanging up on our HTTP answer must not cancel the decision.
        reply: Deferred[bytes] = Deferred()
        Deferred.fromCoroutine(self._gather(call_id, digits)).chainDeferred(reply)
        return reply

    async def _gather(self, call_id: str, digits: str) -> bytes:
        claimed = await self._run(ClusterState.claim_call_keys, call_id, self._clock.seconds())
        if claimed is None:
            return await self._late_reply(call_id, "keys", digits)
        user, client = claimed
        if digits == "0":
            verdict = Verdict.FRAUD
        elif not self.pin_mode:
            verdict = Verdict.APPROVE if digits == "#" else Verdict.DENY
        elif not digits:
            verdict = Verdict.DENY
        else:
            try:
                right = await maybeDeferred(self._check_pin, user, digits)
            except Exception:
                log.failure("Could not check the PIN of {user}", user=user)
                await self._run(ClusterState.end_call, call_id, FAILED_STATE, None,
                                self._clock.seconds(), self.late_window)
                return say_twiml(FAILED)
            if not right:
                log.info("Wrong PIN on the call for {user}", user=user)
            verdict = Verdict.APPROVE if right else Verdict.DENY
        if verdict is Verdict.FRAUD:
            try:
                await self._report_fraud(user, client)
            except Exception:
                log.failure("could not report the fraud keypress of {user}", user=user)
        decided = await self._run(ClusterState.end_call, call_id, DECIDED, verdict.value,
                                  self._clock.seconds(), self.late_window)
        if not decided:
            return await self._late_reply(call_id, "keys", digits)
        if verdict is Verdict.FRAUD:
            log.warn("Fraud reported on the call for {user} (sign-in to {client})", user=user,
                     client=client)
        else:
            log.info("Call for {user}: {verdict}", user=user, verdict=verdict.value)
        return say_twiml(_REPLIES.get(verdict, EXPIRED))

    def call_ended(self, call_id: str, status: str) -> Deferred[None] | None:
        if status not in FINAL_STATUSES:
            return None
        # No keys by the end of the call: no answer (keys already claimed decide).
        d = self._run(ClusterState.end_call, call_id, DECIDED, Verdict.NO_ANSWER.value,
                      self._clock.seconds(), self.late_window, unless_keyed=True)
        return d.addCallback(lambda _: None)

    async def _late_reply(self, call_id: str, what: str, digits: str = "") -> bytes:
        row = await self._run(ClusterState.get_call, call_id, self._clock.seconds())
        if row is None:
            log.warn("Callback ({what}) for an unknown call", what=what)
        else:
            user, client, _, _ = row
            log.warn("late answer to call for {user} ({what} after the call was decided "
                     "or withdrawn)", user=user, what=what)
            if what == "keys" and self._on_late is not None:
                self._on_late(user, client, digits)
        return say_twiml(EXPIRED)

    # --- Notifications and the poll ------------------------------------------------------------

    def notified(self, payload: str) -> None:
        if not payload.startswith(CALL_ENDED):
            return
        call_id = payload[len(CALL_ENDED):]
        if call_id in self._waits:
            self._outcome_of(call_id).addErrback(lambda _: None)
        else:
            self._waits.note_end(call_id)

    def poll(self) -> Deferred[None]:
        self._waits.forget_old_ends()
        if not self._waits:
            return defer.succeed(None)
        d = self._run(ClusterState.ended_calls, self._waits.keys())
        d.addCallback(lambda rows: [self._settle(*row) for row in rows])
        d.addCallbacks(lambda _: None, self._lookup_failed)
        return d

    def _outcome_of(self, call_id: str, *, taken: bool = False) -> Deferred:
        """Settle the waiters of ``call_id`` from its row; fire with what they got.
        ``taken``: the caller answers a request with it too (marked delivered)."""
        d = self._run(ClusterState.get_call, call_id, self._clock.seconds())

        def settle(row):
            if row is None:
                self._settle(call_id, CLOSED, None)
                return _result(call_id, CLOSED, None)
            _, _, state, verdict = row
            if state == "pending":
                return defer.fail(defer.TimeoutError(call_id))
            self._settle(call_id, state, verdict, taken=taken)
            return _result(call_id, state, verdict)
        return d.addCallback(settle)

    def _settle(self, call_id: str, state: str, verdict: str | None, *,
                taken: bool = False) -> None:
        if state == "pending":
            return
        # A verdict that answers a request here is delivered: a later copy of the
        # login must not take it again (ClusterState.open_call).
        if state == DECIDED and (taken or call_id in self._waits):
            d = self._run(ClusterState.mark_delivered, "cluster_calls", "call_id", call_id)
            d.addErrback(self._lookup_failed)
        self._waits.settle(call_id, lambda: _result(call_id, state, verdict))

    @staticmethod
    def _lookup_failed(failure) -> None:
        log.debug("cluster call lookup failed: {error}", error=failure.getErrorMessage())


def _result(call_id: str, state: str, verdict: str | None) -> Deferred:
    if state == DECIDED and verdict is not None:
        return defer.succeed(Verdict(verdict))
    if state == FAILED_STATE:
        return defer.fail(CallNotPlaced("the call could not be placed or completed"))
    if state == "expired":
        return defer.fail(defer.TimeoutError(call_id))
    return defer.fail(ApprovalWithdrawn(call_id))
