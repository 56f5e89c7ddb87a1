"""The provider's callbacks for phone-call approvals (mfaserver.web.voice), in memory.

`add_voice_routes` serves a `VoiceCalls` on a Clock; the tests post the
provider's callbacks through treq's `StubTreq` and sign them with
fake_twilio's own signature code (not mfaserver's). The provider reaches us
through a proxy under another name: signatures cover that public URL, not the
one the listener sees.
"""

from __future__ import annotations

from urllib.parse import urlencode
from xml.etree import ElementTree

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, twilio_signature
from mfaserver.auth.model import Verdict
from mfaserver.factors.voice import VoiceCalls
from mfaserver.web import WebApp
from mfaserver.web.voice import add_voice_routes

PUBLIC = "https://mfa.example.com"
LISTENER = "http://127.0.0.1:8443"      # the URL the listener sees
PHONE = "+15551234567"
SID = "CA" + "0" * 32

CALL_PARAMS = [("AccountSid", ACCOUNT_SID), ("CallSid", SID), ("CallStatus", "in-progress"),
               ("From", FROM_NUMBER), ("To", PHONE)]


class Gateway:
    """A voice gateway that starts every call and records its answer URL."""

    def __init__(self):
        self.answer_urls: list[str] = []

    def start_call(self, to, *, answer_url, status_url=None):
        self.answer_urls.append(answer_url)
        return defer.succeed(SID)


def said(twiml: bytes) -> str:
    """The text of the first <Say> of a TwiML document."""
    return ElementTree.fromstring(twiml).find(".//Say").text


class VoiceRoutesTests(SynchronousTestCase):
    def setUp(self):
        self.gateway = Gateway()
        self.calls = VoiceCalls(self.gateway, Clock(), public_url=PUBLIC + "/")
        app = WebApp(Clock())
        add_voice_routes(app, self.calls, auth_token=AUTH_TOKEN, public_url=PUBLIC + "/")
        self.http = StubTreq(app.resource())
        self.logs: list[dict] = []
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)

    def post(self, path: str, params: list[tuple[str, str]], *, signature: str | None = "",
             signed_url: str | None = None):
        """The response and body for a callback, signed over the public URL unless told."""
        if signature == "":
            signature = twilio_signature(AUTH_TOKEN, signed_url or PUBLIC + path, params)
        headers = {"Content-Type": ["application/x-www-form-urlencoded"]}
        if signature is not None:
            headers["X-Twilio-Signature"] = [signature]
        d = self.http.post(LISTENER + path, data=urlencode(params).encode(), headers=headers)
        self.http.flush()
        response = self.successResultOf(d)
        return response, self.successResultOf(response.content())

    def approval(self, user: str = "alice", phone: str = PHONE) -> tuple[defer.Deferred, str]:
        """A pending call, and its call id."""
        d = self.calls.request_approval(user, phone, client="vpn")
        return d, self.gateway.answer_urls[-1].split("/")[-2]

    def withdraw(self, d: defer.Deferred) -> None:
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)

    def test_signed_callbacks_drive_a_call(self):
        d, call_id = self.approval()
        response, body = self.post(f"/v1/voice/{call_id}/answer", CALL_PARAMS)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/xml"])
        gather = ElementTree.fromstring(body).find("Gather")
        self.assertEqual(gather.get("action"), f"{PUBLIC}/v1/voice/{call_id}/gather")
        response, body = self.post(f"/v1/voice/{call_id}/gather",
                                   CALL_PARAMS + [("Digits", "#")])
        self.assertEqual((response.code, said(body)), (200, "You are signed in. Goodbye."))
        self.assertEqual(self.successResultOf(d), Verdict.APPROVE)
        response, _ = self.post(f"/v1/voice/{call_id}/status",
                                [("CallStatus", "completed"), ("CallSid", SID)])
        self.assertEqual(response.code, 204)

    def test_status_before_answer_is_no_answer(self):
        d, call_id = self.approval()
        response, _ = self.post(f"/v1/voice/{call_id}/status",
                                [("CallStatus", "busy"), ("CallSid", SID)])
        self.assertEqual(response.code, 204)
        self.assertEqual(self.successResultOf(d), Verdict.NO_ANSWER)

    def test_missing_or_bad_signature_is_403_and_reaches_nothing(self):
        params = CALL_PARAMS + [("Digits", "#")]
        cases = [(what, case) for what in ("answer", "gather", "status")
                 for case in ("missing", "over the listener's URL", "bad", "with another token")]
        for i, (what, case) in enumerate(cases):
            # Another user and number each time, within the hourly call limits.
            d, call_id = self.approval(f"user{i}", f"+1555000{i:04d}")
            path = f"/v1/voice/{call_id}/{what}"
            signature = {
                "missing": None,
                "over the listener's URL": twilio_signature(AUTH_TOKEN, LISTENER + path,
                                                            params),
                "bad": "AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "with another token": twilio_signature("another-token", PUBLIC + path,
                                                       params),
            }[case]
            self.logs.clear()
            response, body = self.post(path, params, signature=signature)
            self.assertEqual(response.code, 403, (what, case))
            self.assertEqual(response.headers.getRawHeaders("content-type"),
                             ["application/json"])
            self.assertEqual(body, b'{"error":"forbidden","message":"bad signature"}')
            self.assertIn("signature", " ".join(formatEvent(e) for e in self.logs))
            self.assertEqual(len(self.calls), 1, (what, case))    # nothing reached it
            self.withdraw(d)

    def test_signature_covers_the_form_fields(self):
        d, call_id = self.approval()
        path = f"/v1/voice/{call_id}/gather"
        signature = twilio_signature(AUTH_TOKEN, PUBLIC + path, CALL_PARAMS + [("Digits", "0")])
        response, _ = self.post(path, CALL_PARAMS + [("Digits", "#")], signature=signature)
        self.assertEqual(response.code, 403)
        self.assertNoResult(d)
        self.withdraw(d)

    def test_signature_covers_the_query_string(self):
        d, call_id = self.approval()
        path = f"/v1/voice/{call_id}/answer?attempt=1"
        self.assertEqual(self.post(path, CALL_PARAMS)[0].code, 200)
        response, _ = self.post(path, CALL_PARAMS, signed_url=PUBLIC + path.split("?")[0])
        self.assertEqual(response.code, 403)
        self.withdraw(d)

    def test_unknown_call_gets_expired_twiml(self):
        for what in ("answer", "gather"):
            response, body = self.post(f"/v1/voice/nosuchcall/{what}", CALL_PARAMS)
            self.assertEqual((response.code, said(body)),
                             (200, "This sign-in has expired. Goodbye."))
        response, _ = self.post("/v1/voice/nosuchcall/status", [("CallStatus", "completed")])
        self.assertEqual(response.code, 204)
