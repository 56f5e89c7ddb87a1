"""TOML configuration file -> frozen `Config`, or a `ConfigError` naming file and key.

The file is read once at start. Every key is described in `SCHEMA`, a small
declarative table of key -> type, default and check; unknown keys, wrong types
and out-of-range values are refused so that a typo never silently falls back
to a default. Relations between keys (secret or secret_file, unique client
names) and relative paths are handled after the schema, in `_build`.

Shared secrets are kept out of ``repr`` and out of every error message.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfaserver.addresses import is_loopback
# Each part's settings live with the part; this module builds them from the file.
from mfaserver.directory.settings import AdConfig
from mfaserver.directory.settings import (DirectoryConfig, LdapConfig, SyncConfig,
                                          UpstreamRadiusConfig)
from mfaserver.factors import METHOD_NAMES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/mfaserver/mfaserver.toml")
CONFIG_ENV_VAR = "MFASERVER_CONFIG"

# Names accepted in [store] backend.
STORE_BACKENDS = ("sqlite", "postgresql")
# Names accepted in [directory] backend; a new backend is one more entry here.
DIRECTORY_BACKENDS = ("local", "ldap", "radius")

# What a login does when a gateway cannot deliver: reject, or "safe": accept.
FAILMODES = ("secure", "safe")

# Shorter secrets are accepted (some NAS limit the length) but warned about.
MIN_SECRET_LENGTH = 16

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration cannot be used: ``"<file>: <dotted.key>: <what is wrong>"``."""

    def __init__(self, path: Path, key: str | None, message: str):
        self.path = path
        self.key = key
        self.message = message
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")


@dataclass(frozen=True)
class ServerConfig:
    """[server]: where state lives and how logs are written."""

    state_dir: Path
    log_format: str = "text"
    # Processes serving the same ports (SO_REUSEPORT), each a cluster node:
    # PostgreSQL only. "auto" is resolved to the number of cores at load.
    workers: int = 1


@dataclass(frozen=True)
class StoreConfig:
    """[store]: the durable store's engine. ``dsn`` (libpq syntax) for PostgreSQL."""

    backend: str = "sqlite"
    dsn: str | None = field(default=None, repr=False)  # may hold a password


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: this node's name in logs and metrics (default: the host name)."""

    node_name: str


@dataclass(frozen=True)
class ClientConfig:
    """One [[radius.clients]] entry: a NAS allowed to talk to us."""

    name: str
    network: IPNetwork
    secret: bytes = field(repr=False)
    require_message_authenticator: bool = True
    timeout: float | None = None      # overrides [mfa] timeout for this client
    failmode: str | None = None       # overrides [mfa] failmode for this client


@dataclass(frozen=True)
class ReplyRule:
    """One [[radius.reply]] entry: members of ``group`` get ``attributes`` in the Accept.

    ``group`` is a DN, normalised to lower case (directories report them so).
    """

    group: str
    attributes: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RadiusConfig:
    """[radius]: the UDP listener, its clients and the reply rules."""

    listen: str = "127.0.0.1"
    port: int = 1812
    reject_delay: float = 1.0
    status_server: bool = True
    response_cache_seconds: float = 30.0
    clients: tuple[ClientConfig, ...] = ()
    reply: tuple[ReplyRule, ...] = ()


@dataclass(frozen=True)
class SmsConfig:
    """[sms]: one-time codes by text message. Absent: no SMS."""

    gateway: str = "console"          # a configured [gateways.NAME], or "console"
    code_length: int = 6
    code_ttl: float = 300.0
    max_per_user_per_hour: int = 5
    max_per_number_per_hour: int = 10


@dataclass(frozen=True)
class GatewaysConfig:
    """[gateways.*]: delivery channels, as the gateway modules' settings objects."""

    twilio: Any = None                # mfaserver.gateways.twilio.TwilioSettings
    http: Any = None                  # mfaserver.gateways.http.HttpGatewaySettings
    smtp: Any = None                  # mfaserver.gateways.smtp.SmtpSettings


@dataclass(frozen=True)
class VoiceConfig:
    """[voice]: approval by phone call. Absent: no calls."""

    gateway: str = "twilio"
    pin: bool = False                 # the user keys a PIN (user set-pin), then #
    max_per_user_per_hour: int = 5
    max_per_number_per_hour: int = 10


@dataclass(frozen=True)
class PushConfig:
    """[push]: approval on an enrolled device. Absent: push with the defaults below."""

    notify: str = "none"              # wake-ups: ntfy | webhook | webpush | none (devices poll)
    number_matching: bool = False
    enrollment_minutes: float = 10.0
    max_per_user_per_hour: int = 30
    notify_timeout: float = 5.0
    vapid_subject: str = ""           # Web Push contact (mailto: or https:); "": [web] public_url


