"""The provider's callbacks for phone-call approvals (`VoiceCalls`).

Three POST routes per call, all form-encoded and signed by the provider with
X-Twilio-Signature:

* ``/v1/voice/{call_id}/answer``: the phone was picked up; we answer with TwiML;
* ``/v1/voice/{call_id}/gather``: the keys pressed; TwiML saying the outcome;
* ``/v1/voice/{call_id}/status``: the call's final status; 204.

A request without a valid signature gets 403 and reaches nothing else.
Verify, parse, call the core: the decisions are in mfaserver.factors.voice.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mfaserver.factors.voice import VoiceCalls
from mfaserver.gateways.twilio import check_signature
from mfaserver.web.server import Form, Response, WebApp, WebRequest
from mfaserver.web.validation import HttpError

log = Logger(namespace="mfaserver.web.voice")

TWIML = "text/xml"


def add_voice_routes(app: WebApp, calls: VoiceCalls, *,
                     auth_token: str | Callable[[], str], public_url: str) -> None:
    """Route the provider's answer, gather and status callbacks for ``calls``.

    ``auth_token`` is the provider's auth token, the key of the signatures,
    or a function that returns the current one (a reload may change it);
    ``public_url`` is the base URL the provider was given (the one `calls`
    builds its callback URLs on).
    """
    base = public_url.rstrip("/")
    current_token = auth_token if callable(auth_token) else (lambda: auth_token)

    def signed_form(request: WebRequest, what: str) -> Form:
        """The form of a correctly signed callback; HttpError 403 otherwise."""
        signature = request.headers.get("x-twilio-signature", "")
        if not signature:
            log.warn("Refused a voice {what} callback without a signature", what=what)
            raise HttpError(403, "forbidden", "bad signature")
        form = request.form()
        # The provider signs the URL it was given, not the one we see: behind
        # a reverse proxy the scheme, host and port differ. Only the path and
        # query come from the request.
        _, mark, query = request.url.partition("?")
        url = base + request.path + mark + query
        params: dict[str, list[str]] = {}
        for name, value in form.pairs:
            params.setdefault(name, []).append(value)
        if not check_signature(current_token(), url, params, signature):
            log.warn("Refused a voice {what} callback with a bad signature", what=what)
            raise HttpError(403, "forbidden", "bad signature")
        return form

    # A cluster's calls (SharedVoiceCalls) answer through the database: Deferreds.
    async def answer(request: WebRequest) -> Response:
        signed_form(request, "answer")
        twiml = calls.answer_twiml(request.params["call_id"])
        if isinstance(twiml, Deferred):
            twiml = await twiml
        return Response(twiml, TWIML)

    async def gather(request: WebRequest) -> Response:
        form = signed_form(request, "gather")
        twiml = calls.gather(request.params["call_id"], form.fields.get("Digits", ""))
        if isinstance(twiml, Deferred):
            twiml = await twiml
        return Response(twiml, TWIML)

    async def status(request: WebRequest) -> Response:
        form = signed_form(request, "status")
        ended = calls.call_ended(request.params["call_id"], form.fields.get("CallStatus", ""))
        if isinstance(ended, Deferred):
            await ended
        return Response(b"", "text/plain", 204)

    app.route("POST", "/v1/voice/<call_id>/answer", answer)
    app.route("POST", "/v1/voice/<call_id>/gather", gather)
    app.route("POST", "/v1/voice/<call_id>/status", status)
