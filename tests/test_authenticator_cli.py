"""The reference authenticator (``mfaserver authenticator ...``) against a strict device server.

`device_server.DeviceServer` checks every request by the rules of
docs/device-api.rst. The CLI reaches it through `device_server.MemoryNetwork`
(put in ``ctx.meta[CONNECT]``), so these tests open no socket; both sides
read a pinned clock. tests/integration/test_authenticator_tls.py runs the
same server behind real HTTPS.
"""

from __future__ import annotations

import json
import os
import stat

import click
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from device_server import TOKEN, DeviceServer, MemoryNetwork, error
from mfaserver.cli import common
from mfaserver.cli.authenticator import CONNECT, authenticator
from mfaserver.cli.common import CliState
from mfaserver.factors import push_protocol as pp

NOW = 1_700_000_000
TXID = "T0pQ9rS8uV7wX6yZ5aB4cA"
OTHER_TXID = "U1qR0sT9vW8xY7zA6bC5dB"


def transaction(txid=TXID, number="42", station="203.0.113.7", client="vpn"):
    return {"txid": txid, "user": "alice", "client": client, "nas_ip": "192.0.2.10",
            "calling_station_id": station, "created": NOW - 2, "expires": 1_700_000_058,
            "number": number}


class Cli:
    """Runs ``mfaserver authenticator ...`` on ``network``, the clock pinned at NOW."""

    def __init__(self, network: MemoryNetwork):
        @click.group()
        @click.pass_context
        def on_network(ctx) -> None:
            ctx.meta[CONNECT] = network.connect

        on_network.add_command(authenticator)
        self._group = on_network

    def __call__(self, *args, input=None, clock=None):
        state = CliState(clock=clock or (lambda: NOW))
        return CliRunner().invoke(self._group, ["authenticator", *args], input=input,
                                  obj=state)

    def ok(self, *args, **kwargs):
        result = self(*args, **kwargs)
        assert result.exit_code == 0, result.output
        return result

    def fails(self, *args, **kwargs):
        result = self(*args, **kwargs)
        assert result.exit_code != 0, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            result.exception
        return result


@pytest.fixture
def network():
    return MemoryNetwork()


@pytest.fixture
def run(network):
    return Cli(network)


@pytest.fixture
def server(network):
    return network.serve(DeviceServer(clock=lambda: NOW))


@pytest.fixture
def store(run, server, tmp_path):
    path = tmp_path / "device.json"
    run.ok("enroll", server.enroll_url, "--store", str(path))
    return path


def stored(path) -> dict:
    return json.loads(path.read_text())


# -- enroll ------------------------------------------------------------------