@dataclass(frozen=True)
class AlertsConfig:
    """[alerts]: where fraud reports and other admin alerts go."""

    gateway: str = "console"          # console | smtp | http
    to: tuple[str, ...] = ()          # e-mail recipients, for smtp


@dataclass(frozen=True)
class MfaConfig:
    """[mfa]: how the second factor is asked for and checked."""

    delimiter: str = ","
    challenge: bool = True
    unenrolled: str = "reject"
    challenge_timeout: float = 300.0
    lockout_threshold: int = 10
    lockout_minutes: float = 15.0
    totp_window: int = 1
    hotp_look_ahead: int = 10
    failmode: str = "secure"          # a gateway that cannot deliver: reject, or "safe": accept
    default_method: str = "push"      # a name in mfaserver.factors.METHODS, when the user has none
    timeout: float = 60.0             # seconds a login is held for an out-of-band answer
    challenge_menu: bool = False      # a bare password gets a menu of methods
    max_pending_per_user: int = 1
    max_pending: int = 20_000
    # Approval methods an MS-CHAPv2 login may be held for, the user's default first.
    mschap_methods: tuple[str, ...] = ("push", "phone")


@dataclass(frozen=True)
class Config:
    """The whole configuration, as loaded from ``path``."""

    path: Path
    server: ServerConfig
    radius: RadiusConfig
    directory: DirectoryConfig
    mfa: MfaConfig
    warnings: tuple[str, ...] = ()
    sms: SmsConfig | None = None
    gateways: GatewaysConfig = GatewaysConfig()
    web: Any = None                   # mfaserver.web.server.WebSettings; None: no listener
    voice: VoiceConfig | None = None
    push: PushConfig = PushConfig()
    alerts: AlertsConfig = AlertsConfig()
    portal: Any = None                # mfaserver.web.portal.PortalSettings; None: no portal
    store: StoreConfig = StoreConfig()
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(socket.gethostname()))

    @property
    def database_path(self) -> Path:
        return self.server.state_dir / "mfaserver.sqlite3"

    @property
    def key_path(self) -> Path:
        return self.server.state_dir / "seed.key"


# --- The schema machinery -------------------------------------------------------------------

class _Problem(Exception):
    """A bad key found while parsing; `load_config` adds the file name."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key = key
        self.message = message


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISSING: Any = _Marker("MISSING")    # the key is absent from the file
REQUIRED: Any = _Marker("REQUIRED")  # as a default: the key must be given


def _describe(value: Any) -> str:
    """The TOML type of ``value`` in words (never the value: it may be a secret)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date/time"


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Field:
    """One key holding a value.

    ``convert`` checks the value and returns what the program uses; it raises
    ValueError with a message for the admin. A default of None makes the key
    optional with no value; REQUIRED makes it mandatory.
    """

    expected: str                 # for messages: "an integer"
    types: tuple[type, ...]
    default: Any = REQUIRED
    convert: Callable[[Any], Any] = _identity

    def parse(self, raw: Any, key: str) -> Any:
        if raw is MISSING:
            if self.default is REQUIRED:
                raise _Problem(key, "required key is missing")
            if self.default is None:
                return None
            raw = self.default
        # bool is a subclass of int, so `port = true` would otherwise pass.
        if not isinstance(raw, self.types) or (isinstance(raw, bool) and bool not in self.types):
            raise _Problem(key, f"expected {self.expected}, got {_describe(raw)}")
        try:
            return self.convert(raw)
        except ValueError as e:
            raise _Problem(key, str(e)) from None


