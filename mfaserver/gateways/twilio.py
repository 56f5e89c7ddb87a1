"""Twilio: SMS through the Messages resource, voice calls through the Calls resource.

`TwilioGateway` talks to Twilio's REST API (2010-04-01) with treq: form-encoded
POSTs, HTTP basic auth with the account SID and auth token. Every request has
one deadline on the reactor clock covering connect, send and reading the
answer; past it, or on any network error or refusal, the Deferred fails with
`GatewayError`. Nothing is retried: a send that timed out may still have been
delivered, and a second one would text or ring the user twice.

A call is driven by our own HTTP endpoints: Twilio fetches TwiML from the
answer URL (`gather_twiml` builds it), posts the keys the user pressed to the
<Gather> action URL and the final call status to the status URL. Those
callbacks carry an X-Twilio-Signature header that `check_signature` verifies.

Keys and <Gather>: Twilio sends the digits pressed *without* the finish key
(finishOnKey, "#" by default), and we assume that pressing only the finish
key is no input at all: <Gather> then posts nothing and falls through to the
next verb. So "press # to sign in" needs ``finish_on_key=""`` (no finish key,
"#" is an ordinary key) and ``num_digits=1``: "#" arrives as Digits="#" and
"0" as Digits="0". A PIN uses the default finish key: "1234#" arrives as
Digits="1234". Do not add actionOnEmptyResult to make a bare "#" post: a
timeout would then post the same empty Digits, and a voicemail box that
answers and stays silent would look like a user pressing "#".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit
from xml.etree import ElementTree

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectError
from twisted.internet.ssl import platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from mfaserver.addresses import is_loopback
from mfaserver.gateways.base import GatewayError, check_call, check_e164, is_e164, mask_number
from mfaserver.gateways.http import BodyTooLarge, make_agent, read_body, treq_client

log = Logger(namespace="mfaserver.gateways.twilio")

API_VERSION = "2010-04-01"
MAX_RESPONSE = 64 * 1024  # bytes; Twilio's answers are a few KiB
MAX_SMS_LENGTH = 1600     # characters: Twilio refuses longer bodies (error 21617)
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")
_ANY_SID = re.compile(r"[A-Z]{2}[0-9a-fA-F]{32}")
# Provider messages may quote the number ("The 'To' number +1... is not valid").
_NUMBER_IN_TEXT = re.compile(r"\+?[0-9]{7,15}")
# Characters XML 1.0 cannot carry at all; escaping does not help with these.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_KEYS = frozenset("0123456789#*")


@dataclass(frozen=True)
class TwilioSettings:
    """The [gateways.twilio] section: account, sender number and limits.

    ``timeout`` bounds each REST request (seconds); ``ring_timeout`` is how
    long Twilio lets the phone ring before giving up (seconds, 5 to 600).
    """

    account_sid: str
    auth_token: str = field(repr=False)
    from_number: str
    api_base: str = "https://api.twilio.com"
    timeout: float = 10.0
    ring_timeout: int = 30

    def __post_init__(self):
        if not _ACCOUNT_SID.fullmatch(self.account_sid):
            raise ValueError("account_sid: must be 'AC' followed by 32 hex digits")
        if not self.auth_token or self.auth_token != self.auth_token.strip():
            raise ValueError("auth_token: must be non-empty, without surrounding whitespace")
        if not is_e164(self.from_number):
            raise ValueError("from_number: must be an E.164 number such as +15550001111")
        _check_api_base(self.api_base)
        if not self.timeout > 0:
            raise ValueError("timeout: must be a positive number of seconds")
        if not 5 <= self.ring_timeout <= 600:
            raise ValueError("ring_timeout: must be 5 to 600 seconds")


def _check_api_base(api_base: str) -> None:
    """Refuse URLs that would send the auth token in clear text off this host."""
    try:
        parts = urlsplit(api_base)
        parts.port  # raises ValueError for a bad port
    except ValueError:
        raise ValueError("api_base: not a valid URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("api_base: must be an https:// URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("api_base: must not contain credentials, a query or a fragment")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        # Plain http only for a local test server: basic auth carries the token.
        raise ValueError("api_base: must be https:// (http:// only for 127.0.0.1 or localhost)")


class TwilioGateway:
    """Sends SMS and starts calls through Twilio; an `SmsGateway` and a `VoiceGateway`.

    ``reactor`` provides time and TCP; a `MemoryReactorClock` in tests.
    ``http_client`` is a `treq.client.HTTPClient` (for tests: ``StubTreq``,
    with ``reactor`` a `Clock` for the deadline); by default the gateway makes
    one over its own pool of persistent connections, which `close` closes.
    """

    def __init__(self, settings: TwilioSettings, reactor, http_client: HTTPClient | None = None):
        self._settings = settings
        self._reactor = reactor
        self._account_url = "{}/{}/Accounts/{}".format(
            settings.api_base.rstrip("/"), API_VERSION, quote(settings.account_sid, safe=""))
        self._pool: HTTPConnectionPool | None = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            # A POST is never retried on a pooled connection the server has
            # meanwhile closed, so it would fail; drop idle connections early,
            # before a load balancer's idle timeout does.
            self._pool.cachedConnectionTimeout = 30
            http_client = treq_client(make_agent(
                reactor, trust=platformTrust(), connect_timeout=settings.timeout,
                pool=self._pool))
        self._http = http_client

    def close(self) -> Deferred[None]:
        """Close the idle pooled connections (none to close with a caller's client)."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    def send_sms(self, to: str, text: str) -> Deferred[None]:
        """Hand an SMS to Twilio; fires with None once Twilio has accepted it (HTTP 201).

        Accepted is not delivered: Twilio queues the message. Fails with
        `GatewayError` without sending when ``to`` is not E.164 or ``text`` is
        empty or longer than Twilio takes.
        """
        try:
            check_e164(to, "SMS not sent")
        except GatewayError:
            return fail()
        if not text or len(text) > MAX_SMS_LENGTH:
            return fail(GatewayError(
                f"SMS not sent: the text must be 1 to {MAX_SMS_LENGTH} characters"))
        form = [("To", to), ("From", self._settings.from_number), ("Body", text)]
        d = self._post("Messages.json", form, what="SMS", to=to)
        d.addCallback(lambda answer: None)
        return d

    def start_call(self, to: str, *, answer_url: str,
                   status_url: str | None = None) -> Deferred[str]:
        """Ask Twilio to call ``to``; fires with the call SID ("CA" and 32 hex digits).

        When the call is answered Twilio POSTs to ``answer_url`` for TwiML;
        when it ends (completed, busy, no-answer, failed, canceled) Twilio
        POSTs the final CallStatus to ``status_url``, if given.
        """
        try:
            check_call(to, answer_url, status_url)
        except GatewayError:
            return fail()
        form = [
            ("To", to), ("From", self._settings.from_number),
            ("Url", answer_url), ("Method", "POST"),
            ("Timeout", str(self._settings.ring_timeout)),
        ]
        if status_url is not None:
            form += [("StatusCallback", status_url), ("StatusCallbackMethod", "POST"),
                     ("StatusCallbackEvent", "completed")]
        d = self._post("Calls.json", form, what="call", to=to)

        def call_sid(answer: dict) -> str:
            sid = answer.get("sid")
            if not isinstance(sid, str) or not _CALL_SID.fullmatch(sid):
                raise GatewayError("twilio: the answer to a call request has no call SID")
            return sid
        d.addCallback(call_sid)
        return d

    def _post(self, resource: str, form: list[tuple[str, str]], *, what: str,
              to: str) -> Deferred[dict]:
        """POST ``form`` to the account's ``resource``; fires with the parsed JSON answer."""
        timeout = self._settings.timeout
        d = Deferred.fromCoroutine(self._request(f"{self._account_url}/{resource}", form))

        def timed_out(result, timeout):
            return Failure(GatewayError(f"twilio: no answer within {timeout:g} s"))
        d.addTimeout(timeout, self._reactor, onTimeoutCancel=timed_out)

        def accepted(answer: dict) -> dict:
            sid = answer.get("sid")
            sid = sid if isinstance(sid, str) and _ANY_SID.fullmatch(sid) else None
            log.info("Twilio accepted the {what} to {to}: {sid}",
                     what=what, to=mask_number(to), sid=sid)
            return answer

        def refused(failure: Failure) -> Failure:
            if failure.check(GatewayError):
                error = failure.value
                log.warn("Twilio did not take the {what} to {to}: {error}",
                         what=what, to=mask_number(to), error=str(error),
                         status=error.status, twilio_error=error.provider_code)
            return failure
        d.addCallbacks(accepted, refused)
        return d

    async def _request(self, url: str, form: list[tuple[str, str]]) -> dict:
        try:
            response = await self._http.post(
                url, data=form, auth=(self._settings.account_sid, self._settings.auth_token),
                headers={"Accept": ["application/json"]},
                allow_redirects=False,  # a redirect would carry the credentials elsewhere
                unbuffered=True)
            status = response.code
            body = await read_body(response, MAX_RESPONSE)
        except (CancelledError, GatewayError):
            raise
        except BodyTooLarge:
            raise GatewayError(f"twilio {status}: answer longer than {MAX_RESPONSE} bytes",
                               status=status) from None
        except ConnectError as e:
            raise GatewayError(f"twilio unreachable: {_clean(str(e))}") from None
        except Exception as e:
            # Agent reports a cancelled request as ResponseNeverReceived (or
            # ResponseFailed) wrapping CancelledError; the caller cancelled, so
            # say so, not "unreachable".
            if any(reason.check(CancelledError) for reason in getattr(e, "reasons", ())):
                raise CancelledError() from None
            raise GatewayError(f"twilio: request failed ({type(e).__name__})") from None

        answer = _parse_json(body)
        if 200 <= status < 300:
            # An SMS answered 201 was accepted even if the JSON is odd: report
            # success, or the caller might send it again.
            return answer if answer is not None else {}
        code = answer.get("code") if answer else None
        message = answer.get("message") if answer else None
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        text = f"twilio {status}"
        if code is not None:
            text += f" {code}"
        if isinstance(message, str) and message:
            text += f": {_clean(message)}"
        raise GatewayError(text, status=status, provider_code=code)


def _parse_json(body: bytes) -> dict | None:
    """The JSON object in ``body``, or None for anything else."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _clean(text: str) -> str:
    """Provider text fit for an error message and a log line: short, one line, numbers masked."""
    text = _NUMBER_IN_TEXT.sub(lambda m: mask_number(m.group()), text)
    text = "".join(c if c.isprintable() else " " for c in text)
    return text[:200]


# --- Callback signatures ---------------------------------------------------------------------

def check_signature(auth_token: str, url: str, params: Mapping[str, str | list[str]],
                    signature: str) -> bool:
    """True if ``signature`` (the X-Twilio-Signature header) signs this callback.

    ``url`` is the full URL Twilio requested, query string included, exactly
    as configured at Twilio; ``params`` are the POST form fields only (not
    the query string; keep blank values: Digits="" is signed too). Twilio
    signs the URL followed by each name and value, names sorted and a
    repeated name's values sorted, with HMAC-SHA1 keyed by the auth token,
    base64. Like Twilio's own RequestValidator, the URL is also tried
    without its port and with the scheme's default port added, because
    Twilio does not sign ports consistently.
    """
    if not signature:
        return False
    expected = signature.encode("utf-8", "replace")
    valid = False
    for candidate in _url_variants(url):
        # No early exit: every candidate costs the same, whichever matches.
        valid |= hmac.compare_digest(_signature(auth_token, candidate, params), expected)
    return valid


def _signature(auth_token: str, url: str, params: Mapping[str, str | list[str]]) -> bytes:
    data = [url]
    for name in sorted(params):
        values = params[name]
        for value in sorted([values] if isinstance(values, str) else values):
            data.append(name + value)
    mac = hmac.new(auth_token.encode("utf-8"), "".join(data).encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest())


def _url_variants(url: str) -> list[str]:
    """``url`` as given, plus without its port or with the default port added."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return [url]
    if not parts.hostname:
        return [url]
    if port is not None:
        netloc = parts.netloc.rpartition(":")[0]
    else:
        netloc = f"{parts.netloc}:{443 if parts.scheme == 'https' else 80}"
    return [url, urlunsplit(parts._replace(netloc=netloc))]


# --- TwiML -----------------------------------------------------------------------------------

def gather_twiml(prompt: str, action_url: str, *, num_digits: int | None = None,
                 timeout: int = 10, finish_on_key: str = "#",
                 goodbye: str = "Goodbye.") -> bytes:
    """TwiML that says ``prompt`` while collecting keys, then POSTs them to ``action_url``.

    If no keys come within ``timeout`` seconds (or only the finish key, see
    the module docstring), Twilio says ``goodbye`` and hangs up without
    calling ``action_url``. ``finish_on_key=""`` makes "#" an ordinary key.
    """
    if finish_on_key and (len(finish_on_key) != 1 or finish_on_key not in _KEYS):
        raise ValueError("finish_on_key: must be one of 0-9, #, * or empty")
    if num_digits is not None and num_digits < 1:
        raise ValueError("num_digits: must be at least 1")
    if timeout < 1:
        raise ValueError("timeout: must be at least 1 second")
    response = ElementTree.Element("Response")
    gather = ElementTree.SubElement(response, "Gather", {
        "action": _xml_text(action_url), "method": "POST",
        "finishOnKey": finish_on_key, "timeout": str(timeout),
    })
    if num_digits is not None:
        gather.set("numDigits", str(num_digits))
    ElementTree.SubElement(gather, "Say").text = _xml_text(prompt)
    ElementTree.SubElement(response, "Say").text = _xml_text(goodbye)
    ElementTree.SubElement(response, "Hangup")
    return ElementTree.tostring(response, encoding="utf-8", xml_declaration=True)


def say_twiml(text: str) -> bytes:
    """TwiML that says ``text`` and hangs up."""
    response = ElementTree.Element("Response")
    ElementTree.SubElement(response, "Say").text = _xml_text(text)
    ElementTree.SubElement(response, "Hangup")
    return ElementTree.tostring(response, encoding="utf-8", xml_declaration=True)


def _xml_text(text: str) -> str:
    # ElementTree escapes <, & and quotes but writes control characters as
    # they are, which makes the document invalid; a user name in a prompt
    # could carry one.
    return _NOT_XML.sub("", text)
