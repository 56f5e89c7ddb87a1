"""The admin CLI, run through click's CliRunner against a real config and store."""

from __future__ import annotations

import base64
import functools
import sys
import types

import pytest
from click.testing import CliRunner

from cli_setup import CONFIG, NOW
from mfaserver.auth.model import AuditEntry, TokenKind
from mfaserver.cli import common, users
from mfaserver.cli.common import CliState
from mfaserver.cli.main import cli
from mfaserver.config import load_config
from mfaserver.factors import oath
from mfaserver.passwords import hash_password, verify_password
from mfaserver.store import Store

SECRET = bytes(range(1, 21))
SECRET_B32 = base64.b32encode(SECRET).decode("ascii")


@pytest.fixture(autouse=True)
def cheap_password_hashes(monkeypatch):
    """Hash at the lowest scrypt cost: the commands' logic is the same, 100 times faster."""
    monkeypatch.setattr(users, "hash_password", functools.partial(hash_password, log2_n=4))


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "mfaserver.toml"
    path.write_text(CONFIG)
    return path


class Cli:
    """Runs ``mfaserver -c CONFIG ...`` with the clock pinned at ``self.now``."""

    def __init__(self, config_path):
        self.config_path = config_path
        self.now = NOW

    def __call__(self, *args, input=None, env=None, config=True):
        prefix = ["-c", str(self.config_path)] if config else []
        state = CliState(clock=lambda: self.now)
        return CliRunner().invoke(cli, [*prefix, *args], input=input, env=env, obj=state)

    def ok(self, *args, **kwargs):
        result = self(*args, **kwargs)
        assert result.exit_code == 0, result.output
        return result

    def store(self) -> Store:
        config = load_config(self.config_path)
        return Store.open(config.database_path, config.key_path)


@pytest.fixture
def run(config_path):
    return Cli(config_path)


@pytest.fixture
def store(run):
    s = run.store()  # creates the database
    yield s
    s.close()


def assert_one_line_error(result, message, exit_code=1):
    assert result.exit_code == exit_code, result.output
    assert result.stderr.splitlines() == [f"error: {message}"]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def add_alice(run, *extra):
    run.ok("user", "add", "alice", "--password-stdin", *extra, input="s3cret pw\n")


# --- check-config, run, config path -------------------------------------------------------

def test_check_config_ok_prints_path_and_exits_0(run, config_path):
    result = run.ok("check-config")
    assert result.stdout == f"{config_path}: OK\n"


def test_check_config_prints_warnings(run, config_path):
    config_path.write_text(CONFIG.replace("0123456789abcdef0123", "short"))
    result = run.ok("check-config")
    assert result.stdout == f"{config_path}: OK\n"
    assert "warning:" in result.stderr
    assert "shorter than" in result.stderr


def test_check_config_broken_file_is_one_line_and_exit_1(run, config_path):
    config_path.write_text(CONFIG + "\n[server.typo]\nx = 1\n")
    result = run("check-config")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {config_path}")
    assert "Traceback" not in result.output


def test_check_config_missing_file_is_one_line(run, tmp_path):
    missing = tmp_path / "nope.toml"
    result = run("-c", str(missing), "check-config", config=False)
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1
    assert str(missing) in result.stderr


def test_config_path_from_environment(run, config_path):
    result = run.ok("check-config", config=False, env={"MFASERVER_CONFIG": str(config_path)})
    assert result.stdout == f"{config_path}: OK\n"


def test_explicit_config_beats_environment(run, config_path, tmp_path):
    result = run.ok("check-config", env={"MFASERVER_CONFIG": str(tmp_path / "other.toml")})
    assert result.stdout == f"{config_path}: OK\n"