@dataclass(frozen=True)
class Table:
    """A TOML table; ``optional`` tables that are absent parse to None."""

    keys: Mapping[str, Field | Table | TableArray]
    optional: bool = False

    def parse(self, raw: Any, key: str) -> dict[str, Any] | None:
        if raw is MISSING:
            if self.optional:
                return None
            raw = {}
        if not isinstance(raw, dict):
            raise _Problem(key, f"expected a table, got {_describe(raw)}")
        for name in raw:
            if name not in self.keys:
                close = difflib.get_close_matches(name, self.keys, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise _Problem(_join(key, name), "unknown key" + hint)
        return {name: spec.parse(raw.get(name, MISSING), _join(key, name))
                for name, spec in self.keys.items()}


@dataclass(frozen=True)
class TableArray:
    """An array of tables (``[[name]]``), each parsed with ``table``."""

    table: Table
    min_items: int = 0

    def parse(self, raw: Any, key: str) -> tuple[dict[str, Any], ...]:
        if raw is MISSING:
            raw = []
        if not isinstance(raw, list):
            raise _Problem(key, f"expected an array of tables ([[{key}]]), got {_describe(raw)}")
        if len(raw) < self.min_items:
            raise _Problem(key, f"at least {self.min_items} [[{key}]] entry is required")
        return tuple(self.table.parse(item, f"{key}[{i}]") for i, item in enumerate(raw))


# Field constructors: each returns a Field that checks one kind of value.

def boolean(default: bool) -> Field:
    return Field("a boolean (true or false)", (bool,), default)


def integer(default: int, low: int, high: int) -> Field:
    return Field("an integer", (int,), default, _in_range(low, high, int))


def number(default: float, low: float, high: float) -> Field:
    # TOML "30" is an integer; it is fine where seconds are expected.
    return Field("a number", (int, float), default, _in_range(low, high, float))


def string(default: Any = REQUIRED, convert: Callable[[str], Any] | None = None) -> Field:
    """A non-empty string, optionally checked/converted further."""
    def check(value: str) -> Any:
        if not value:
            raise ValueError("must not be empty")
        return convert(value) if convert else value
    return Field("a string", (str,), default, check)


def one_of(default: str | None, *choices: str) -> Field:
    """A string that is one of ``choices`` (None as the default: the key is optional)."""
    return Field("a string", (str,), default, _choice(*choices))


def _choice(*choices: str) -> Callable[[str], str]:
    """The one check of a value against its allowed choices."""
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of: {', '.join(choices)}")
        return value
    return check


def string_list(default: Any = REQUIRED, convert: Callable[[str], Any] | None = None,
                min_items: int = 1) -> Field:
    """An array of non-empty strings, each optionally checked/converted."""
    def check(values: list) -> tuple:
        if len(values) < min_items:
            raise ValueError(f"at least {min_items} entry is required")
        result = []
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise ValueError(f"entry {i}: expected a non-empty string")
            try:
                result.append(convert(value) if convert else value)
            except ValueError as e:
                raise ValueError(f"entry {i}: {e}") from None
        return tuple(result)
    return Field("an array of strings", (list,), default, check)


def text(default: str = "") -> Field:
    """A string that may be empty (empty means "not set")."""
    return Field("a string", (str,), default)


def _in_range(low: float, high: float, cast: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not low <= value <= high:  # also refuses nan
            raise ValueError(f"{value!r} is out of range ({low}..{high})")
        return cast(value)
    return check


# Checks for particular keys.

_CLIENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _client_name(value: str) -> str:
    if not _CLIENT_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid name (1 to 64 of A-Z a-z 0-9 _ . -)")
    return value


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


def _network(value: str) -> IPNetwork:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR block") from None
    # find_client sees "::ffff:1.2.3.4" as 1.2.3.4, so store such networks as IPv4.
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None and network.prefixlen >= 96:
        network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _backends(value: str | list) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names:
        raise ValueError("at least one backend is required")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"expected a string or an array of strings, got {_describe(name)}")
        _choice(*DIRECTORY_BACKENDS)(name)
    if len(set(names)) != len(names):
        raise ValueError("a backend is listed twice")
    return names


MAX_WORKERS = 64


def _workers(value: int | str) -> int | str:
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f'{value!r} is neither a number nor "auto"')
        return value
    return _in_range(1, MAX_WORKERS, int)(value)


def _ldap_url(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    host = rest.split("/", 1)[0]
    if not sep or scheme.lower() not in ("ldap", "ldaps") or not host:
        raise ValueError(f"{value!r} is not an ldap:// or ldaps:// URL with a host")
    return value


def _absolute_path(value: str) -> str:
    """A program's absolute path (it runs without a shell or a search PATH)."""
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    return value


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or host.endswith(":"):  # "host" or a bare IPv6 address
        host, port = value, "1812"
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{value!r} has no host")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{value!r}: port must be a number") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"{value!r}: port out of range (1..65535)")
    return host, number


def _filter_template(value: str) -> str:
    if "{username}" not in value or not (value.startswith("(") and value.endswith(")")):
        raise ValueError(f"{value!r} must be an LDAP filter in parentheses containing {{username}}")
    return value


def _attribute_table(value: dict) -> tuple[tuple[str, str], ...]:
    from mfaserver.radius import attributes
    items = []
    for name, item in value.items():
        if name not in attributes.REPLY_ATTRIBUTES:
            raise ValueError(f"{name!r} is not a reply attribute mfaserver knows"
                             f" ({', '.join(attributes.REPLY_ATTRIBUTES)})")
        if not isinstance(item, (str, int)) or isinstance(item, bool):
            raise ValueError(f"{name}: expected a string or an integer")
        try:
            attributes.encode(name, str(item))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        items.append((name, str(item)))
    if not items:
        raise ValueError("at least one attribute is required")
    return tuple(items)


