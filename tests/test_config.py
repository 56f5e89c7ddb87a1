"""Tests for mfaserver.config: defaults, every error path, client lookup.

Plain pytest functions rather than SynchronousTestCase: nothing here is
asynchronous, and parametrize keeps the table of error cases readable.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from mfaserver import config
from mfaserver.config import (
    DEFAULT_CONFIG_PATH, ClientConfig, ConfigError, DirectoryConfig, MfaConfig, RadiusConfig,
    find_client, load_config, resolve_config_path,
)

CONF = Path(__file__).resolve().parent.parent / "conf"
SECRET = "s3cret-that-must-never-leak"

CLIENT = f"""
[[radius.clients]]
name = "vpn"
address = "127.0.0.1"
secret = "{SECRET}"
"""


def write(tmp_path: Path, text: str, name: str = "mfaserver.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> config.Config:
    return load_config(write(tmp_path, text))


def error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert SECRET not in str(info.value)
    return info.value


# --- Defaults and happy paths ---------------------------------------------------------------

def test_minimal_file_gets_documented_defaults(tmp_path):
    cfg = load(tmp_path, CLIENT)
    assert cfg.path == tmp_path / "mfaserver.toml"
    assert cfg.server.state_dir == (tmp_path / "var").resolve()
    assert cfg.server.log_format == "text"
    assert cfg.radius.listen == "127.0.0.1"
    assert cfg.radius.port == 1812
    assert cfg.radius.reject_delay == 1.0
    assert cfg.radius.status_server is True
    assert cfg.radius.response_cache_seconds == 30.0
    assert cfg.directory.backends == ("local",)
    assert cfg.mfa == MfaConfig(delimiter=",", challenge=True, unenrolled="reject",
                                challenge_timeout=300.0, lockout_threshold=10,
                                lockout_minutes=15.0, totp_window=1, hotp_look_ahead=10)
    assert cfg.warnings == ()
    [client] = cfg.radius.clients
    assert client == ClientConfig(name="vpn", network=ipaddress.ip_network("127.0.0.1/32"),
                                  secret=SECRET.encode(), require_message_authenticator=True)


def test_dataclass_defaults_match_the_schema(tmp_path):
    # The dataclasses carry defaults for tests elsewhere; they must not drift.
    cfg = load(tmp_path, CLIENT)
    assert cfg.mfa == MfaConfig()
    assert cfg.directory == DirectoryConfig()
    assert cfg.radius == RadiusConfig(clients=cfg.radius.clients)


def test_database_and_key_paths_live_in_state_dir(tmp_path):
    cfg = load(tmp_path, '[server]\nstate_dir = "/srv/mfa"\n' + CLIENT)
    assert cfg.server.state_dir == Path("/srv/mfa")
    assert cfg.database_path == Path("/srv/mfa/mfaserver.sqlite3")
    assert cfg.key_path == Path("/srv/mfa/seed.key")


def test_relative_state_dir_resolves_against_config_folder(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path / "etc", '[server]\nstate_dir = "../state"\n' + CLIENT))
    assert cfg.server.state_dir == (tmp_path / "state").resolve()
    assert cfg.server.state_dir.is_absolute()


def test_relative_config_path_becomes_absolute(tmp_path, monkeypatch):
    write(tmp_path, CLIENT)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("mfaserver.toml")
    assert cfg.path == tmp_path / "mfaserver.toml"
    assert cfg.path.is_absolute()


def test_every_key_can_be_set(tmp_path):
    cfg = load(tmp_path, f"""
[server]
state_dir = "/srv/mfa"
log_format = "json"

[radius]
listen = "::1"
port = 11812
reject_delay = 0
status_server = false
response_cache_seconds = 60.5

[[radius.clients]]
name = "wifi.ctl-1"
address = "10.0.0.7/24"
secret = "{SECRET}"
require_message_authenticator = false

[directory]
backend = ["local"]

