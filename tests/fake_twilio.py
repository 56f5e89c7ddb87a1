"""A fake of Twilio's REST API, in memory or on 127.0.0.1, for the SMS and voice tests.

In memory (unit tests), ``FakeTwilio(clock, http_client=StubTreq(endpoints))``:
the gateway reaches ``fake.resource`` through ``StubTreq(fake.resource)``,
calls play out on ``clock`` and the fake posts its callbacks through
``http_client``. On a port (integration tests), ``FakeTwilio(reactor).start()``
and ``api_base``; then calls play out on the reactor and the callbacks go
over real HTTP.

It speaks the subset mfaserver uses: POST
``/2010-04-01/Accounts/{AccountSid}/Messages.json`` and ``.../Calls.json``
with HTTP basic auth, answering like Twilio (201 with a JSON resource, or a
JSON error ``{"code", "message", "more_info", "status"}``). Messages are only
recorded. A call is played out on the reactor a moment after the 201, the way
Twilio does it:

1. a call scripted as unanswered (``script_call(to, None)``) only posts its
   final CallStatus (no-answer, busy or failed) to the StatusCallback;
2. otherwise the fake POSTs to ``Url`` (CallStatus=in-progress) for TwiML,
   finds the first <Gather>, presses the scripted keys and POSTs Digits to
   the Gather's action URL;
3. then it POSTs CallStatus=completed to the StatusCallback, if given.

Every callback is signed with X-Twilio-Signature, computed here by
`twilio_signature`, written apart from mfaserver's `check_signature` so a
mistake in one does not hide in both. Each callback and the answer it got is
recorded in ``FakeCall.exchanges``.

Assumptions about <Gather> with keys (Twilio documents the first two; the
third is our reading, see mfaserver.gateways.twilio):

* the finish key (finishOnKey, default "#") ends input and is not sent:
  "1234#" posts Digits=1234; finishOnKey="" makes "#" an ordinary key;
* input also ends at numDigits keys, or at the end of the script (the
  caller stops pressing: a timeout), which submits the keys so far;
* no keys, or only the finish key, is no input: nothing is posted and the
  call falls through to the next verb, unless actionOnEmptyResult="true",
  which posts Digits="".

Error codes are Twilio's (20003 authenticate, 20404 not found, 21211 invalid
To, 21602 body required, ...); the messages are close to Twilio's, not exact.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
from dataclasses import dataclass, field
from urllib.parse import urljoin
from xml.etree import ElementTree

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool

from mfaserver.testing import hold_request

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "fake-twilio-auth-token-7d1e0c"
FROM_NUMBER = "+15550001111"

# Twilio's rule, written apart from mfaserver's (mfaserver.phones.is_e164).
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_PATH = re.compile(r"/2010-04-01/Accounts/([^/]+)/(Messages|Calls)\.json")


def gateway_config(api_base: str) -> str:
    """The daemon's [gateways.twilio] section for this fake at ``api_base``."""
    return f"""
[gateways.twilio]
account_sid = "{ACCOUNT_SID}"
auth_token = "{AUTH_TOKEN}"
from_number = "{FROM_NUMBER}"
api_base = "{api_base}"
timeout = 2
"""


def twilio_signature(auth_token: str, url: str, params: list[tuple[str, str]]) -> str:
    """X-Twilio-Signature as Twilio computes it for a POST of ``params`` to ``url``."""
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _valid_number(number: str) -> bool:
    # Stricter than E.164 on purpose, like Twilio's own check: North American
    # numbers need 10 digits after +1, so tests can send a number that
    # passes mfaserver's E.164 check and still get error 21211.
    if not _E164.fullmatch(number):
        return False
    return not number.startswith("+1") or len(number) == 12


@dataclass
class Exchange:
    """One callback the fake made: ``what`` is "answer", "gather" or "status"."""

    what: str
    url: str
    params: dict[str, str]
    code: int | None = None        # HTTP status of our endpoint's answer
    body: bytes = b""              # our endpoint's answer (TwiML for answer/gather)
    error: str | None = None       # the request failed: connection refused, ...


