"""Log lines: formatting, secret-named fields, batching on the clock."""

import io
import json

import pytest
from twisted.internet import task
from twisted.logger import LogLevel, formatEvent

from mfaserver.logs import FLUSH_SECONDS, BufferedWriter, _FormatCache, json_observer, text_observer


def event(fmt, level=LogLevel.info, **fields):
    return dict(log_format=fmt, log_level=level, log_namespace="mfaserver.test",
                log_time=1_700_000_000.0, **fields)


@pytest.mark.parametrize("fmt, fields", [
    ("{outcome} {user} from {client}: {reason}",
     dict(outcome="accept", user="alice", client="vpn", reason="ok")),
    ("no fields at all", {}),
    ("{n:>5} padded", dict(n=3)),
    ("{obj.real} attribute", dict(obj=5)),
    ("{missing} field", {}),
    ("{{literal braces}} {x}", dict(x=1)),
])
def test_format_cache_formats_like_twisted(fmt, fields):
    e = event(fmt, **fields)
    assert _FormatCache().format(e) == formatEvent(e)


def test_info_lines_are_batched_and_warnings_flush_at_once():
    out, clock = io.StringIO(), task.Clock()
    observe = text_observer(BufferedWriter(out, clock))
    observe(event("{user} accepted", user="alice"))
    assert out.getvalue() == ""
    clock.advance(FLUSH_SECONDS)
    assert "alice accepted" in out.getvalue()
    observe(event("{user} accepted", user="bob"))
    observe(event("directory down", level=LogLevel.warn))
    lines = out.getvalue().splitlines()
    assert "bob accepted" in lines[1] and "directory down" in lines[2]
    assert "[mfaserver.test#warn]" in lines[2]


def test_json_lines_carry_fields_but_never_secret_named_ones():
    out = io.StringIO()
    observe = json_observer(BufferedWriter(out))
    observe(event("{user} ok", user="alice", reason="ok", password="hunter2", auth_token="t",
                  totp_code="123456"))
    record = json.loads(out.getvalue())
    assert record["user"] == "alice" and record["message"] == "alice ok"
    assert not {"password", "auth_token", "totp_code"} & set(record)


def test_json_lines_name_the_node_that_wrote_them():
    out = io.StringIO()
    observe = json_observer(BufferedWriter(out), node="radius-a")
    # An event field of the same name does not replace it.
    observe(event("{user} ok", user="alice", node="spoofed"))
    assert json.loads(out.getvalue())["node"] == "radius-a"
    out = io.StringIO()
    json_observer(BufferedWriter(out))(event("no node"))
    assert "node" not in json.loads(out.getvalue())


def test_minimum_level_passes_the_level_and_above_only():
    from twisted.logger import LogLevel, PredicateResult
    from mfaserver.logs import MinimumLevel
    predicate = MinimumLevel(LogLevel.info)
    assert predicate({"log_level": LogLevel.debug}) is PredicateResult.no
    for level in (LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical):
        assert predicate({"log_level": level}) is PredicateResult.maybe
    assert predicate({}) is PredicateResult.no