def test_enroll_writes_a_0600_store_bound_to_the_enrolled_key(run, server, tmp_path):
    path = tmp_path / "device.json"
    result = run.ok("enroll", server.enroll_url, "--store", str(path))

    document = stored(path)
    (device_id,) = server.devices
    assert result.output == f"enrolled device {device_id} for user alice\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert set(document) == {"version", "base_url", "device_id", "user", "key_type",
                             "private_key", "ca_file"}
    assert document["version"] == 1
    assert document["base_url"] == server.base
    assert document["device_id"] == device_id
    assert document["user"] == "alice"
    assert document["key_type"] == "ed25519"
    assert document["ca_file"] is None
    assert document["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(document["private_key"].encode(), None)
    assert pp.public_key_text(key) == pp.public_key_text(server.devices[device_id])
    assert "notify" not in server.requests[0]["body"]


def test_enroll_refuses_to_overwrite_a_store_and_keeps_the_token(run, server, store):
    before = store.read_bytes()
    result = run.fails("enroll", server.enroll_url, "--store", str(store))
    assert "already exists" in result.output
    assert store.read_bytes() == before
    assert len(server.requests) == 1  # only the first enrollment reached the server


def test_enroll_into_a_missing_directory_fails_before_using_the_token(run, server, tmp_path):
    result = run.fails("enroll", server.enroll_url, "--store", str(tmp_path / "no" / "d.json"))
    assert "cannot create store" in result.output
    assert server.requests == [] and server.tokens


def test_enroll_with_a_p256_key_works_end_to_end(run, server, tmp_path):
    path = tmp_path / "device.json"
    run.ok("enroll", server.enroll_url, "--store", str(path), "--key-type", "p256")
    assert stored(path)["key_type"] == "p256"
    (key,) = server.devices.values()
    assert pp.public_key_text(key).startswith("p256:")

    server.transactions.append(transaction())
    assert TXID in run.ok("pending", "--store", str(path)).output
    run.ok("approve", TXID, "--store", str(path))
    assert server.answers[TXID]["decision"] == "approve"


@pytest.mark.parametrize("option, kind", [("--notify-ntfy", "ntfy"),
                                          ("--notify-webhook", "webhook")])
def test_enroll_sends_the_notify_target(run, server, tmp_path, option, kind):
    url = "https://push.example.com/7Hk2mQ9vXc4pLr8sWz1d"
    run.ok("enroll", server.enroll_url, "--store", str(tmp_path / "d.json"), option, url)
    assert server.requests[0]["body"]["notify"] == {"type": kind, "url": url}


def test_enroll_takes_only_one_notify_target(run, server, tmp_path):
    result = run("enroll", server.enroll_url, "--store", str(tmp_path / "d.json"),
                 "--notify-ntfy", "https://a.example/x", "--notify-webhook", "https://b.example/y")
    assert result.exit_code == 2
    assert server.requests == [] and not (tmp_path / "d.json").exists()


def test_enroll_refusal_is_shown_and_leaves_no_store(run, server, tmp_path):
    path = tmp_path / "d.json"
    server.fail_next = (410, error("expired", "this enrollment URL expired or was used"))
    result = run.fails("enroll", server.enroll_url, "--store", str(path))
    assert ("error: server refused: expired: this enrollment URL expired or was used"
            " (HTTP 410)") in result.output
    assert not path.exists()


def test_enroll_refuses_clear_text_http_to_another_host(run, tmp_path):
    path = tmp_path / "d.json"
    result = run.fails("enroll", f"http://192.0.2.1/v1/enroll/{TOKEN}", "--store", str(path))
    assert "http" in result.output and "loopback" in result.output
    result = run.fails("enroll", f"http://mfa.example.com/v1/enroll/{TOKEN}",
                       "--store", str(path))
    assert "refusing clear-text" in result.output
    assert not path.exists()


@pytest.mark.parametrize("url", [
    "https://mfa.example.com/enroll/abc",
    "https://mfa.example.com/v1/enroll/",
    "https://mfa.example.com/v1/enroll/a%0Ab",
    "https://mfa.example.com/v1/enroll/abc?x=1",
    "ftp://mfa.example.com/v1/enroll/abc",
])
def test_enroll_refuses_what_is_not_an_enrollment_url(run, tmp_path, url):
    run.fails("enroll", url, "--store", str(tmp_path / "d.json"))
    assert not (tmp_path / "d.json").exists()


def test_enroll_keeps_a_base_path_prefix():
    from mfaserver.cli.authenticator import parse_enrollment_url
    assert parse_enrollment_url("https://h.example:8443/mfa/v1/enroll/abc") == (
        "https://h.example:8443/mfa", "abc")


def test_connection_refused_is_one_line(run, network, tmp_path):
    server = network.serve(DeviceServer(clock=lambda: NOW))
    url = server.enroll_url
    network.stop(server)  # its port now refuses connections
    result = run.fails("enroll", url, "--store", str(tmp_path / "d.json"))
    assert result.output.startswith("error: cannot reach 127.0.0.1: ")
    assert result.output.count("\n") == 1


# -- pending -----------------------------------------------------------------


def test_pending_with_nothing_says_so(run, server, store):
    assert run.ok("pending", "--store", str(store)).output == "no pending sign-ins\n"
    request = server.requests[-1]
    assert request["method"] == "GET"
    assert request["path"] == f"/v1/devices/{stored(store)['device_id']}/transactions?wait=0"


def test_pending_prints_a_table(run, server, store):
    server.transactions += [transaction(),
                            transaction(OTHER_TXID, number=None, station=None,
                                        client="fire wall\x1b[2J")]
    lines = run.ok("pending", "--store", str(store)).output.splitlines()
    assert lines[0].split() == ["TXID", "CLIENT", "NUMBER", "USER", "CALLING-STATION",
                                "EXPIRES"]
    assert lines[1].split() == [TXID, "vpn", "42", "alice", "203.0.113.7",
                                "2023-11-14T22:14:18Z"]
    assert lines[2].split() == [OTHER_TXID, "fire", "wall\\x1b[2J", "-", "alice", "-",
                                "2023-11-14T22:14:18Z"]
    assert len(lines) == 3


def test_pending_uses_a_fresh_nonce_each_time(run, server, store):
    for _ in range(3):
        run.ok("pending", "--store", str(store))
    nonces = {r["headers"]["X-MFA-Nonce"] for r in server.requests[1:]}
    assert len(nonces) == 3


def test_pending_passes_the_wait(run, server, store):
    run.ok("pending", "--store", str(store), "--wait", "5")
    assert server.requests[-1]["path"].endswith("/transactions?wait=5")
    assert run("pending", "--store", str(store), "--wait", "31").exit_code == 2


def test_a_stale_clock_gets_a_hint(run, server, store):
    result = run.fails("pending", "--store", str(store), clock=lambda: NOW - 120)
    assert "server refused: stale_timestamp:" in result.output
    assert "(HTTP 401)" in result.output and "clock" in result.output


def test_an_error_without_json_is_shown(run, server, store):
    server.fail_next = (502, b"<html>bad gateway</html>")
    result = run.fails("pending", "--store", str(store))
    assert "server refused: Bad Gateway (HTTP 502); try again later" in result.output


def test_a_group_readable_store_is_refused(run, server, store):
    os.chmod(store, 0o640)
    result = run.fails("pending", "--store", str(store))
    assert "chmod 600" in result.output
    assert len(server.requests) == 1  # nothing signed or sent


def test_a_missing_or_broken_store_is_refused(run, server, tmp_path):
    assert "cannot open store" in run.fails("pending", "--store", str(tmp_path / "x")).output
    path = tmp_path / "bad.json"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b'{"version": 1}')
    os.close(fd)
    assert "not a valid authenticator store" in run.fails("pending", "--store", str(path)).output