def test_run_passes_config_and_log_format_and_exits_with_daemon_status(
        run, config_path, monkeypatch):
    calls = []

    def run_daemon(config, *, log_format, worker):
        calls.append((config, log_format, worker))
        return 3

    fake = types.ModuleType("mfaserver.service")
    fake.run_daemon = run_daemon
    monkeypatch.setitem(sys.modules, "mfaserver.service", fake)
    result = run("run", "--log-format", "json")
    assert result.exit_code == 3
    [(config, log_format, worker)] = calls
    assert (log_format, worker) == ("json", 0)
    assert config.database_path == load_config(config_path).database_path
    # What worker 0 starts the others with ([server] workers).
    assert run("run", "--worker", "2").exit_code == 3
    assert calls[-1][2] == 2


def test_run_refuses_unknown_log_format(run):
    assert run("run", "--log-format", "xml").exit_code == 2


# --- opening the store ----------------------------------------------------------------

def test_reading_commands_do_not_create_the_database(run, config_path):
    config = load_config(config_path)
    for args in [("user", "list"), ("log",), ("user", "show", "alice")]:
        result = run(*args)
        assert_one_line_error(result, f"database {config.database_path} does not exist")
    assert not config.database_path.exists()
    assert not config.key_path.exists()


def test_user_add_creates_the_database(run, config_path):
    add_alice(run)
    config = load_config(config_path)
    assert config.database_path.exists() and config.key_path.exists()
    assert run.ok("user", "list").stdout.splitlines()[1].startswith("alice ")


def test_key_file_problem_is_one_line(run, config_path):
    add_alice(run)
    load_config(config_path).key_path.chmod(0o644)
    result = run("user", "list")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: seed key file ")
    assert "chmod 600" in line


def test_files_created_by_root_go_to_the_state_dir_owner(tmp_path, monkeypatch):
    chowned = []
    monkeypatch.setattr(common.os, "geteuid", lambda: 0)
    monkeypatch.setattr(common.os, "stat", lambda p: types.SimpleNamespace(
        st_uid=999, st_gid=998))
    monkeypatch.setattr(common.os, "chown",
                        lambda p, uid, gid, follow_symlinks: chowned.append((p, uid, gid)))
    common.give_to_state_dir_owner(tmp_path, [tmp_path / "db", tmp_path / "key"])
    assert chowned == [(tmp_path / "db", 999, 998), (tmp_path / "key", 999, 998)]


