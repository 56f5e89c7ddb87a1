"""The interfaces the SMS and voice factors use, and checks shared by all gateways.

A gateway only delivers: it does not make codes, keep state or decide. Every
Deferred it returns either fires with the provider's answer or fails with
`GatewayError`, within the gateway's own timeout; cancelling the Deferred
abandons the request.
"""

from __future__ import annotations

import re
from typing import Protocol

from twisted.internet.defer import Deferred

# [0-9], not \d: \d also matches other scripts' digits, which no provider accepts.
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


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
    """Sends text messages."""

    def send_sms(self, to: str, text: str) -> Deferred[None]:
        """Hand ``text`` to the provider for ``to`` (E.164); fires with None once accepted."""


class VoiceGateway(Protocol):
    """Places phone calls that the provider drives from our callback URLs."""

    def start_call(self, to: str, *, answer_url: str,
                   status_url: str | None = None) -> Deferred[str]:
        """Ask the provider to call ``to``; fires with the provider's call id.

        The provider fetches its instructions from ``answer_url`` when the
        call is answered and reports the final call status to ``status_url``.
        """


def is_e164(number: str) -> bool:
    """True if ``number`` is an E.164 number: '+', a country code, 7 to 15 digits in all."""
    return _E164.fullmatch(number) is not None


def mask_number(number: str) -> str:
    """The number as it may appear in logs: only its last 4 characters."""
    return "***" + number[-4:] if len(number) > 4 else "***"