# -- approve, deny, fraud ----------------------------------------------------


@pytest.mark.parametrize("decision", ["approve", "deny", "fraud"])
def test_answers_are_signed_and_recorded(run, server, store, decision):
    server.transactions.append(transaction())
    extra = ["--yes"] if decision == "fraud" else []
    result = run.ok(decision, TXID, "--store", str(store), *extra)
    assert result.output.endswith(f"{decision} sent for {TXID}\n")
    body = server.answers[TXID]
    assert body["decision"] == decision
    assert body["device_id"] == stored(store)["device_id"]
    assert "number" not in body


@pytest.mark.parametrize("decision", ["approve", "deny", "fraud"])
def test_the_number_is_sent_as_text(run, server, store, decision):
    server.transactions.append(transaction())
    extra = ["--yes"] if decision == "fraud" else []
    run.ok(decision, TXID, "--store", str(store), "--number", "42", *extra)
    assert server.answers[TXID]["number"] == "42"


def test_fraud_asks_first(run, server, store, monkeypatch):
    server.transactions.append(transaction())
    result = run("fraud", TXID, "--store", str(store))    # no terminal: --yes is needed
    assert result.exit_code == 1
    assert "Standard input is not a terminal" in result.output
    assert "add --yes to confirm" in result.output
    assert TXID not in server.answers
    monkeypatch.setattr(common, "stdin_is_terminal", lambda: True)
    result = run("fraud", TXID, "--store", str(store), input="n\n")
    assert result.exit_code != 0
    assert TXID not in server.answers
    result = run.ok("fraud", TXID, "--store", str(store), input="y\n")
    assert "blocked" in result.output
    assert server.answers[TXID]["decision"] == "fraud"


def test_a_second_answer_shows_the_servers_refusal(run, server, store):
    server.transactions.append(transaction())
    run.ok("approve", TXID, "--store", str(store))
    result = run.fails("deny", TXID, "--store", str(store))
    assert result.output == ("error: server refused: already_answered: this transaction was"
                             " already answered (HTTP 409)\n")
    assert server.answers[TXID]["decision"] == "approve"


def test_an_unknown_transaction_is_refused(run, server, store):
    result = run.fails("approve", OTHER_TXID, "--store", str(store))
    assert "server refused: not_found: no such transaction (HTTP 404)" in result.output


def test_a_bad_txid_or_number_never_reaches_the_server(run, server, store):
    assert run("approve", "../x", "--store", str(store)).exit_code == 2
    assert run("approve", TXID, "--store", str(store), "--number", "4 2").exit_code == 2
    assert run("approve", TXID, "--store", str(store), "--number", "420").exit_code == 2
    assert len(server.requests) == 1