def test_files_stay_put_when_not_root(tmp_path, monkeypatch):
    monkeypatch.setattr(common.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(common.os, "chown", lambda *a, **k: pytest.fail("chown called"))
    common.give_to_state_dir_owner(tmp_path, [tmp_path / "db"])


# --- users ---------------------------------------------------------------------------

def test_user_add_reads_password_from_stdin_and_normalises_phone(run, store):
    run.ok("user", "add", "alice", "--password-stdin", "--phone", "+1 650-253-0000",
           input="s3cret pw \nignored\n")
    info = store.get_user("alice")
    assert info.phone == "+16502530000"
    assert info.has_password
    assert info.created == NOW
    # Only the newline is stripped; the trailing space belongs to the password.
    assert verify_password("s3cret pw ", _password_hash(store, "alice"))


def _password_hash(store, name):
    # The store exposes no hash on purpose; read it for this one check.
    row = store._conn.execute("SELECT password_hash FROM users WHERE name = ?",
                              (name,)).fetchone()
    return row[0]


def test_user_add_prompts_twice_without_stdin_flag(run, store):
    result = run.ok("user", "add", "alice", input="pw1\npw1\n")
    assert "pw1" not in result.stdout
    assert verify_password("pw1", _password_hash(store, "alice"))


def test_user_add_prompt_mismatch_then_match(run, store):
    run.ok("user", "add", "alice", input="pw1\npw2\npw3\npw3\n")
    assert verify_password("pw3", _password_hash(store, "alice"))


def test_user_add_empty_password_is_an_error(run, store):
    assert_one_line_error(run("user", "add", "alice", "--password-stdin", input="\n"),
                          "empty password")
    assert store.get_user("alice") is None


def test_user_add_without_password(run, store):
    run.ok("user", "add", "bob", "--no-password")
    assert not store.get_user("bob").has_password


def test_user_add_phone_with_region(run, store):
    run.ok("user", "add", "alice", "--no-password", "--phone", "030 123456", "--region", "de")
    assert store.get_user("alice").phone == "+4930123456"


@pytest.mark.parametrize("number, reason", [
    ("650-253-0000", "no valid country code (write it as +CC...) or pass --region"),
    ("+1 000", "not a valid number"),
    ("hello", "not a phone number"),
])
def test_user_add_invalid_phone(run, store, number, reason):
    result = run("user", "add", "alice", "--password-stdin", "--phone", number, input="pw\n")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: invalid phone number {number!r}: {reason}")
    assert store.get_user("alice") is None


def test_user_add_duplicate_is_one_line_error(run, store):
    add_alice(run)
    result = run("user", "add", "alice", "--password-stdin", input="pw\n")
    assert_one_line_error(result, "user 'alice' already exists")


def test_user_list_shows_phone_status_and_counts(run, store):
    add_alice(run, "--phone", "+16502530000")
    run.ok("user", "add", "bob", "--no-password")
    run.ok("user", "block", "bob")
    run.ok("token", "add", "alice", "--type", "totp", "--no-qr")
    lines = run.ok("user", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHONE", "STATUS", "FAILURES", "TOKENS", "PASSWORD"]
    assert lines[1].split() == ["alice", "+16502530000", "active", "0", "1", "yes"]
    assert lines[2].split() == ["bob", "-", "blocked", "0", "0", "no"]


def test_user_show(run, store):
    add_alice(run, "--phone", "+16502530000")
    run.ok("token", "add", "alice", "--type", "hotp", "--serial", "FOB1", "--no-qr")
    out = run.ok("user", "show", "alice").stdout
    assert "phone:        +16502530000" in out
    assert "status:       active" in out
    assert "created:      2023-11-14T22:13:20Z" in out
    assert "FOB1" in out


def test_user_passwd_replaces_password(run, store):
    add_alice(run)
    run.ok("user", "passwd", "alice", "--password-stdin", input="new one\n")
    assert verify_password("new one", _password_hash(store, "alice"))
    run.ok("user", "passwd", "alice", input="third\nthird\n")
    assert verify_password("third", _password_hash(store, "alice"))


def test_block_and_unblock_clears_lockout(run, store):
    add_alice(run)
    run.ok("user", "block", "alice")
    assert store.get_user("alice").blocked
    store.register_failure("alice", now=NOW, threshold=1, lock_seconds=600)
    assert store.get_user("alice").locked_until == NOW + 600
    run.ok("user", "unblock", "alice")
    info = store.get_user("alice")
    assert not info.blocked
    assert info.locked_until is None
    assert info.failures == 0


def test_locked_user_shows_as_locked(run, store):
    add_alice(run)
    store.register_failure("alice", now=NOW, threshold=1, lock_seconds=600)
    lines = run.ok("user", "list").stdout.splitlines()
    assert "locked until 2023-11-14T22:23:20Z" in lines[1]


def test_user_delete_asks_for_confirmation(run, store, monkeypatch):
    add_alice(run)
    result = run("user", "delete", "alice", input="y\n")   # not a terminal: not asked
    assert result.exit_code == 1
    assert ("error: Delete user alice and 0 token(s)? Standard input is not a terminal, so"
            " nobody can answer: add --yes to confirm.") in result.output
    assert store.get_user("alice") is not None
    monkeypatch.setattr(common, "stdin_is_terminal", lambda: True)
    result = run("user", "delete", "alice", input="n\n")
    assert result.exit_code == 1
    assert store.get_user("alice") is not None
    run.ok("user", "delete", "alice", input="y\n")
    assert store.get_user("alice") is None


def test_user_delete_yes_skips_confirmation(run, store):
    add_alice(run)
    run.ok("user", "delete", "alice", "--yes")
    assert store.get_user("alice") is None


def test_user_set_phone_and_clear(run, store):
    add_alice(run)
    run.ok("user", "set-phone", "alice", "+49 30 123456")
    assert store.get_user("alice").phone == "+4930123456"
    run.ok("user", "set-phone", "alice", "--clear")
    assert store.get_user("alice").phone is None
    assert run("user", "set-phone", "alice").exit_code == 2


@pytest.mark.parametrize("args", [
    ("user", "show", "bob"),
    ("user", "passwd", "bob", "--password-stdin"),
    ("user", "block", "bob"),
    ("user", "unblock", "bob"),
    ("user", "delete", "bob", "--yes"),
    ("user", "set-phone", "bob", "+16502530000"),
    ("token", "add", "bob", "--type", "totp"),
    ("token", "list", "bob"),
    ("token", "delete", "bob", "X"),
    ("token", "resync", "bob", "123456", "654321"),
    ("token", "assign", "bob", "X"),
    ("bypass", "bob", "--minutes", "5"),
])
def test_unknown_user_is_one_line_error(run, store, args):
    assert_one_line_error(run(*args, input="pw\n"), "no such user 'bob'")


# --- tokens ---------------------------------------------------------------------------

def test_token_add_generates_secret_and_prints_uri_and_qr(run, store):
    add_alice(run)
    out = run.ok("token", "add", "alice", "--type", "totp").stdout
    [token] = store.list_tokens("alice")
    assert token.kind is TokenKind.TOTP
    assert len(token.secret) == 20
    secret_b32 = base64.b32encode(token.secret).decode().rstrip("=")
    assert f"serial: {token.serial}\n" in out
    assert oath.otpauth_uri(token, issuer="mfaserver", account="alice") in out
    assert "▀" in out or "█" in out  # the QR code

    listing = run.ok("token", "list", "alice").stdout
    assert token.serial in listing
    assert secret_b32 not in listing
    assert secret_b32 not in run.ok("user", "show", "alice").stdout


def test_token_add_with_given_secret_and_options(run, store):
    add_alice(run)
    out = run.ok("token", "add", "alice", "--type", "hotp", "--secret", SECRET_B32.lower(),
                 "--digits", "8", "--algorithm", "sha256", "--counter", "7",
                 "--serial", "FOB-1", "--no-qr").stdout
    [token] = store.list_tokens("alice")
    assert (token.serial, token.secret, token.digits, token.algorithm, token.counter) == (
        "FOB-1", SECRET, 8, "sha256", 7)
    assert "otpauth://hotp/mfaserver:alice?" in out
    assert "counter=7" in out
    assert "█" not in out and "▀" not in out

    listing = run.ok("token", "list", "alice").stdout.splitlines()
    assert listing[1].split() == ["FOB-1", "hotp", "alice", "8", "counter=7", "sha256"]
    assert SECRET_B32.rstrip("=") not in "\n".join(listing)


def test_token_add_secret_from_stdin(run, store):
    add_alice(run)
    run.ok("token", "add", "alice", "--type", "totp", "--secret", "-", "--period", "60",
           "--no-qr", input=SECRET_B32 + "\n")
    [token] = store.list_tokens("alice")
    assert (token.secret, token.period) == (SECRET, 60)


def test_token_add_bad_secret_is_one_line_and_does_not_echo_it(run, store):
    add_alice(run)
    result = run("token", "add", "alice", "--type", "totp", "--secret", "NOTBASE32!!")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: invalid --secret: ")
    assert "NOTBASE32" not in result.output
    assert store.list_tokens("alice") == []


def test_token_add_short_secret_refused(run, store):
    add_alice(run)
    result = run("token", "add", "alice", "--type", "totp", "--secret", "JBSWY3DPEHPK3PXP")
    assert result.exit_code == 1
    assert "at least 128 bits" in result.stderr


def test_token_add_counter_on_totp_is_a_usage_error(run, store):
    add_alice(run)
    assert run("token", "add", "alice", "--type", "totp", "--counter", "3").exit_code == 2
    assert run("token", "add", "alice", "--type", "hotp", "--period", "60").exit_code == 2


def test_token_delete(run, store):
    add_alice(run)
    run.ok("token", "add", "alice", "--type", "totp", "--serial", "T1", "--no-qr")
    run.ok("token", "delete", "alice", "T1")
    assert store.list_tokens("alice") == []
    assert_one_line_error(run("token", "delete", "alice", "T1"),
                          "no token 'T1' for user 'alice'")


def test_token_resync_hotp(run, store):
    add_alice(run)
    run.ok("token", "add", "alice", "--type", "totp", "--serial", "APP", "--no-qr")
    run.ok("token", "add", "alice", "--type", "hotp", "--secret", SECRET_B32,
           "--serial", "FOB", "--no-qr")
    code1, code2 = oath.hotp(SECRET, 500), oath.hotp(SECRET, 501)
    out = run.ok("token", "resync", "alice", code1, code2).stdout
    assert "FOB" in out
    fob = [t for t in store.list_tokens("alice") if t.serial == "FOB"][0]
    assert fob.counter == 502


def test_token_resync_totp_learns_drift(run, store):
    add_alice(run)
    run.ok("token", "add", "alice", "--type", "totp", "--secret", SECRET_B32,
           "--serial", "APP", "--no-qr")
    step = oath.totp_step(NOW) + 5
    out = run.ok("token", "resync", "alice", oath.hotp(SECRET, step),
                 oath.hotp(SECRET, step + 1), "--serial", "APP").stdout
    assert "drift +5" in out
    [token] = store.list_tokens("alice")
    assert (token.drift, token.last_step) == (5, step + 1)


def test_token_resync_no_match_is_an_error(run, store):
    add_alice(run)
    run.ok("token", "add", "alice", "--type", "hotp", "--secret", SECRET_B32, "--no-qr")
    wrong = "000000" if oath.hotp(SECRET, 0) != "000000" else "111111"
    assert_one_line_error(run("token", "resync", "alice", wrong, wrong),
                          "the codes match no token of 'alice'")
    [token] = store.list_tokens("alice")
    assert token.counter == 0


def test_token_resync_without_tokens_or_with_unknown_serial(run, store):
    add_alice(run)
    assert_one_line_error(run("token", "resync", "alice", "123456", "654321"),
                          "user 'alice' has no tokens")
    assert_one_line_error(run("token", "resync", "alice", "1", "2", "--serial", "X"),
                          "user 'alice' has no token 'X'")


def write_csv(tmp_path, *rows):
    path = tmp_path / "tokens.csv"
    path.write_text("serial,type,secret,digits,period,counter,algorithm,user\n"
                    + "".join(row + "\n" for row in rows))
    return path


def test_token_import_csv(run, store, tmp_path):
    add_alice(run)
    run.ok("user", "add", "bob", "--no-password")
    path = write_csv(
        tmp_path,
        f"T1,totp,{SECRET_B32},6,30,,sha1,alice",
        f"H1,hotp,hex:{SECRET.hex()},8,,5,sha1,",
        f"H2,hotp,{SECRET_B32},6,,,sha1,",
    )
    out = run.ok("token", "import", str(path)).stdout
    assert out == "imported 3 tokens (2 unassigned)\n"
    [t1] = store.list_tokens("alice")
    assert (t1.serial, t1.secret) == ("T1", SECRET)
    assert [t.serial for t in store.list_unassigned_tokens()] == ["H1", "H2"]

    listing = run.ok("token", "list", "--unassigned").stdout
    assert "H1" in listing and "counter=5" in listing

    run.ok("token", "assign", "bob", "H1")
    [h1] = store.list_tokens("bob")
    assert (h1.serial, h1.digits, h1.counter) == ("H1", 8, 5)


def test_token_import_default_user(run, store, tmp_path):
    add_alice(run)
    path = write_csv(tmp_path, f"T1,totp,{SECRET_B32},6,30,,sha1,")
    out = run.ok("token", "import", str(path), "--user", "alice").stdout
    assert out == "imported 1 tokens (0 unassigned)\n"
    assert [t.serial for t in store.list_tokens("alice")] == ["T1"]


def test_token_import_is_all_or_nothing(run, store, tmp_path):
    add_alice(run)
    run.ok("token", "add", "alice", "--type", "totp", "--serial", "T2", "--no-qr")
    path = write_csv(
        tmp_path,
        f"T1,totp,{SECRET_B32},6,30,,sha1,",
        f"T2,totp,{SECRET_B32},6,30,,sha1,",
    )
    assert_one_line_error(run("token", "import", str(path)),
                          f"{path}: token 'T2' already exists")
    assert store.list_unassigned_tokens() == []

    path = write_csv(tmp_path, f"T3,totp,{SECRET_B32},6,30,,sha1,carol")
    assert_one_line_error(run("token", "import", str(path)), "no such user 'carol'")
    assert store.list_unassigned_tokens() == []


def test_token_import_rolls_back_when_the_store_refuses_a_token(run, store, tmp_path):
    # The importer allows periods the store refuses: the second add fails.
    path = write_csv(
        tmp_path,
        f"T1,totp,{SECRET_B32},6,30,,sha1,",
        f"T2,totp,{SECRET_B32},6,3600,,sha1,",
    )
    result = run("token", "import", str(path))
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {path}: adding token T2 failed: ")
    assert line.endswith("nothing imported")
    assert store.list_unassigned_tokens() == []


def test_token_import_bad_file_is_one_line(run, store, tmp_path):
    path = write_csv(tmp_path, "T1,totp,notasecret!,6,30,,sha1,")
    result = run("token", "import", str(path))
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: {path}")
    assert_one_line_error(run("token", "import", str(path), "--psk", "zz"),
                          "invalid --psk: not hexadecimal")


def test_token_assign_refuses_assigned_token(run, store):
    add_alice(run)
    run.ok("user", "add", "bob", "--no-password")
    run.ok("token", "add", "alice", "--type", "totp", "--serial", "T1", "--no-qr")
    assert_one_line_error(run("token", "assign", "bob", "T1"),
                          "token 'T1' is already assigned to user 'alice'")


# --- bypass and log -----------------------------------------------------------------------

def test_bypass_is_stored_with_expiry(run, store):
    add_alice(run)
    out = run.ok("bypass", "alice", "--minutes", "15").stdout
    assert out == ("bypass for alice: next login within 15 minutes "
                   "passes on the password alone\n")
    assert store.consume_bypass("alice", now=NOW + 15 * 60 - 1)


def test_bypass_expires(run, store):
    add_alice(run)
    run.ok("bypass", "alice", "--minutes", "1")
    assert not store.consume_bypass("alice", now=NOW + 61)


@pytest.mark.parametrize("minutes", ["0", "1441", "x"])
def test_bypass_minutes_out_of_range(run, store, minutes):
    add_alice(run)
    assert run("bypass", "alice", "--minutes", minutes).exit_code == 2


def audit(time, user, outcome="accept", reason="ok", **kw):
    values = dict(client="vpn", nas_ip="10.0.0.1", calling_station_id="203.0.113.9",
                  factor="totp")
    values.update(kw)
    return AuditEntry(time=time, user=user, outcome=outcome, reason=reason, **values)


def test_log_newest_first_one_line_each(run, store):
    store.record_audit(audit(NOW, "alice"))
    store.record_audit(audit(NOW + 60, "bob", "reject", "bad_code", nas_ip=None))
    store.record_audit(audit(NOW + 30, "alice", "challenge", "challenge_issued",
                             calling_station_id=None, factor=""))
    lines = run.ok("log").stdout.splitlines()
    assert lines == [
        "2023-11-14T22:14:20Z reject bob vpn - 203.0.113.9 totp bad_code",
        "2023-11-14T22:13:50Z challenge alice vpn 10.0.0.1 - - challenge_issued",
        "2023-11-14T22:13:20Z accept alice vpn 10.0.0.1 203.0.113.9 totp ok",
    ]


def test_log_user_and_limit(run, store):
    for i in range(30):
        store.record_audit(audit(NOW + i, "alice" if i % 2 else "bob"))
    assert len(run.ok("log").stdout.splitlines()) == 20
    lines = run.ok("log", "--user", "alice", "--limit", "3").stdout.splitlines()
    assert [line.split()[2] for line in lines] == ["alice"] * 3
    assert lines[0].startswith("2023-11-14T22:13:49Z")
    assert run("log", "--limit", "0").exit_code == 2


def test_log_escapes_hostile_values(run, store):
    store.record_audit(audit(NOW, "eve\nforged line\x1b[2J", outcome="reject",
                             reason="unknown_user"))
    [line] = run.ok("log").stdout.splitlines()
    assert "\x1b" not in line
    assert "eve\\nforged\\x20line\\x1b[2J" in line


# --- user invite (the self-service portal's first enrollment) ---

PORTAL_CONFIG = CONFIG + """
[web]
public_url = "https://mfa.example.org:8443/"

[portal]
invite_hours = 48
"""


@pytest.fixture
def portal_run(tmp_path):
    path = tmp_path / "portal.toml"
    path.write_text(PORTAL_CONFIG)
    cli_run = Cli(path)
    cli_run.ok("user", "add", "alice", "--no-password")
    return cli_run


def _invite_token(output: str) -> str:
    url = output.splitlines()[0]
    prefix = "https://mfa.example.org:8443/portal/invite/"
    assert url.startswith(prefix), output
    return url[len(prefix):]


def test_user_invite_prints_a_one_time_link_and_its_qr_and_stores_only_the_digest(portal_run):
    from mfaserver.factors.push_protocol import token_digest
    from mfaserver.store import UnknownInvite

    result = portal_run.ok("user", "invite", "alice")
    token = _invite_token(result.stdout)
    assert "▀" in result.stdout or "█" in result.stdout            # the QR code
    assert "valid once, until 2023-11-16T22:13:20Z, for user alice" in result.stdout
    store = portal_run.store()
    try:
        assert store.invite_user(token_digest(token), now=NOW) == "alice"
        with pytest.raises(UnknownInvite):                          # not the token itself
            store.invite_user(token, now=NOW)
        assert store.use_invite(token_digest(token), now=NOW) == "alice"
    finally:
        store.close()


def test_user_invite_hours_and_no_qr(portal_run):
    from mfaserver.factors.push_protocol import token_digest
    from mfaserver.store import InviteExpired

    result = portal_run.ok("user", "invite", "alice", "--hours", "2", "--no-qr")
    assert len(result.stdout.splitlines()) == 2
    assert "until 2023-11-15T00:13:20Z" in result.stdout
    store = portal_run.store()
    try:
        with pytest.raises(InviteExpired):
            store.invite_user(token_digest(_invite_token(result.stdout)), now=NOW + 7201)
    finally:
        store.close()
    assert portal_run("user", "invite", "alice", "--hours", "0.5").exit_code == 2


def test_user_invite_needs_the_portal_and_a_known_user(run, store, portal_run):
    assert_one_line_error(run("user", "invite", "alice"),
                          "invites are for the self-service portal: add a [portal] section")
    assert_one_line_error(portal_run("user", "invite", "nobody"), "no such user 'nobody'")


def test_user_invite_warns_about_a_user_who_has_a_factor_already(portal_run):
    portal_run.ok("token", "add", "alice", "--type", "totp", "--no-qr")
    result = portal_run.ok("user", "invite", "alice", "--no-qr")
    assert "has a second factor already" in result.stderr