@dataclass
class FakeCall:
    """A call placed through the fake, and what happened in it."""

    sid: str
    to: str
    from_: str
    url: str
    status_callback: str | None
    status_callback_event: list[str]
    timeout: int
    status: str = "queued"
    exchanges: list[Exchange] = field(default_factory=list)
    finished: defer.Deferred = field(default_factory=defer.Deferred, repr=False)

    def exchange(self, what: str) -> Exchange | None:
        """The first callback of kind ``what``, or None if there was none."""
        return next((e for e in self.exchanges if e.what == what), None)


@dataclass
class _Script:
    keys: str | None
    status: str


class FakeTwilio:
    """The fake Twilio: in memory through `resource`, or ``start()`` on a port.

    ``reactor`` is the clock calls play out on (a `Clock` in memory) and,
    for `start`, the reactor to listen on. ``http_client`` (a treq
    ``HTTPClient``, e.g. ``StubTreq`` of our endpoints) posts the callbacks;
    by default an Agent on ``reactor``. ``messages`` lists the SMS accepted
    (dicts: to, from, body, sid), ``calls`` the `FakeCall` objects,
    ``requests`` counts every request to the REST API, refused ones too;
    ``dropped`` counts the requests left unanswered (`hang_next`) whose
    client hung up.
    """

    def __init__(self, reactor, *, account_sid: str = ACCOUNT_SID,
                 auth_token: str = AUTH_TOKEN, from_numbers=(FROM_NUMBER,),
                 answer_delay: float = 0.01, http_client: HTTPClient | None = None):
        self.reactor = reactor
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.from_numbers = set(from_numbers)
        self.answer_delay = answer_delay
        self.messages: list[dict] = []
        self.calls: list[FakeCall] = []
        self.requests = 0
        self.dropped = 0
        self.resource = _Api(self)
        self._scripts: dict[str, _Script] = {}
        self._failures: list[tuple[int, bytes]] = []
        self._hangs: list[bool] = []                # partial? for each request to leave hanging
        self._port = None
        self._delayed: list = []                    # calls about to be answered
        self._running: set[defer.Deferred] = set()  # calls being played out
        if http_client is None:
            http_client = HTTPClient(
                Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        self._http = http_client
        # A load balancer's stand-in: "http://host:port" to send every callback
        # to instead of the URL's own host (signed for the URL, as Twilio does).
        self.callback_base: str | None = None

    # --- Test controls -------------------------------------------------------------------

    def start(self) -> FakeTwilio:
        """Listen on 127.0.0.1 on a free port."""
        self._port = self.reactor.listenTCP(0, server.Site(self.resource), interface="127.0.0.1")
        return self

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}"

    async def stop(self) -> None:
        """Abandon calls still being played out and stop listening (if `start`ed)."""
        for delayed in self._delayed:
            if delayed.active():
                delayed.cancel()
        for running in list(self._running):
            running.cancel()
        if self._port is not None:
            await self._port.stopListening()

    def script_call(self, to: str, keys: str | None = "#", *, status: str = "no-answer") -> None:
        """What the callee at ``to`` does when called.

        ``keys`` are pressed in order (``"#"``, ``"0#"``, ``"1234#"``, ``""``
        for none); ``None`` means the call is not answered and ends with
        ``status`` ("no-answer", "busy" or "failed"). Unscripted numbers do
        not answer.
        """
        self._scripts[to] = _Script(keys, status)

    def fail_next(self, status: int, *, code: int | None = None, message: str = "",
                  body: bytes | None = None) -> None:
        """Answer the next REST request with ``status`` and a Twilio error (or ``body``)."""
        if body is None:
            body = _error_body(status, code, message)
        self._failures.append((status, body))

    def hang_next(self, *, partial: bool = False) -> None:
        """Leave the next REST request unanswered (a provider that hangs).

        With ``partial`` the status, headers and a few bytes of the body go
        out, then nothing more.
        """
        self._hangs.append(partial)

    def _dropped(self) -> None:
        self.dropped += 1

    def call_finished(self, sid: str) -> defer.Deferred:
        """Fires with the `FakeCall` once its last callback is done."""
        call = next(c for c in self.calls if c.sid == sid)
        d = defer.Deferred()

        def notify(result):
            d.callback(call)
            return result
        call.finished.addBoth(notify)
        return d

    # --- The REST API --------------------------------------------------------------------

    def handle(self, request) -> tuple[int, bytes] | None:
        """The answer to a REST request: (status, JSON body), or None to leave it hanging."""
        self.requests += 1
        if self._hangs:
            return None
        if self._failures:
            return self._failures.pop(0)
        match = _PATH.fullmatch(request.path.decode("latin-1"))
        if request.getUser() != self.account_sid.encode() or not hmac.compare_digest(
                request.getPassword(), self.auth_token.encode()):
            return 401, _error_body(401, 20003, "Authenticate")
        if match is None or match.group(1) != self.account_sid:
            return 404, _error_body(404, 20404, "The requested resource was not found")
        params = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        if match.group(2) == "Messages":
            return self._create_message(params)
        # A repeated parameter; Twilio also takes the events space-separated.
        events = [e for v in request.args.get(b"StatusCallbackEvent", [b"completed"])
                  for e in v.decode().split()]
        return self._create_call(params, events)

    def _create_message(self, params: dict[str, str]) -> tuple[int, bytes]:
        to, from_, body = params.get("To", ""), params.get("From", ""), params.get("Body")
        if not _valid_number(to):
            return 400, _error_body(
                400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not from_:
            return 400, _error_body(400, 21603, "A 'From' phone number is required.")
        if from_ not in self.from_numbers:
            return 400, _error_body(
                400, 21606, f"The From phone number {from_} is not a valid, SMS-capable "
                "inbound phone number or short code for your account.")
        if not body:
            return 400, _error_body(400, 21602, "Message body is required.")
        if len(body) > 1600:
            return 400, _error_body(
                400, 21617, "The concatenated message body exceeds the 1600 character limit.")
        sid = "SM" + secrets.token_hex(16)
        self.messages.append({"to": to, "from": from_, "body": body, "sid": sid})
        return 201, _json({
            "sid": sid, "account_sid": self.account_sid, "api_version": "2010-04-01",
            "to": to, "from": from_, "body": body, "status": "queued",
            "direction": "outbound-api", "num_segments": "1", "num_media": "0",
            "error_code": None, "error_message": None, "price": None,
            "messaging_service_sid": None, "date_created": None, "date_sent": None,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        })

    def _create_call(self, params: dict[str, str], events: list[str]) -> tuple[int, bytes]:
        to, from_, url = params.get("To", ""), params.get("From", ""), params.get("Url", "")
        if not _valid_number(to):
            return 400, _error_body(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if not from_:
            return 400, _error_body(400, 21213, "A 'From' phone number is required.")
        if from_ not in self.from_numbers:
            return 400, _error_body(400, 21210, f"The source phone number provided, {from_}, "
                                    "is not yet verified for your account.")
        if not re.match(r"https?://", url):
            return 400, _error_body(400, 21205, "Url is not a valid URL")
        if params.get("Method", "POST") != "POST":
            return 400, _error_body(400, 21207, "The fake only supports Method=POST")
        call = FakeCall(
            sid="CA" + secrets.token_hex(16), to=to, from_=from_, url=url,
            status_callback=params.get("StatusCallback"),
            status_callback_event=events,
            timeout=int(params.get("Timeout", "60")))
        self.calls.append(call)
        self._delayed.append(self.reactor.callLater(self.answer_delay, self._play_call, call))
        return 201, _json({
            "sid": call.sid, "account_sid": self.account_sid, "api_version": "2010-04-01",
            "to": to, "from": from_, "status": "queued", "direction": "outbound-api",
            "parent_call_sid": None, "price": None, "start_time": None, "end_time": None,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Calls/{call.sid}.json",
        })

    # --- Playing out a call --------------------------------------------------------------

    def _play_call(self, call: FakeCall) -> None:
        d = defer.Deferred.fromCoroutine(self._run_call(call))
        self._running.add(d)

        def done(result):
            self._running.discard(d)
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                return call  # abandoned by stop()
            return result
        d.addBoth(done)
        d.chainDeferred(call.finished)

    async def _run_call(self, call: FakeCall) -> FakeCall:
        script = self._scripts.get(call.to, _Script(None, "no-answer"))
        if script.keys is None:
            call.status = script.status
            await self._status_callback(call)
            return call
        call.status = "in-progress"
        answer = await self._callback(call, "answer", call.url, {})
        gather = _first_gather(answer.body) if answer.code == 200 else None
        if gather is not None:
            digits = _press(script.keys, gather)
            if digits is not None:
                action = urljoin(call.url, gather.get("action") or call.url)
                await self._callback(call, "gather", action, {"Digits": digits})
        call.status = "completed"
        await self._status_callback(call)
        return call

    async def _status_callback(self, call: FakeCall) -> None:
        if call.status_callback and "completed" in call.status_callback_event:
            await self._callback(call, "status", call.status_callback, {
                "CallDuration": "5" if call.status == "completed" else "0",
                "CallbackSource": "call-progress-events", "SequenceNumber": "0",
            })

    async def _callback(self, call: FakeCall, what: str, url: str,
                        extra: dict[str, str]) -> Exchange:
        params = {
            "AccountSid": self.account_sid, "ApiVersion": "2010-04-01", "CallSid": call.sid,
            "CallStatus": call.status, "Direction": "outbound-api",
            "From": call.from_, "To": call.to, "Called": call.to, "Caller": call.from_,
        }
        params.update(extra)
        exchange = Exchange(what, url, params)
        call.exchanges.append(exchange)
        pairs = list(params.items())
        target = url
        if self.callback_base is not None:
            target = self.callback_base + "/" + url.split("/", 3)[3]
        try:
            response = await self._http.post(
                target, data=pairs, timeout=15, reactor=self.reactor,
                headers={"X-Twilio-Signature": [twilio_signature(self.auth_token, url, pairs)]})
            exchange.code = response.code
            exchange.body = await treq.content(response)
        except defer.CancelledError:
            raise
        except Exception as e:
            exchange.error = f"{type(e).__name__}: {e}"
        return exchange


def _first_gather(twiml: bytes) -> ElementTree.Element | None:
    try:
        root = ElementTree.fromstring(twiml)
    except ElementTree.ParseError:
        return None
    return root.find("Gather") if root.tag == "Response" else None


def _press(keys: str, gather: ElementTree.Element) -> str | None:
    """The Digits Twilio would post for ``keys``, or None when it posts nothing."""
    finish = gather.get("finishOnKey", "#")
    limit = int(gather.get("numDigits", "0")) or None
    digits = ""
    for key in keys:
        if finish and key == finish:
            break
        digits += key
        if limit is not None and len(digits) >= limit:
            break
    if not digits and gather.get("actionOnEmptyResult") != "true":
        return None
    return digits


class _Api(resource.Resource):
    isLeaf = True

    def __init__(self, fake: FakeTwilio):
        super().__init__()
        self._fake = fake

    def render_POST(self, request):
        answer = self._fake.handle(request)
        if answer is None:
            return hold_request(request, partial=self._fake._hangs.pop(0),
                                dropped=self._fake._dropped)
        status, body = answer
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return body

    def render_GET(self, request):
        request.setResponseCode(405)
        return _error_body(405, 20004, "Method not allowed")


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _error_body(status: int, code: int | None, message: str) -> bytes:
    return _json({"code": code, "message": message, "status": status,
                  "more_info": f"https://www.twilio.com/docs/errors/{code}"})


# --- Nothing listening -----------------------------------------------------------------------

def unused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