def _reply_attribute_name(value: str) -> str:
    from mfaserver.radius import attributes
    if value not in attributes.REPLY_ATTRIBUTES:
        raise ValueError(f"{value!r} is not a reply attribute mfaserver knows"
                         f" ({', '.join(attributes.REPLY_ATTRIBUTES)})")
    return value


def _string_table(value: dict) -> dict:
    for name, item in value.items():
        if not isinstance(item, str):
            raise ValueError(f"{name}: expected a string, got {_describe(item)}")
    return dict(value)


def _statuses(value: list) -> tuple[int, ...]:
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599
                            for v in value):
        raise ValueError("expected HTTP status codes (100..599)")
    return tuple(value)


def _mail_address(value: str) -> str:
    if value.count("@") != 1 or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


def _delimiter(value: str) -> str:
    if len(value) != 1 or value.isalnum():
        raise ValueError(f"{value!r} must be exactly one character, not a letter or digit")
    return value


SCHEMA = Table({
    "server": Table({
        "state_dir": string("var"),
        "log_format": one_of("text", "text", "json"),
        "workers": Field('an integer or "auto"', (int, str), 1, _workers),
    }),
    "store": Table({
        "backend": one_of("sqlite", *STORE_BACKENDS),
        "dsn": string(None),            # or dsn_file; checked in _build_store
        "dsn_file": string(None),
    }),
    "cluster": Table({
        "node_name": text(""),
    }),
    "radius": Table({
        "listen": string("127.0.0.1", _ip_address),
        "port": integer(1812, 1, 65535),
        "reject_delay": number(1.0, 0, 10),
        "status_server": boolean(True),
        "response_cache_seconds": number(30, 5, 120),
        "clients": TableArray(Table({
            "name": string(REQUIRED, _client_name),
            "address": string(REQUIRED, _network),
            "secret": string(None),          # exactly one of secret and secret_file,
            "secret_file": string(None),     # checked in _build_client
            "require_message_authenticator": boolean(True),
            "timeout": Field("a number", (int, float), None, _in_range(5, 600, float)),
            "failmode": one_of(None, *FAILMODES),
        }), min_items=1),
        "reply": TableArray(Table({
            "group": string(REQUIRED),
            "attributes": Field("a table of attribute = value", (dict,), REQUIRED,
                                _attribute_table),
        })),
    }),
    "directory": Table({
        "backend": Field("a string or an array of strings", (str, list), "local", _backends),
        "ldap": Table({
            "servers": string_list(REQUIRED, _ldap_url),
            "start_tls": boolean(False),
            "ca_file": text(""),
            "bind_dn": text(""),
            "bind_password": string(None),      # or bind_password_file
            "bind_password_file": string(None),
            "base_dn": string(REQUIRED),
            "user_filter": string("(uid={username})", _filter_template),
            "username_attribute": string("uid"),
            "required_group": text(""),
            "phone_attribute": text("mobile"),
            "timeout": number(5, 0.5, 60),
            "allow_plaintext": boolean(False),
            "active_directory": boolean(False),
            "ad_domain": text(""),
            "pool_size": integer(8, 1, 64),
            "retry_dead_after": number(30, 1, 3600),
            "processes": integer(0, 0, 16),
            "client": one_of("libldap", "libldap", "ldap3"),
        }, optional=True),
        "radius": Table({
            "servers": string_list(REQUIRED, _host_port),
            "secret": string(None),             # or secret_file
            "secret_file": string(None),
            "timeout": number(3, 0.5, 30),
            "retries": integer(1, 0, 5),
            "pass_through": string_list([], _reply_attribute_name, min_items=0),
            "nas_identifier": string("mfaserver"),
            "retry_dead_after": number(30, 1, 3600),
        }, optional=True),
        "ad": Table({
            "mschap": one_of("none", "none", "ntlm_auth"),
            "ntlm_auth": string("/usr/bin/ntlm_auth", _absolute_path),
            "domain": text(""),
            "config_file": text(""),
            "timeout": number(5, 0.5, 60),
            "max_processes": integer(32, 1, 1024),
        }, optional=True),
        "sync": Table({
            "interval": number(0, 0, 7 * 86400),
            "keep_days": integer(30, 0, 3650),
            "filter": text(""),
        }),
    }),
    "mfa": Table({
        "delimiter": Field("a string", (str,), ",", _delimiter),
        "challenge": boolean(True),
        "unenrolled": one_of("reject", "reject", "allow"),
        "challenge_timeout": number(300, 30, 900),
        "lockout_threshold": integer(10, 1, 100),
        "lockout_minutes": number(15, 1, 1440),
        "totp_window": integer(1, 0, 5),
        "hotp_look_ahead": integer(10, 1, 100),
        "failmode": one_of("secure", *FAILMODES),
        "default_method": one_of("push", *METHOD_NAMES),
        "timeout": number(60, 5, 600),
        "challenge_menu": boolean(False),
        "max_pending_per_user": integer(1, 1, 10),
        "max_pending": integer(20_000, 1, 1_000_000),
        "mschap_methods": string_list(["push", "phone"], _choice("push", "phone")),
    }),
    "voice": Table({
        "gateway": one_of("twilio", "twilio"),
        "pin": boolean(False),
        "max_per_user_per_hour": integer(5, 1, 100),
        "max_per_number_per_hour": integer(10, 1, 1000),
    }, optional=True),
    "push": Table({
        "notify": one_of("none", "none", "ntfy", "webhook", "webpush"),
        "number_matching": boolean(False),
        "enrollment_minutes": number(10, 1, 1440),
        "max_per_user_per_hour": integer(30, 1, 1000),
        "notify_timeout": number(5, 1, 60),
        "vapid_subject": text(""),
    }),
    "portal": Table({
        "session_idle_minutes": number(10, 1, 120),
        "session_max_hours": number(8, 1, 72),
        "invite_hours": number(24, 1, 720),
        "methods": string_list(list(METHOD_NAMES), _choice(*METHOD_NAMES)),
    }, optional=True),
    "alerts": Table({
        "gateway": one_of("console", "console", "smtp", "http"),
        "to": string_list([], _mail_address, min_items=0),
    }),
    "sms": Table({
        "gateway": one_of("console", "console", "twilio", "http", "smtp"),
        "code_length": integer(6, 6, 8),
        "code_ttl": number(300, 60, 600),
        "max_per_user_per_hour": integer(5, 1, 100),
        "max_per_number_per_hour": integer(10, 1, 1000),
    }, optional=True),
    "web": Table({
        "listen": string("127.0.0.1", _ip_address),
        "port": integer(8443, 1, 65535),
        "public_url": text(""),
        "tls_certificate": text(""),
        "tls_key": text(""),
        "max_body": integer(64 * 1024, 1024, 1024 * 1024),
        "request_timeout": number(30, 1, 300),
    }, optional=True),
    "gateways": Table({
        "twilio": Table({
            "account_sid": string(REQUIRED),
            "auth_token": string(None),         # or auth_token_file
            "auth_token_file": string(None),
            "from_number": string(REQUIRED),
            "api_base": string("https://api.twilio.com"),
            "timeout": number(10, 1, 60),
            "ring_timeout": integer(30, 5, 600),
        }, optional=True),
        "http": Table({
            "url": string(REQUIRED),
            "method": one_of("POST", "POST", "PUT", "GET"),
            "format": one_of("json", "json", "form"),
            "fields": Field("a table of name = template", (dict,), {"to": "{to}", "text": "{text}"},
                            _string_table),
            "headers": Field("a table of name = value", (dict,), {}, _string_table),
            "timeout": number(10, 1, 60),
            "success_status": Field("an array of integers", (list,), [200, 201, 202, 204],
                                    _statuses),
            "ca_file": text(""),
        }, optional=True),
        "smtp": Table({
            "host": string(REQUIRED),
            "port": integer(25, 1, 65535),
            "starttls": one_of("required", "required", "optional", "none"),
            "username": text(""),
            "password": string(None),           # or password_file
            "password_file": string(None),
            "sender": string(REQUIRED),
            "ca_file": text(""),
            "timeout": number(10, 1, 120),
            "sms_address": text(""),
        }, optional=True),
    }),
})