[mfa]
delimiter = "|"
challenge = false
unenrolled = "allow"
challenge_timeout = 30
lockout_threshold = 1
lockout_minutes = 0.5e1
totp_window = 0
hotp_look_ahead = 100
""")
    assert cfg.server.log_format == "json"
    assert cfg.radius == RadiusConfig(
        listen="::1", port=11812, reject_delay=0.0, status_server=False,
        response_cache_seconds=60.5, clients=cfg.radius.clients)
    [client] = cfg.radius.clients
    assert client.name == "wifi.ctl-1"
    assert client.network == ipaddress.ip_network("10.0.0.0/24")
    assert client.require_message_authenticator is False
    assert cfg.directory.backends == ("local",)
    assert cfg.mfa == MfaConfig(delimiter="|", challenge=False, unenrolled="allow",
                                challenge_timeout=30.0, lockout_threshold=1,
                                lockout_minutes=5.0, totp_window=0, hotp_look_ahead=100)


def test_ints_are_accepted_as_floats(tmp_path):
    cfg = load(tmp_path, "[radius]\nreject_delay = 2\n" + CLIENT)
    assert cfg.radius.reject_delay == 2.0
    assert isinstance(cfg.radius.reject_delay, float)


def test_ipv6_client_and_overlapping_networks(tmp_path):
    cfg = load(tmp_path, f"""
[[radius.clients]]
name = "lan"
address = "10.0.0.0/8"
secret = "{SECRET}"
[[radius.clients]]
name = "vpn"
address = "10.1.2.3"
secret = "{SECRET}"
[[radius.clients]]
name = "v6"
address = "2001:db8::/64"
secret = "{SECRET}"
""")
    assert [c.name for c in cfg.radius.clients] == ["lan", "vpn", "v6"]


def test_ipv4_mapped_client_address_is_stored_as_ipv4(tmp_path):
    cfg = load(tmp_path, CLIENT.replace("127.0.0.1", "::ffff:10.0.0.0/120"))
    assert cfg.radius.clients[0].network == ipaddress.ip_network("10.0.0.0/24")


def test_inline_array_of_clients_is_accepted(tmp_path):
    cfg = load(tmp_path, f"""
