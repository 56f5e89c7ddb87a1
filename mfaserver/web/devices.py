"""The push device API (docs/device-api.rst): enrollment, long poll, answers.

Each handler verifies and parses, then calls the core: the store for devices
and enrollment tokens (through the database thread), `PushTransactions` for
transactions. Checks run in the order the document gives, and every refusal
is a JSON error with the document's status and code.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from typing import Callable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mfaserver.addresses import is_loopback
from mfaserver.auth.model import AuditEntry, Device, Verdict
from mfaserver.factors import push_protocol as proto
from mfaserver.factors.push import (AlreadyAnswered, AnswerRefused, PushTransactions,
                                    TransactionExpired, UnknownTransaction)
from mfaserver.gateways import webpush
from mfaserver.store.db import EnrollmentExpired, EnrollmentRefused, UnknownEnrollment
from mfaserver.web import validation as v
from mfaserver.web.server import WebApp, WebRequest
from mfaserver.web.validation import HttpError

log = Logger(namespace="mfaserver.devices")

MAX_POLL_SECONDS = 30
MAX_POLLS_PER_DEVICE = 4      # a few browser tabs open on the web authenticator
SKEW_SECONDS = 60
_ID_PATTERN = "[A-Za-z0-9_-]+"

ENROLL = v.object(
    required={"public_key": v.string(256), "timestamp": v.integer(0, 2**53),
              "signature": v.string(256)},
    optional={"notify": v.object(
        required={"type": v.enum("ntfy", "webhook", "webpush"),
                  "url": v.string(2048, min_len=1)},
        # webpush only: the subscription's keys, as PushSubscription.toJSON() gives them.
        optional={"keys": v.object(required={"p256dh": v.string(128),
                                             "auth": v.string(64)})})},
)
ANSWER = v.object(
    required={"device_id": v.string(128, pattern=_ID_PATTERN, min_len=1),
              "decision": v.enum(*proto.DECISIONS),
              "timestamp": v.integer(0, 2**53), "signature": v.string(256)},
    # Not signed: it can only turn an approval into a denial (see the docs).
    optional={"number": v.string(2, pattern="[0-9]{2}", min_len=2)},
)


# The device API's status and error code for each refusal the core raises.
_REFUSALS = {
    UnknownEnrollment: (404, "not_found"),
    EnrollmentExpired: (410, "expired"),
    UnknownTransaction: (404, "not_found"),
    TransactionExpired: (410, "expired"),
    AlreadyAnswered: (409, "already_answered"),
}


def _refused(e: Exception) -> HttpError:
    status, code = _REFUSALS[type(e)]
    return HttpError(status, code, str(e))


def _unauthorized() -> HttpError:
    return HttpError(401, "unauthorized", "unknown device, bad signature or replayed request")


def _stale() -> HttpError:
    return HttpError(401, "stale_timestamp",
                     f"the timestamp is more than {SKEW_SECONDS} seconds from the server's"
                     " clock: check the phone's time")


def _json(request: WebRequest, schema: dict) -> dict:
    try:
        return request.json(schema)
    except HttpError as e:
        if e.status == 400:
            raise HttpError(400, "invalid_request", e.message) from None
        raise


def check_notify(notify: dict, *, loopback_push: bool = False) -> str | None:
    """Check an enrollment's ``notify`` (already of the schema's shape); returns
    what `Device.notify_keys` keeps: the Web Push keys as JSON, or None.

    ``loopback_push``: a Web Push endpoint on this host is allowed (a server
    whose own public URL is on loopback: the tests' stand-in push service).
    """
    check_notify_url(notify["url"])
    if notify["type"] == "webpush":
        check_push_endpoint(notify["url"], loopback=loopback_push)
    keys = notify.get("keys")
    if notify["type"] != "webpush":
        if keys is not None:
            raise HttpError(400, "invalid_request", "notify.keys: only for webpush")
        return None
    if keys is None:
        raise HttpError(400, "invalid_request", "notify.keys: required for webpush")
    try:
        point, secret = webpush.subscription_keys(keys["p256dh"], keys["auth"])
    except ValueError as e:
        raise HttpError(400, "invalid_request", f"notify.keys.{e}") from None
    # Kept in the canonical spelling (no padding), whatever the browser sent.
    return json.dumps({"p256dh": webpush.b64url(point), "auth": webpush.b64url(secret)})


def check_notify_url(url: str) -> str:
    """A wake-up URL must be https (http only to this host, for tests and relays),
    in ASCII (an international host name in its xn-- form)."""
    if not url.isascii() or any(c.isspace() for c in url):
        raise HttpError(400, "invalid_request", "notify.url: must be an ASCII URL")
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return url
    raise HttpError(400, "invalid_request", "notify.url: must be an https:// URL")


def check_push_endpoint(url: str, *, loopback: bool = False) -> None:
    """A Web Push endpoint must be a push service's: https, a DNS name, port 443.

    Anyone with an enrollment link (and, through the portal, any signed-in
    user) chooses this URL, and every sign-in then makes the daemon POST to
    it: an IP address, a bare or local name or another port could aim those
    POSTs at services inside the network.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if loopback and parts.scheme in ("http", "https") and is_loopback(host):
        return
    if (parts.scheme != "https" or port not in (None, 443) or "." not in host
            or _is_ip_address(host) or host.endswith((".localhost", ".local", ".internal"))):
        raise HttpError(400, "invalid_request",
                        "notify.url: a Web Push endpoint must be an https:// URL of a push"
                        " service (a host name, port 443)")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _ended_early(failure):
    """A poll withdrawn (a newer one of its device, or its client hung up): it
    answers with what is pending now; to a client gone, nothing is written."""
    failure.trap(CancelledError)


class DeviceApi:
    """Serves the device API over ``store`` (a `ThreadedStore`) and ``push``.

    ``report_fraud(user, client)`` is called once for every fraud answer,
    whether or not the sign-in is still waiting: it blocks the user and
    alerts. ``audit`` writes an `AuditEntry` (late answers are audited).
    """

    def __init__(self, store, push: PushTransactions, clock: IReactorTime, *,
                 report_fraud: Callable[[str, str], Deferred],
                 audit: Callable[[AuditEntry], Deferred],
                 max_poll_seconds: int = MAX_POLL_SECONDS, loopback_push: bool = False):
        self._store = store
        self._push = push
        self._clock = clock
        self._report_fraud = report_fraud
        self._audit = audit
        self._max_poll = max_poll_seconds
        self._loopback_push = loopback_push
        self._polls = proto.FreshnessWindow(skew=SKEW_SECONDS)
        self._device_polls: dict[str, list[Deferred]] = {}    # device id -> open polls

    def add_routes(self, app: WebApp) -> None:
        app.route("POST", "/v1/enroll/<token>", self.enroll)
        app.route("GET", "/v1/devices/<device_id>/transactions", self.transactions,
                  long_poll=True)
        app.route("POST", "/v1/transactions/<txid>", self.answer)

    # --- POST /v1/enroll/{token} ---

    async def enroll(self, request: WebRequest):
        body = _json(request, ENROLL)
        try:
            public_key = proto.load_public_key(body["public_key"])
        except ValueError as e:
            raise HttpError(400, "invalid_request", f"public_key: {e}") from None
        notify = body.get("notify")
        notify_keys = (check_notify(notify, loopback_push=self._loopback_push)
                       if notify is not None else None)
        digest = proto.token_digest(request.params["token"])
        message = proto.enroll_message(digest, body["public_key"], body["timestamp"])
        if not proto.verify(public_key, message, body["signature"]):
            raise _unauthorized()
        now = self._clock.seconds()
        if not proto.is_fresh(body["timestamp"], now, SKEW_SECONDS):
            raise _stale()
        device = Device(id=proto.new_device_id(), user="", public_key=body["public_key"],
                        notify_type=notify["type"] if notify else None,
                        notify_url=notify["url"] if notify else None,
                        notify_keys=notify_keys)
        try:
            user = await self._store.enroll_device(digest, device, now=now)
        except EnrollmentRefused as e:
            raise _refused(e) from None
        log.info("device {device} enrolled for {user}", device=device.id, user=user)
        return 201, {"device_id": device.id, "user": user}

    # --- GET /v1/devices/{device_id}/transactions ---

    def transactions(self, request: WebRequest) -> Deferred:
        # Written with callbacks, not as a coroutine: a thousand open pages
        # each hold a poll for up to 30 s, and a suspended coroutine keeps its
        # frames (and the request) the whole time.
        device_id = request.params["device_id"]
        timestamp_text = request.headers.get("x-mfa-timestamp", "")
        nonce = request.headers.get("x-mfa-nonce", "")
        signature = request.headers.get("x-mfa-signature", "")
        if not (timestamp_text.isascii() and timestamp_text.isdigit()
                and len(timestamp_text) <= 16):
            raise HttpError(400, "invalid_request", "X-MFA-Timestamp: must be an integer")
        timestamp = int(timestamp_text)
        try:
            message = proto.poll_message(device_id, timestamp, nonce)
        except ValueError as e:
            raise HttpError(400, "invalid_request", str(e)) from None
        wait = self._wait_seconds(request)
        d = self._store.get_device(device_id)
        d.addCallback(self._checked_poll, device_id, message, signature, timestamp, nonce, wait)
        return d

    def _checked_poll(self, device: Device | None, device_id: str, message: bytes,
                      signature: str, timestamp: int, nonce: str, wait: int):
        """The transactions for a signed, fresh, first-seen poll; at once, or once one opens."""
        if device is None or not proto.verify(self._key(device), message, signature):
            raise _unauthorized()
        now = self._clock.seconds()
        if not proto.is_fresh(timestamp, now, SKEW_SECONDS):
            raise _stale()
        if not self._polls.check((device_id, nonce), timestamp, now):
            if self._polls.full:
                # Not this device's fault: every page would take a 401 as
                # "removed" and stop polling. A 5xx makes them back off and retry.
                raise HttpError(503, "busy", "too many requests at once; try again shortly")
            raise _unauthorized()
        d = self._live(device.user)
        d.addCallback(self._at_once_or_wait, device, device_id, wait)
        return d

    def _at_once_or_wait(self, found: list, device: Device, device_id: str, wait: int):
        if found or wait <= 0:
            return self._transactions(found)
        waiting = self._push.wait_for_new(device.user, wait)
        # A device holds a few polls at most (the web authenticator open in a
        # few tabs): a newer one ends the oldest, answered as a timeout would
        # be, so an enrolled device cannot hold the daemon's memory with
        # thousands. (More tabs take turns: the page polls again after 1 s.)
        polls = self._device_polls.setdefault(device_id, [])
        polls.append(waiting)
        if len(polls) > MAX_POLLS_PER_DEVICE:
            polls.pop(0).cancel()
        waiting.addBoth(self._poll_ended, device_id, waiting)
        waiting.addErrback(_ended_early)
        waiting.addCallback(lambda _: self._live(device.user))
        waiting.addCallback(self._transactions)
        return waiting

    def _poll_ended(self, result, device_id: str, waiting: Deferred):
        polls = self._device_polls.get(device_id, [])
        if waiting in polls:
            polls.remove(waiting)
        if not polls:
            self._device_polls.pop(device_id, None)
        return result

    @staticmethod
    def _transactions(found: list) -> dict:
        return {"transactions": [txn.to_json() for txn in found]}

    def _wait_seconds(self, request: WebRequest) -> int:
        values = request.query.get("wait")
        if not values:
            return self._max_poll
        text = values[0]
        if not (text.isascii() and text.isdigit() and int(text) <= self._max_poll):
            raise HttpError(400, "invalid_request",
                            f"wait: must be an integer from 0 to {self._max_poll}")
        return int(text)

    def _live(self, user: str) -> Deferred[list]:
        # One node's registry answers at once, a cluster's from the database.
        d = defer.maybeDeferred(self._push.pending_for, user)
        d.addCallback(self._unexpired)
        return d

    def _unexpired(self, found: list) -> list:
        now = self._clock.seconds()
        return [txn for txn in found if txn.expires > now]

    # --- POST /v1/transactions/{txid} ---

    async def answer(self, request: WebRequest):
        txid = request.params["txid"]
        body = _json(request, ANSWER)
        device = await self._store.get_device(body["device_id"])
        message = proto.answer_message(body["device_id"], txid, body["decision"],
                                       body["timestamp"])
        if device is None or not proto.verify(self._key(device), message, body["signature"]):
            raise _unauthorized()
        if not proto.is_fresh(body["timestamp"], self._clock.seconds(), SKEW_SECONDS):
            raise _stale()
        try:
            txn = await defer.maybeDeferred(
                self._push.answer, txid, device.user, body["decision"],
                number=body.get("number"), device_id=device.id)
        except AnswerRefused as e:
            if not isinstance(e, UnknownTransaction):
                await self._late(txid, device, body["decision"], e)
            raise _refused(e) from None
        log.info("push {decision} from device {device} for {user} ({txid})",
                 decision=txn.verdict.value, device=device.id, user=device.user, txid=txid)
        if txn.verdict is Verdict.FRAUD:
            await self._report_fraud(device.user, txn.client)
        # The decision recorded: a wrong number made an approval a denial.
        return {"txid": txid, "decision": txn.verdict.value}

    async def _late(self, txid: str, device: Device, decision: str, refusal) -> None:
        txn = await defer.maybeDeferred(self._push.get, txid)
        log.warn("refused a late {decision} from device {device} for {user} ({txid}):"
                 " {why}", decision=decision, device=device.id, user=device.user,
                 txid=txid, why=_REFUSALS[type(refusal)][1])
        if isinstance(refusal, TransactionExpired):
            await self._audit_late(txid, txn, device, decision)
        if decision == "fraud" and (txn is None or txn.verdict is not Verdict.FRAUD):
            # Someone says the sign-in was not theirs: too late to stop it,
            # but never too late to block the account and tell the admins
            # (once: a retried fraud answer was reported the first time).
            await self._report_fraud(device.user, txn.client if txn is not None else "")

    async def _audit_late(self, txid: str, txn, device: Device, decision: str) -> None:
        """An answer after the sign-in ended (a retry of an answer that counted, 409,
        is not audited again)."""
        entry = AuditEntry(
            time=self._clock.seconds(), user=device.user,
            client=txn.client if txn is not None else "", nas_ip=txn.nas_ip if txn else None,
            calling_station_id=txn.calling_station_id if txn else None,
            factor="push", outcome="refused", reason=f"late_{decision}")
        try:
            await self._audit(entry)
        except Exception:
            log.failure("could not audit a late answer from {device}", device=device.id)

    @staticmethod
    def _key(device: Device):
        return _public_key(device.public_key)


@functools.lru_cache(maxsize=50_000)
def _public_key(text: str):
    """A device's key object. Cached by its text: parsing checks the point, which
    costs more than the signature check, and a key text has one meaning."""
    try:
        return proto.load_public_key(text)
    except ValueError:
        return None
