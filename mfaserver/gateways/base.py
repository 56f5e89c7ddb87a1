"""The interfaces the SMS and voice factors use, and checks shared by all gateways.

A gateway only delivers: it does not make codes, keep state or decide. Every
Deferred it returns either fires with the provider's answer or fails with
`GatewayError`, within the gateway's own timeout; cancelling the Deferred
abandons the request.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred

# The one E.164 rule ('+', then 7 to 15 ASCII digits, the first not 0: 15 is
# E.164's maximum, the shortest numbers in use, Niue's, have 7) lives in
# mfaserver.phones, so that the store, an independent layer, shares it. The
# gateways use it from here.
from mfaserver.phones import is_e164


class GatewayError(Exception):
    """The message or call could not be handed to the provider.

    The provider was unreachable or too slow, or refused the request. The
    text names the HTTP status and the provider's error code and message,
    never credentials or what was sent. ``status`` and ``provider_code`` are
    None when there was no HTTP answer or no provider error code.
    """

    def __init__(self, message: str, *, status: int | None = None,
                 provider_code: int | None = None):
        super().__init__(message)
        self.status = status
        self.provider_code = provider_code


class SmsGateway(Protocol):
    """Sends text messages (verified: tests/test_gateway_contracts.py)."""

    def send_sms(self, to: str, text: str) -> Deferred[None]:
        """Hand ``text`` to the provider for ``to``; fires with None once accepted.

        Fails with `GatewayError`, without sending, when ``to`` is not E.164
        (`is_e164`); with `GatewayError` when the provider refuses, cannot be
        reached or does not answer in time.
        """


class VoiceGateway(Protocol):
    """Places phone calls that the provider drives from our callback URLs.

    Verified by tests/test_gateway_contracts.py.
    """

    def start_call(self, to: str, *, answer_url: str,
                   status_url: str | None = None) -> Deferred[str]:
        """Ask the provider to call ``to``; fires with the provider's call id.

        The provider fetches its instructions from ``answer_url`` when the
        call is answered and reports the final call status to ``status_url``.
        Fails like `SmsGateway.send_sms`; raises ValueError at once when a URL
        is not absolute (a programming error; see `check_call`).
        """


def check_e164(to: str, gateway: str) -> str:
    """``to`` if it is an E.164 number (`is_e164`), else GatewayError naming ``gateway``.

    Every gateway checks numbers with it before sending anything.
    Numbers end up in URLs, JSON and mail addresses: anything else is refused
    rather than escaped.
    """
    if not is_e164(to):
        raise GatewayError(f"{gateway}: the number is not in E.164 form")
    return to


def check_call(to: str, answer_url: str, status_url: str | None) -> None:
    """What every `VoiceGateway` checks before it places a call.

    ValueError if a URL is not an absolute http(s) URL (a provider cannot
    call back a path: a programming error); GatewayError if ``to`` is not
    E.164.
    """
    _require_absolute_url(answer_url, "answer_url")
    if status_url is not None:
        _require_absolute_url(status_url, "status_url")
    check_e164(to, "call not started")


def _require_absolute_url(url: str, name: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError(f"{name}: must be an absolute http(s) URL")


def mask_number(number: str) -> str:
    """The number as it may appear in logs: only its last 4 characters."""
    return "***" + number[-4:] if len(number) > 4 else "***"