[radius]
clients = [{{ name = "a", address = "192.0.2.1", secret = "{SECRET}" }}]
""")
    assert cfg.radius.clients[0].name == "a"


# --- Secrets ----------------------------------------------------------------------------------

def test_secret_file_relative_to_config_folder_and_newline_stripped(tmp_path, monkeypatch):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "vpn").write_bytes(SECRET.encode() + b"\n")
    monkeypatch.chdir("/")
    cfg = load(tmp_path, CLIENT.replace(f'secret = "{SECRET}"',
                                        'secret_file = "secrets/vpn"'))
    assert cfg.radius.clients[0].secret == SECRET.encode()


def test_secret_file_absolute_path_and_crlf(tmp_path):
    secret_path = tmp_path / "elsewhere.secret"
    secret_path.write_bytes(SECRET.encode() + b"\r\n")
    cfg = load(tmp_path, CLIENT.replace(f'secret = "{SECRET}"',
                                        f'secret_file = "{secret_path}"'))
    assert cfg.radius.clients[0].secret == SECRET.encode()


def test_short_secret_is_accepted_with_a_warning(tmp_path):
    cfg = load(tmp_path, CLIENT.replace(SECRET, "tiny-pw"))
    assert cfg.radius.clients[0].secret == b"tiny-pw"
    [warning] = cfg.warnings
    assert warning.startswith(f"{tmp_path / 'mfaserver.toml'}: radius.clients[0].secret: ")
    assert "16 bytes" in warning
    assert "tiny-pw" not in warning


def test_secret_is_not_in_repr(tmp_path):
    cfg = load(tmp_path, CLIENT)
    assert SECRET not in repr(cfg)
    assert SECRET not in str(cfg)
    assert repr(SECRET.encode()) not in repr(cfg.radius.clients)


@pytest.mark.parametrize("text, key", [
    ('[server]\nlog_format = "xml"\n' + CLIENT, "server.log_format"),
    (CLIENT + 'bogus = 1\n', "radius.clients[0].bogus"),
    (CLIENT + 'secret_file = "nope"\n', "radius.clients[0]"),
    (CLIENT + CLIENT, "radius.clients[1].name"),
    (CLIENT + "[mfa]\ndelimeter = ':'\n", "mfa.delimeter"),
])
def test_secret_never_appears_in_errors(tmp_path, text, key):
    # error() itself asserts the secret is absent.
    assert error(tmp_path, text).key == key


# --- Error paths ------------------------------------------------------------------------------

def client_with(**keys: str) -> str:
    """A client block with some keys replaced (value None removes the key)."""
    values = {"name": '"vpn"', "address": '"127.0.0.1"', "secret": f'"{SECRET}"'}
    values.update(keys)
    lines = [f"{k} = {v}" for k, v in values.items() if v is not None]
    return "[[radius.clients]]\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, key, message", [
    # unknown keys
    ("colour = 1\n" + CLIENT, "colour", "unknown key"),
    ("[metrics]\nport = 8080\n" + CLIENT, "metrics", "unknown key"),
    ("[mfa]\ndelimeter = ':'\n" + CLIENT, "mfa.delimeter",
     "unknown key (did you mean 'delimiter'?)"),
    ("[radius]\nlisten_port = 1\n" + CLIENT, "radius.listen_port", "unknown key"),
    (client_with(colour='"red"'), "radius.clients[0].colour", "unknown key"),
    # wrong types
    ("[radius]\nport = true\n" + CLIENT, "radius.port", "expected an integer, got a boolean"),
    ("[radius]\nport = 1812.0\n" + CLIENT, "radius.port", "expected an integer, got a float"),
    ('[radius]\nport = "1812"\n' + CLIENT, "radius.port", "expected an integer, got a string"),
    ("[radius]\nreject_delay = true\n" + CLIENT, "radius.reject_delay",
     "expected a number, got a boolean"),
    ("[radius]\nstatus_server = 1\n" + CLIENT, "radius.status_server",
     "expected a boolean (true or false), got an integer"),
    ('[mfa]\nchallenge = "yes"\n' + CLIENT, "mfa.challenge",
     "expected a boolean (true or false), got a string"),
    ("[server]\nstate_dir = 1979-05-27\n" + CLIENT, "server.state_dir",
     "expected a string, got a date/time"),
    ("server = 5\n" + CLIENT, "server", "expected a table, got an integer"),
    ("[radius.clients]\nname = 'x'\n", "radius.clients",
     "expected an array of tables ([[radius.clients]]), got a table"),
    ("[radius]\nclients = [1]\n", "radius.clients[0]", "expected a table, got an integer"),
    ("[directory]\nbackend = 1\n" + CLIENT, "directory.backend",
     "expected a string or an array of strings, got an integer"),
    ("[directory]\nbackend = ['local', 2]\n" + CLIENT, "directory.backend",
     "expected a string or an array of strings, got an integer"),
    (client_with(secret="123"), "radius.clients[0].secret", "expected a string, got an integer"),
    (client_with(require_message_authenticator='"no"'),
     "radius.clients[0].require_message_authenticator", "expected a boolean"),
    # out of range and bad values
    ("[radius]\nport = 0\n" + CLIENT, "radius.port", "0 is out of range (1..65535)"),
    ("[radius]\nport = 65536\n" + CLIENT, "radius.port", "65536 is out of range (1..65535)"),
    ("[radius]\nreject_delay = 10.5\n" + CLIENT, "radius.reject_delay", "out of range (0..10)"),
    ("[radius]\nreject_delay = nan\n" + CLIENT, "radius.reject_delay", "out of range (0..10)"),
    ("[radius]\nresponse_cache_seconds = 4\n" + CLIENT, "radius.response_cache_seconds",
     "out of range (5..120)"),
    ('[radius]\nlisten = "localhost"\n' + CLIENT, "radius.listen",
     "'localhost' is not an IP address"),
    ('[server]\nstate_dir = ""\n' + CLIENT, "server.state_dir", "must not be empty"),
    ("[mfa]\nchallenge_timeout = 901\n" + CLIENT, "mfa.challenge_timeout", "(30..900)"),
    ("[mfa]\nlockout_threshold = 0\n" + CLIENT, "mfa.lockout_threshold", "(1..100)"),
    ("[mfa]\nlockout_minutes = 1441\n" + CLIENT, "mfa.lockout_minutes", "(1..1440)"),
    ("[mfa]\ntotp_window = 6\n" + CLIENT, "mfa.totp_window", "(0..5)"),
    ("[mfa]\nhotp_look_ahead = 0\n" + CLIENT, "mfa.hotp_look_ahead", "(1..100)"),
    ('[mfa]\nunenrolled = "maybe"\n' + CLIENT, "mfa.unenrolled",
     "'maybe' is not one of: reject, allow"),
    ('[mfa]\ndelimiter = "7"\n' + CLIENT, "mfa.delimiter", "exactly one character"),
    ('[mfa]\ndelimiter = ",,"\n' + CLIENT, "mfa.delimiter", "exactly one character"),
    ('[mfa]\ndelimiter = ""\n' + CLIENT, "mfa.delimiter", "exactly one character"),
    ('[directory]\nbackend = "kerberos"\n' + CLIENT, "directory.backend",
     "'kerberos' is not one of: local, ldap, radius"),
    ("[directory]\nbackend = []\n" + CLIENT, "directory.backend", "at least one backend"),
    ('[directory]\nbackend = ["local", "local"]\n' + CLIENT, "directory.backend",
     "listed twice"),
    # clients
    ("", "radius.clients", "at least 1 [[radius.clients]] entry is required"),
    ("[radius]\nclients = []\n", "radius.clients", "at least 1 [[radius.clients]]"),
    (client_with(address='"10.0.0.300"'), "radius.clients[0].address",
     "'10.0.0.300' is not an IP address or CIDR block"),
    (client_with(address='"10.0.0.0/33"'), "radius.clients[0].address",
     "is not an IP address or CIDR block"),
    (client_with(address=None), "radius.clients[0].address", "required key is missing"),
    (client_with(name=None), "radius.clients[0].name", "required key is missing"),
    (client_with(name='"has space"'), "radius.clients[0].name", "is not a valid name"),
    (client_with(name='"' + "x" * 65 + '"'), "radius.clients[0].name", "is not a valid name"),
    (client_with(secret='""'), "radius.clients[0].secret", "must not be empty"),
    (client_with(secret=None), "radius.clients[0]", "secret or secret_file is required"),
    (client_with(secret_file='"x"'), "radius.clients[0]", "set secret or secret_file, not both"),
    (client_with(secret=None, secret_file='""'), "radius.clients[0].secret_file",
     "must not be empty"),
    (client_with(secret=None, secret_file='"missing.secret"'), "radius.clients[0].secret_file",
     "cannot read"),
    (CLIENT + client_with(address='"10.9.9.9"'), "radius.clients[1].name",
     "duplicate name 'vpn' (also radius.clients[0])"),
    (CLIENT + client_with(name='"other"', address='"127.0.0.1/32"'),
     "radius.clients[1].address", "127.0.0.1/32 is the same network as client 'vpn'"),
    (client_with(address='"10.0.0.0/24"') + client_with(name='"b"', address='"10.0.0.9/24"'),
     "radius.clients[1].address", "10.0.0.0/24 is the same network as client 'vpn'"),
])
def test_bad_value_names_file_and_key(tmp_path, text, key, message):
    e = error(tmp_path, text)
    assert e.key == key
    assert e.path == tmp_path / "mfaserver.toml"
    assert str(e).startswith(f"{tmp_path / 'mfaserver.toml'}: {key}: ")
    assert message in e.message


def test_empty_secret_file_is_an_error(tmp_path):
    (tmp_path / "empty.secret").write_text("\n")
    e = error(tmp_path, client_with(secret=None, secret_file='"empty.secret"'))
    assert e.key == "radius.clients[0].secret_file"
    assert e.message == f"{str(tmp_path / 'empty.secret')!r} is empty"


def test_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read the file: ")
    assert info.value.key is None


def test_directory_instead_of_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path)


def test_toml_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path, CLIENT + f'\n[mfa]\nchallenge = yes "{SECRET}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert re.search(r"line 8, column \d+", message)
    assert SECRET not in message


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "mfaserver.toml"
    path.write_bytes(b"# \xff\n" + CLIENT.encode())
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


# --- The schema machinery ---------------------------------------------------------------------

def test_optional_table_is_none_when_absent_and_checked_when_present():
    # Later sections such as [directory.ldap] are declared this way.
    schema = config.Table({
        "ldap": config.Table({"url": config.string()}, optional=True),
        "items": config.TableArray(config.Table({"n": config.integer(1, 0, 9)})),
    })
    assert schema.parse({}, "") == {"ldap": None, "items": ()}
    assert schema.parse({"ldap": {"url": "x"}, "items": [{}]}, "") == {
        "ldap": {"url": "x"}, "items": ({"n": 1},)}
    with pytest.raises(config._Problem) as info:
        schema.parse({"ldap": {}}, "")
    assert (info.value.key, info.value.message) == ("ldap.url", "required key is missing")


# --- resolve_config_path ------------------------------------------------------------------------

def test_explicit_path_wins():
    env = {"MFASERVER_CONFIG": "/from/env.toml"}
    assert resolve_config_path("/explicit.toml", env) == Path("/explicit.toml")
    assert resolve_config_path(Path("rel.toml"), env) == Path("rel.toml")


def test_environment_variable_used_without_explicit_path():
    env = {"MFASERVER_CONFIG": "/from/env.toml"}
    assert resolve_config_path(None, env) == Path("/from/env.toml")


def test_default_path_without_explicit_or_environment():
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH
    assert DEFAULT_CONFIG_PATH == Path("/etc/mfaserver/mfaserver.toml")


def test_empty_values_count_as_not_given():
    assert resolve_config_path("", {"MFASERVER_CONFIG": ""}) == DEFAULT_CONFIG_PATH
    assert resolve_config_path("", {"MFASERVER_CONFIG": "/e.toml"}) == Path("/e.toml")


# --- find_client --------------------------------------------------------------------------------

def client(name: str, address: str) -> ClientConfig:
    return ClientConfig(name=name, network=ipaddress.ip_network(address, strict=False),
                        secret=b"x" * 16)


CLIENTS = (
    client("lan", "10.0.0.0/8"),
    client("vpn", "10.1.2.3"),
    client("dc", "10.1.0.0/16"),
    client("any6", "2001:db8::/32"),
    client("host6", "2001:db8::1"),
)


@pytest.mark.parametrize("address, name", [
    ("10.1.2.3", "vpn"),
    ("10.1.2.4", "dc"),
    ("10.200.0.1", "lan"),
    ("::ffff:10.1.2.3", "vpn"),
    ("::ffff:10.9.9.9", "lan"),
    ("2001:db8::1", "host6"),
    ("2001:db8::2", "any6"),
    ("2001:db8::1%eth0", "host6"),
])
def test_find_client_longest_prefix_wins(address, name):
    assert find_client(CLIENTS, address).name == name
    assert find_client(list(reversed(CLIENTS)), address).name == name


@pytest.mark.parametrize("address", [
    "192.0.2.1", "11.0.0.1", "2001:db9::1", "::ffff:192.0.2.1", "::1",
    "", "not-an-address", "10.0.0.300", "10.1.2.3:1812",
])
def test_find_client_unknown_or_invalid_address_is_none(address):
    assert find_client(CLIENTS, address) is None


def test_find_client_catch_all_networks():
    clients = (client("all4", "0.0.0.0/0"), client("all6", "::/0"), client("one", "192.0.2.1"))
    assert find_client(clients, "192.0.2.1").name == "one"
    assert find_client(clients, "198.51.100.1").name == "all4"
    assert find_client(clients, "::ffff:198.51.100.1").name == "all4"
    assert find_client(clients, "2001:db8::5").name == "all6"


def test_find_client_no_clients():
    assert find_client((), "127.0.0.1") is None


def test_find_client_follows_a_new_clients_tuple():
    first = (client("a", "127.0.0.1"),)
    second = (client("b", "127.0.0.1"),)
    assert find_client(first, "127.0.0.1").name == "a"
    assert find_client(second, "127.0.0.1").name == "b"
    assert find_client(first, "127.0.0.1").name == "a"


def test_find_client_sees_changes_to_a_list():
    clients = [client("a", "127.0.0.1")]
    assert find_client(clients, "127.0.0.2") is None
    clients.append(client("b", "127.0.0.2"))
    assert find_client(clients, "127.0.0.2").name == "b"


def test_find_client_with_loaded_config(tmp_path):
    cfg = load(tmp_path, CLIENT)
    assert find_client(cfg.radius.clients, "127.0.0.1").name == "vpn"
    assert find_client(cfg.radius.clients, "::ffff:127.0.0.1").name == "vpn"
    assert find_client(cfg.radius.clients, "127.0.0.2") is None


# --- The shipped files --------------------------------------------------------------------------

def test_example_config_loads():
    cfg = load_config(CONF / "mfaserver.toml")
    assert cfg.warnings == ()
    assert [c.name for c in cfg.radius.clients] == ["vpn"]


def test_example_config_mentions_every_key():
    # Keys may be commented out (secret_file), but each must be documented.
    text = (CONF / "mfaserver.toml").read_text()

    def names(spec):
        for name, item in spec.keys.items():
            yield name
            if isinstance(item, config.Table):
                yield from names(item)
            elif isinstance(item, config.TableArray):
                yield from names(item.table)

    for name in names(config.SCHEMA):
        assert re.search(rf"^#? ?(\[+[\w.]*\b{name}\]+|{name} = )", text, re.M), name


def test_demo_config_loads():
    cfg = load_config(CONF / "demo.toml")
    assert cfg.server.state_dir == (CONF.parent / "var" / "demo").resolve()
    assert (cfg.radius.listen, cfg.radius.port, cfg.radius.reject_delay) == ("127.0.0.1", 1812,
                                                                             1.0)
    [demo] = cfg.radius.clients
    assert demo.name == "demo"
    assert demo.network == ipaddress.ip_network("127.0.0.1/32")
    assert demo.secret == b"demo-shared-secret-change-me"
    assert cfg.mfa.challenge is True
    assert cfg.warnings == ()


# --- Out-of-band methods: [mfa] additions, [push], [voice], [alerts] -------------------------

TWILIO = """
[gateways.twilio]
account_sid = "AC0123456789abcdef0123456789abcdef"
auth_token = "token"
from_number = "+15550001111"
"""

WEB = """
[web]
listen = "127.0.0.1"
port = 8443
public_url = "http://127.0.0.1:8443"
"""


def test_out_of_band_defaults(tmp_path):
    cfg = load(tmp_path, CLIENT)
    assert (cfg.mfa.default_method, cfg.mfa.timeout, cfg.mfa.failmode) == ("push", 60, "secure")
    assert cfg.mfa.challenge_menu is False
    assert (cfg.mfa.max_pending_per_user, cfg.mfa.max_pending) == (1, 20_000)
    assert (cfg.push.notify, cfg.push.number_matching) == ("none", False)
    assert cfg.voice is None
    assert cfg.alerts.gateway == "console"
    assert (cfg.radius.clients[0].timeout, cfg.radius.clients[0].failmode) == (None, None)


def test_per_client_timeout_and_failmode(tmp_path):
    cfg = load(tmp_path, CLIENT + 'timeout = 90\nfailmode = "safe"\n')
    assert (cfg.radius.clients[0].timeout, cfg.radius.clients[0].failmode) == (90.0, "safe")


@pytest.mark.parametrize("text, key", [
    ('[mfa]\ndefault_method = "carrier-pigeon"', "mfa.default_method"),
    ("[mfa]\ntimeout = 1", "mfa.timeout"),
    ('[push]\nnotify = "apns"', "push.notify"),
    ('failmode = "open"', "radius.clients[0].failmode"),
])
def test_bad_out_of_band_values_are_named(tmp_path, text, key):
    assert error(tmp_path, CLIENT + text).key == key


def test_voice_needs_twilio_and_a_public_url(tmp_path):
    assert error(tmp_path, CLIENT + "[voice]\n" + WEB).key == "voice.gateway"
    assert error(tmp_path, CLIENT + "[voice]\n" + TWILIO).key == "voice"
    cfg = load(tmp_path, CLIENT + "[voice]\npin = true\n" + TWILIO + WEB)
    assert cfg.voice.pin is True


def test_smtp_alerts_need_the_gateway_and_recipients(tmp_path):
    smtp = '[gateways.smtp]\nhost = "127.0.0.1"\nstarttls = "none"\nsender = "m@example.org"\n'
    assert error(tmp_path, CLIENT + '[alerts]\ngateway = "smtp"\nto = ["a@example.org"]\n'
                 ).key == "alerts.gateway"
    assert error(tmp_path, CLIENT + '[alerts]\ngateway = "smtp"\n' + smtp).key == "alerts.to"
    cfg = load(tmp_path, CLIENT + '[alerts]\ngateway = "smtp"\nto = ["a@example.org"]\n' + smtp)
    assert cfg.alerts.to == ("a@example.org",)
    assert cfg.gateways.smtp.host == "127.0.0.1"


def test_web_push_and_the_portal_need_the_web_listener(tmp_path):
    assert error(tmp_path, CLIENT + '[push]\nnotify = "webpush"\n').key == "push.notify"
    assert error(tmp_path, CLIENT + "[portal]\n").key == "portal"
    cfg = load(tmp_path, CLIENT + WEB + '[push]\nnotify = "webpush"\n[portal]\n')
    assert (cfg.push.notify, cfg.push.vapid_subject) == ("webpush", "")
    assert (cfg.portal.session_idle_minutes, cfg.portal.session_max_hours,
            cfg.portal.invite_hours) == (10, 8, 24)
    assert cfg.portal.methods == ("push", "totp", "sms", "phone")


@pytest.mark.parametrize("text, key", [
    ('[push]\nnotify = "webpush"\nvapid_subject = "admin@example.org"', "push.vapid_subject"),
    ('[portal]\nmethods = ["totp", "carrier-pigeon"]', "portal.methods"),
    ("[portal]\nsession_idle_minutes = 0", "portal.session_idle_minutes"),
    ("[portal]\ninvite_hours = 10000", "portal.invite_hours"),
])
def test_bad_phone_side_values_are_named(tmp_path, text, key):
    assert error(tmp_path, CLIENT + WEB + text).key == key


# --- [store], [cluster] (issue #12) ------------------------------------------

def test_store_defaults_to_sqlite_and_node_name_to_the_host_name(tmp_path):
    import socket
    cfg = load(tmp_path, CLIENT)
    assert cfg.store == config.StoreConfig(backend="sqlite", dsn=None)
    assert cfg.cluster.node_name == socket.gethostname()


def test_postgresql_store_with_a_dsn_several_hosts_and_node_name(tmp_path):
    dsn = ("host=db1,db2 port=5432,5432 dbname=mfa user=mfa password=pw"
           " target_session_attrs=read-write")
    cfg = load(tmp_path, CLIENT + f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
               '[cluster]\nnode_name = "radius-a"\n')
    assert cfg.store.backend == "postgresql"
    assert cfg.store.dsn == dsn
    assert "pw" not in repr(cfg.store)  # the password stays out of reprs and logs
    assert cfg.cluster.node_name == "radius-a"


def test_dsn_file_holds_the_dsn_and_a_uri_is_accepted(tmp_path):
    (tmp_path / "dsn").write_text("postgresql://mfa:pw@db1,db2/mfa"
                                  "?target_session_attrs=read-write\n")
    cfg = load(tmp_path, CLIENT + '[store]\nbackend = "postgresql"\ndsn_file = "dsn"\n')
    assert cfg.store.dsn == "postgresql://mfa:pw@db1,db2/mfa?target_session_attrs=read-write"


@pytest.mark.parametrize("extra, key, message", [
    ('[store]\nbackend = "postgresql"\n', "store", "dsn or dsn_file is required"),
    ('[store]\nbackend = "postgresql"\ndsn = "host=a"\ndsn_file = "f"\n', "store",
     "not both"),
    ('[store]\nbackend = "postgresql"\ndsn = "garbage s3cret-that-must-never-leak"\n',
     "store.dsn", "not a libpq connection string"),
    ('[store]\nbackend = "postgresql"\ndsn = "host=a passwrd=x"\n', "store.dsn",
     "not a libpq connection string"),
    # libpq's own messages quote parts of the string: none of it is repeated.
    ('[store]\nbackend = "postgresql"\n'
     'dsn = "postgresql://mfa:50%s3cret-that-must-never-leak@db/mfa"\n', "store.dsn",
     "not a libpq connection string"),
    ('[store]\nbackend = "postgresql"\n'
     'dsn = "host=db password=s3cret-that-must-never-leak secret=x"\n', "store.dsn",
     "not a libpq connection string"),
    ('[store]\ndsn = "host=a"\n', "store.dsn", 'is for backend = "postgresql"'),
    ('[store]\nbackend = "mysql"\n', "store.backend", "not one of: sqlite, postgresql"),
])
def test_store_and_workers_errors(tmp_path, extra, key, message):
    e = error(tmp_path, CLIENT + extra)
    assert e.key == key
    assert message in e.message


PG = '[store]\nbackend = "postgresql"\ndsn = "host=db dbname=mfa"\n'


def test_one_worker_by_default_and_auto_is_one_per_core_on_postgresql(tmp_path, monkeypatch):
    assert load(tmp_path, CLIENT).server.workers == 1
    monkeypatch.setattr(config.os, "cpu_count", lambda: 6)
    assert load(tmp_path, '[server]\nworkers = "auto"\n' + CLIENT + PG).server.workers == 6
    assert load(tmp_path, '[server]\nworkers = 3\n' + CLIENT + PG).server.workers == 3
    # One worker is one node: fine on SQLite.
    assert load(tmp_path, '[server]\nworkers = 1\n' + CLIENT).server.workers == 1


@pytest.mark.parametrize("value, message", [
    ("2", 'more than one worker needs [store] backend = "postgresql"'),
    ('"auto"', 'more than one worker needs [store] backend = "postgresql"'),
])
def test_workers_are_refused_on_sqlite(tmp_path, value, message):
    e = error(tmp_path, f"[server]\nworkers = {value}\n" + CLIENT)
    assert (e.key, message in e.message) == ("server.workers", True)


@pytest.mark.parametrize("value, message", [
    ("0", "out of range"), ("65", "out of range"), ('"many"', 'neither a number nor "auto"'),
    ("true", 'expected an integer or "auto"'), ("1.5", 'expected an integer or "auto"'),
])
def test_bad_workers_values(tmp_path, value, message):
    e = error(tmp_path, f"[server]\nworkers = {value}\n" + CLIENT + PG)
    assert e.key == "server.workers" and message in e.message