# --- From parsed values to Config ---------------------------------------------------------

def _resolve(base: Path, value: str) -> Path:
    """An absolute path, relative ones taken from the config file's folder."""
    return (base / value).resolve()


def _read_secret_file(path: Path, key: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Problem(key, f"cannot read {str(path)!r}: {e.strerror or e}") from None
    # Editors add a final newline; it is never part of the secret.
    return data.rstrip(b"\r\n")


def _secret(values: dict[str, Any], key: str, base: Path, name: str = "secret",
            required: bool = True) -> tuple[str, bytes | None]:
    """``name`` or ``name_file`` (exactly one): returns (the key used, the secret)."""
    value, file_value = values[name], values[f"{name}_file"]
    if value is not None and file_value is not None:
        raise _Problem(key, f"set {name} or {name}_file, not both")
    if value is None and file_value is None:
        if not required:
            return f"{key}.{name}", None
        raise _Problem(key, f"{name} or {name}_file is required")
    if value is not None:
        return f"{key}.{name}", value.encode("utf-8")
    secret_key = f"{key}.{name}_file"
    path = _resolve(base, file_value)
    data = _read_secret_file(path, secret_key)
    if not data:
        raise _Problem(secret_key, f"{str(path)!r} is empty")
    return secret_key, data


def _build_client(values: dict[str, Any], key: str, base: Path,
                  warnings: list[str]) -> ClientConfig:
    secret_key, data = _secret(values, key, base)
    if len(data) < MIN_SECRET_LENGTH:
        warnings.append(f"{secret_key}: shorter than {MIN_SECRET_LENGTH} bytes;"
                        " use a long random secret")
    return ClientConfig(name=values["name"], network=values["address"], secret=data,
                        require_message_authenticator=values["require_message_authenticator"],
                        timeout=values["timeout"], failmode=values["failmode"])


def _check_clients_unique(clients: Sequence[ClientConfig]) -> None:
    names: dict[str, int] = {}
    networks: dict[IPNetwork, int] = {}
    for i, client in enumerate(clients):
        if client.name in names:
            raise _Problem(f"radius.clients[{i}].name",
                           f"duplicate name {client.name!r}"
                           f" (also radius.clients[{names[client.name]}])")
        if client.network in networks:
            other = clients[networks[client.network]]
            raise _Problem(f"radius.clients[{i}].address",
                           f"{client.network} is the same network as client {other.name!r}")
        names[client.name] = i
        networks[client.network] = i


def _is_loopback_url(url: str) -> bool:
    host = url.partition("://")[2].split("/", 1)[0]
    if not host.startswith("["):
        host = host.rsplit(":", 1)[0]
    return is_loopback(host.split("]", 1)[0])


def _build_ldap(values: dict[str, Any], base: Path) -> LdapConfig:
    key = "directory.ldap"
    _, password = _secret(values, key, base, "bind_password", required=False)
    if values["bind_dn"] and password is None:
        raise _Problem(key, "bind_dn is set: bind_password or bind_password_file is required")
    plain = [u for u in values["servers"]
             if u.lower().startswith("ldap://") and not _is_loopback_url(u)]
    if plain and not values["start_tls"] and not values["allow_plaintext"]:
        # Binding as the user sends the user's password: never in clear text
        # over a network unless the admin says so.
        raise _Problem(f"{key}.servers",
                       f"{plain[0]!r} would send passwords in clear text: use ldaps://,"
                       " start_tls = true, or allow_plaintext = true")
    ca_file = _resolve(base, values["ca_file"]) if values["ca_file"] else None
    if ca_file is not None and not ca_file.is_file():
        raise _Problem(f"{key}.ca_file", f"{str(ca_file)!r} is not a readable file")
    fields = {k: v for k, v in values.items()
              if k not in ("bind_password", "bind_password_file", "ca_file")}
    fields["required_group"] = fields["required_group"].lower()
    return LdapConfig(bind_password=(password or b"").decode("utf-8"), ca_file=ca_file,
                      **fields)


def _build_upstream(values: dict[str, Any], base: Path,
                    warnings: list[str]) -> UpstreamRadiusConfig:
    secret_key, secret = _secret(values, "directory.radius", base)
    if len(secret) < MIN_SECRET_LENGTH:
        warnings.append(f"{secret_key}: shorter than {MIN_SECRET_LENGTH} bytes;"
                        " use a long random secret")
    fields = {k: v for k, v in values.items() if k not in ("secret", "secret_file")}
    return UpstreamRadiusConfig(secret=secret, **fields)


def _build_directory(values: dict[str, Any], base: Path,
                     warnings: list[str]) -> DirectoryConfig:
    backends = values["backend"]
    for name in ("ldap", "radius"):
        if name in backends and values[name] is None:
            raise _Problem(f"directory.{name}",
                           f"[directory.{name}] is required when backend includes {name!r}")
    return DirectoryConfig(
        backends=backends,
        ldap=_build_ldap(values["ldap"], base) if values["ldap"] is not None else None,
        radius=(_build_upstream(values["radius"], base, warnings)
                if values["radius"] is not None else None),
        sync=SyncConfig(**values["sync"]),
        ad=AdConfig(**values["ad"]) if values["ad"] is not None else None,
    )


def _settings(factory, key: str, **values):
    """A gateway's own settings object; its ValueError ("name: problem") names the key."""
    try:
        return factory(**values)
    except ValueError as e:
        name, sep, message = str(e).partition(": ")
        if sep and name.isidentifier():
            raise _Problem(f"{key}.{name}", message) from None
        raise _Problem(key, str(e)) from None


def _build_web(values: dict[str, Any], base: Path):
    from mfaserver.web.server import WebSettings
    fields = dict(values)
    for name in ("tls_certificate", "tls_key"):
        fields[name] = _resolve(base, fields[name]) if fields[name] else None
    settings = _settings(WebSettings, "web", **fields)
    try:
        settings.validate()
    except ValueError as e:
        name, _, message = str(e).partition(": ")
        raise _Problem(f"web.{name}", message) from None
    return settings


def _build_gateways(values: dict[str, Any], base: Path) -> GatewaysConfig:
    twilio = http = None
    if values["twilio"] is not None:
        # Imported only when configured: these pull in the HTTP client.
        from mfaserver.gateways.twilio import TwilioSettings
        fields = dict(values["twilio"])
        _, token = _secret(fields, "gateways.twilio", base, "auth_token")
        del fields["auth_token"], fields["auth_token_file"]
        twilio = _settings(TwilioSettings, "gateways.twilio",
                           auth_token=token.decode("utf-8"), **fields)
    if values["http"] is not None:
        from mfaserver.gateways.http import HttpGatewaySettings
        fields = dict(values["http"])
        fields["ca_file"] = _resolve(base, fields["ca_file"]) if fields["ca_file"] else None
        http = _settings(HttpGatewaySettings, "gateways.http", **fields)
    smtp = None
    if values["smtp"] is not None:
        from mfaserver.gateways.smtp import SmtpSettings
        fields = dict(values["smtp"])
        _, password = _secret(fields, "gateways.smtp", base, "password", required=False)
        del fields["password"], fields["password_file"]
        fields["ca_file"] = _resolve(base, fields["ca_file"]) if fields["ca_file"] else None
        smtp = _settings(SmtpSettings, "gateways.smtp",
                         password=(password or b"").decode("utf-8"), **fields)
    return GatewaysConfig(twilio=twilio, http=http, smtp=smtp)


def _build(values: dict[str, Any], path: Path) -> Config:
    base = path.parent
    warnings: list[str] = []
    radius = dict(values["radius"])
    clients = tuple(_build_client(c, f"radius.clients[{i}]", base, warnings)
                    for i, c in enumerate(radius.pop("clients")))
    _check_clients_unique(clients)
    reply = tuple(ReplyRule(group=r["group"].lower(), attributes=r["attributes"])
                  for r in radius.pop("reply"))
    server = values["server"]
    gateways = _build_gateways(values["gateways"], base)
    sms = SmsConfig(**values["sms"]) if values["sms"] is not None else None
    if sms is not None and sms.gateway != "console" and getattr(gateways, sms.gateway) is None:
        raise _Problem("sms.gateway", f"[gateways.{sms.gateway}] is not configured")
    web = _build_web(values["web"], base) if values["web"] is not None else None
    voice = VoiceConfig(**values["voice"]) if values["voice"] is not None else None
    if voice is not None:
        if gateways.twilio is None:
            raise _Problem("voice.gateway", "[gateways.twilio] is not configured")
        if web is None or not web.public_url:
            # Twilio fetches the call's instructions from our web listener.
            raise _Problem("voice", "phone calls need [web] with public_url set")
    push = PushConfig(**values["push"])
    if push.notify == "webpush":
        if web is None or not web.public_url:
            # The page that subscribes, and the push service's contact, are there.
            raise _Problem("push.notify", "webpush needs [web] with public_url set")
        if push.vapid_subject and not push.vapid_subject.startswith(("mailto:", "https://")):
            raise _Problem("push.vapid_subject", "must be a mailto: or https:// URL")
    portal = None
    if values["portal"] is not None:
        if web is None or not web.public_url:
            raise _Problem("portal", "the portal needs [web] with public_url set")
        from mfaserver.web.portal import PortalSettings
        portal = PortalSettings(**values["portal"])
    alerts = AlertsConfig(**values["alerts"])
    if alerts.gateway != "console" and getattr(gateways, alerts.gateway) is None:
        raise _Problem("alerts.gateway", f"[gateways.{alerts.gateway}] is not configured")
    if alerts.gateway == "smtp" and not alerts.to:
        raise _Problem("alerts.to", "name at least one recipient for smtp alerts")
    store = _build_store(values["store"], base)
    workers = server["workers"]
    if workers != 1 and store.backend != "postgresql":
        raise _Problem("server.workers", 'more than one worker needs [store] backend = '
                       '"postgresql": on SQLite a login in flight is in one process\'s memory')
    if workers == "auto":
        workers = min(MAX_WORKERS, os.cpu_count() or 1)
    return Config(
        path=path,
        server=ServerConfig(state_dir=_resolve(base, server["state_dir"]),
                            log_format=server["log_format"], workers=workers),
        radius=RadiusConfig(clients=clients, reply=reply, **radius),
        directory=_build_directory(values["directory"], base, warnings),
        mfa=MfaConfig(**values["mfa"]),
        warnings=tuple(f"{path}: {w}" for w in warnings),
        sms=sms,
        gateways=gateways,
        web=web,
        voice=voice,
        push=push,
        alerts=alerts,
        portal=portal,
        store=store,
        cluster=ClusterConfig(node_name=values["cluster"]["node_name"]
                              or socket.gethostname()),
    )


def _build_store(values: dict[str, Any], base: Path) -> StoreConfig:
    backend = values["backend"]
    if backend == "sqlite":
        for name in ("dsn", "dsn_file"):
            if values[name] is not None:
                raise _Problem(f"store.{name}", 'is for backend = "postgresql"')
        return StoreConfig()
    key, data = _secret(values, "store", base, name="dsn")
    try:
        dsn = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Problem(key, "is not UTF-8 text") from None
    return StoreConfig(backend=backend, dsn=_check_dsn(dsn, key))


def _check_dsn(dsn: str, key: str) -> str:
    """A libpq connection string, checked by libpq's own parser so that a typo fails
    at load, not at the first login (`mfaserver.store.pg.check_dsn`)."""
    from mfaserver.store.pg import check_dsn
    try:
        check_dsn(dsn)
    except ValueError as e:
        raise _Problem(key, str(e)) from None
    return dsn


# --- Public functions -----------------------------------------------------------------------

def open_store(config: Config, *, create: bool = True):
    """The durable store ``config`` names ([store]): the SQLite file in state_dir, or
    PostgreSQL at ``dsn``; the seed key file is in state_dir either way.

    ``create``: a SQLite database, the state directory and a key file may be
    created (a PostgreSQL database must exist already). Raises the store's
    StoreError or KeyFileError.
    """
    if config.store.backend == "postgresql":
        from mfaserver.store.pg import PgStore
        if create:
            config.server.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return PgStore.open(config.store.dsn, config.key_path, create=create)
    from mfaserver.store import Store
    return Store.open(config.database_path, config.key_path, create=create)



def resolve_config_path(explicit: str | os.PathLike | None,
                        environ: Mapping[str, str] = os.environ) -> Path:
    """The file to load: ``--config``, else $MFASERVER_CONFIG, else the default.

    An empty value counts as not given.
    """
    if explicit is not None and os.fspath(explicit):
        return Path(explicit)
    if environ.get(CONFIG_ENV_VAR):
        return Path(environ[CONFIG_ENV_VAR])
    return DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike) -> Config:
    """Read and check the TOML file at ``path``; raise ConfigError if it is unusable."""
    path = Path(path).absolute()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read the file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM from Windows editors
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text (byte {e.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # The message holds the line and column, never the file's content.
        raise ConfigError(path, None, f"invalid TOML: {e}") from None
    try:
        return _build(SCHEMA.parse(raw, ""), path)
    except _Problem as p:
        raise ConfigError(path, p.key, p.message) from None


class ClientIndex:
    """Longest-prefix lookup of RADIUS clients by source address.

    Per IP version, one dict per prefix length maps a network address to its
    client, so a lookup costs at most one dict probe per distinct prefix length.
    """

    MEMO_SIZE = 4096

    def __init__(self, clients: Sequence[ClientConfig]):
        self._memo: dict[str, ClientConfig | None] = {}
        by_length: dict[tuple[int, int], dict[int, ClientConfig]] = {}
        for client in clients:
            net = client.network
            table = by_length.setdefault((net.version, net.prefixlen), {})
            table.setdefault(int(net.network_address), client)
        self._tables: dict[int, list[tuple[int, dict[int, ClientConfig]]]] = {4: [], 6: []}
        for (version, length), table in sorted(by_length.items(), key=lambda kv: -kv[0][1]):
            bits = 32 if version == 4 else 128
            mask = ((1 << length) - 1) << (bits - length)
            self._tables[version].append((mask, table))

    def find(self, address: str) -> ClientConfig | None:
        """The most specific client containing ``address``, or None.

        Runs for every packet, so answers are remembered per address string
        (parsing an address costs more than the rest of a Status-Server
        reply). The memo is bounded: a flood from many sources empties it.
        """
        try:
            return self._memo[address]
        except KeyError:
            pass
        client = self._find(address)
        if len(self._memo) >= self.MEMO_SIZE:
            self._memo.clear()
        self._memo[address] = client
        return client

    def _find(self, address: str) -> ClientConfig | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value = int(ip)
        for mask, table in self._tables[ip.version]:
            client = table.get(value & mask)
            if client is not None:
                return client
        return None


def find_client(clients: Sequence[ClientConfig], address: str) -> ClientConfig | None:
    """The client for a packet from ``address`` (longest prefix wins), or None.

    "::ffff:1.2.3.4" is matched as 1.2.3.4; an invalid address matches nothing.
    For one lookup; the daemon keeps a `ClientIndex` for all its packets.
    """
    return ClientIndex(clients).find(address)
