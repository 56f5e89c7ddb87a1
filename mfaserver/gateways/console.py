"""The ``console`` gateway: writes messages to the log instead of sending them.

The embedded default, for the demo and for development: an "SMS" shows up in
the daemon's log, number and text included, so a one-time code can be read
there. Those log lines therefore contain codes and phone numbers, which no
other part of mfaserver ever logs: do not use this gateway in production.
Admin alerts are logged at warning level. It has no voice calls.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger


class ConsoleGateway:
    """An `SmsGateway` and `AlertSink` that only logs; its Deferreds fire at once."""

    def __init__(self, log: Logger | None = None):
        self._log = log if log is not None else Logger(namespace="mfaserver.gateways.console")

    def send_sms(self, to: str, text: str) -> Deferred[None]:
        """Log the SMS, text included (this is the demo channel); fires with None."""
        self._log.info("SMS to {to}: {text}", to=to, text=text)
        return defer.succeed(None)

    def send_alert(self, subject: str, text: str) -> Deferred[None]:
        """Log the admin alert as a warning; fires with None."""
        self._log.warn("Alert: {subject}: {text}", subject=subject, text=text)
        return defer.succeed(None)
