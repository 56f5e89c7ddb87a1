"""Log output for the daemon: human text or one JSON object per line, to stderr.

Events carry named fields (user, client, reason, ...). Nothing that could be a
secret is ever put in an event in the first place; as a second line of
defence, fields whose names suggest secrets are never written to JSON.

One decision is one log line, so logging is on the hot path. Lines are
gathered and written at most every `FLUSH_SECONDS` (a write per line cost
more than deciding a TOTP login); warnings and errors are written at once,
and everything is flushed when the daemon stops.
"""

from __future__ import annotations

import json
import string
import sys
import time
from typing import TextIO

from twisted.logger import (
    FilteringLogObserver, LogLevel, PredicateResult, formatEvent, globalLogBeginner,
)

_NEVER_WRITTEN = ("password", "secret", "code", "state", "seed", "key", "token")
FLUSH_SECONDS = 0.2


class _FormatCache:
    """Formats ``log_format`` strings like `twisted.logger.formatEvent`, faster.

    The common case, plain ``{name}`` fields, is parsed once per format string;
    anything fancier (attribute access, calls, format specs) goes to Twisted.
    """

    def __init__(self, size: int = 512):
        self._size = size
        self._plans: dict[str, list | None] = {}

    def format(self, event: dict) -> str:
        fmt = event.get("log_format")
        if fmt is None or "log_failure" in event:
            return formatEvent(event)
        plan = self._plans.get(fmt, False)
        if plan is False:
            plan = self._plan(fmt)
            if len(self._plans) < self._size:
                self._plans[fmt] = plan
        if plan is None:
            return formatEvent(event)
        try:
            return "".join(piece if is_text else str(event[piece]) for is_text, piece in plan)
        except KeyError:
            return formatEvent(event)

    @staticmethod
    def _plan(fmt: str) -> list | None:
        plan = []
        try:
            for literal, name, spec, conversion in string.Formatter().parse(fmt):
                if literal:
                    plan.append((True, literal))
                if name is None:
                    continue
                if spec or conversion or not name.isidentifier():
                    return None
                plan.append((False, name))
        except ValueError:
            return None
        return plan


class BufferedWriter:
    """Collects log lines and writes them in batches on the reactor clock."""

    def __init__(self, out: TextIO, clock=None):
        self._out = out
        self._clock = clock
        self._lines: list[str] = []
        self._call = None

    def write(self, line: str, urgent: bool = False) -> None:
        self._lines.append(line)
        if urgent or self._clock is None or not getattr(self._clock, "running", True):
            self.flush()
        elif self._call is None:
            self._call = self._clock.callLater(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._lines:
            lines, self._lines = self._lines, []
            self._out.write("".join(lines))
            self._out.flush()


class _TimeFormat:
    """ISO 8601 local time with offset, formatted once per second."""

    def __init__(self):
        self._second = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        when = time.time() if when is None else when
        second = int(when)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        return self._text


def _urgent(event: dict) -> bool:
    level = event.get("log_level")
    return level is not None and level >= LogLevel.warn


def text_observer(writer: BufferedWriter):
    formats = _FormatCache()
    timestamp = _TimeFormat()

    def observe(event: dict) -> None:
        level = event["log_level"].name if "log_level" in event else "info"
        text = formats.format(event)
        if "log_failure" in event:
            text += "\n" + event["log_failure"].getTraceback()
        line = (f"{timestamp(event.get('log_time'))} "
                f"[{event.get('log_namespace', '-')}#{level}] {text}\n")
        writer.write(line, urgent=_urgent(event))
    return observe


def json_observer(writer: BufferedWriter, node: str | None = None):
    """JSON lines; with ``node`` ([cluster] node_name), every line says which node wrote it."""
    formats = _FormatCache()
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
            "message": formats.format(event),
        }
        if node is not None:
            record["node"] = node
        for name, value in event.items():
            if name in record or not may_write(name):
                continue
            if value is None or isinstance(value, (str, int, float, bool)):
                record[name] = value
        if "log_failure" in event:
            record["traceback"] = event["log_failure"].getTraceback()
        writer.write(json.dumps(record, ensure_ascii=False) + "\n", urgent=_urgent(event))
    return observe


def start_logging(log_format: str = "text", out: TextIO = sys.stderr, clock=None,
                  level: LogLevel = LogLevel.info, node: str | None = None) -> BufferedWriter:
    """Send Twisted's global log to ``out`` as text or JSON lines, from ``level`` up.

    With a ``clock`` (the reactor), info lines are batched; call the returned
    writer's ``flush()`` at shutdown. JSON lines carry ``node``; text lines do not
    (journald and syslog stamp the host already).
    """
    writer = BufferedWriter(out, clock)
    observer = (json_observer(writer, node) if log_format == "json"
                else text_observer(writer))
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [MinimumLevel(level)])],
                                     redirectStandardIO=False)
    return writer


class MinimumLevel:
    """Pass events of ``level`` and above: Twisted's LogLevelFilterPredicate
    does the same with a per-namespace lookup on every event, which costs
    more than we want to pay on every decision; we never set levels by
    namespace."""

    def __init__(self, level: LogLevel):
        levels = list(LogLevel.iterconstants())  # debug, info, warn, error, critical
        self._passed = frozenset(levels[levels.index(level):])

    def __call__(self, event: dict) -> PredicateResult:
        if event.get("log_level") in self._passed:
            return PredicateResult.maybe
        return PredicateResult.no
