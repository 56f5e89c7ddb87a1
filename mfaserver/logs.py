"""Log output for the daemon: human text or one JSON object per line, to stderr.

Events carry named fields (user, client, reason, ...). Nothing that could be a
secret is ever put in an event in the first place; as a second line of
defence, fields whose names suggest secrets are never written.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, formatEvent,
    globalLogBeginner, textFileLogObserver,
)

_NEVER_WRITTEN = ("password", "secret", "code", "state", "seed", "key", "token")


def _json_observer(out: TextIO):
    writable: dict[str, bool] = {}  # field name -> may it be written (names are few)

    def may_write(name: str) -> bool:
        allowed = writable.get(name)
        if allowed is None:
            allowed = not name.startswith("log_") and not any(
                word in name.lower() for word in _NEVER_WRITTEN)
            if len(writable) < 1000:
                writable[name] = allowed
        return allowed

    def observe(event: dict) -> None:
        record = {
            "time": event.get("log_time"),
            "level": event["log_level"].name if "log_level" in event else "info",
            "namespace": event.get("log_namespace"),
            "message": formatEvent(event),
        }
        for name, value in event.items():
            if name in record or not may_write(name):
                continue
            if value is None or isinstance(value, (str, int, float, bool)):
                record[name] = value
        if "log_failure" in event:
            record["traceback"] = event["log_failure"].getTraceback()
        # One write per line: stderr is line buffered, so this is one syscall.
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return observe


def start_logging(log_format: str = "text", out: TextIO = sys.stderr,
                  level: LogLevel = LogLevel.info) -> None:
    """Send Twisted's global log to ``out`` as text or JSON lines, from ``level`` up."""
    observer = _json_observer(out) if log_format == "json" else textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [predicate])],
                                     redirectStandardIO=False)
