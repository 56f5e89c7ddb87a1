"""``mfaserver authenticator ...``: the reference authenticator, a phone app in the CLI.

It speaks the device side of ``docs/device-api.rst``, for administrators
(checking a server end to end), kiosks and tests, and as a readable
specification for app makers: each command is one request of the protocol.

The device's state lives in a *store file* (JSON, mode 0600)::

    {"version": 1, "base_url": "https://mfa.example.com", "device_id": "...",
     "user": "alice", "key_type": "ed25519", "private_key": "-----BEGIN PRIVATE KEY-----...",
     "ca_file": "/abs/path/ca.pem" or null}

These commands never read the daemon's config file or database. HTTP is
synchronous (``http.client``): a CLI waits for its one answer anyway. Only
``https`` is spoken, except ``http`` to a loopback address, which never
crosses a network. Redirects are not followed: a signed request goes only
to the server that was enrolled with.

Connections are made by `open_connection`, or by the function a caller
puts in ``ctx.meta[CONNECT]`` (tests: an in-memory server).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import socket
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlsplit

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from mfaserver.addresses import is_loopback
from mfaserver.cli.common import (
    CliError,
    CliState,
    confirm,
    iso_utc,
    one_line,
    pass_state,
    print_table,
    printable,
)
from mfaserver.factors import push_protocol

STORE_VERSION = 1
# The server holds a poll up to 30 seconds; the client must wait longer.
POLL_TIMEOUT = 45.0
REQUEST_TIMEOUT = 15.0
MAX_WAIT = 30
# Responses are small JSON objects; a bound keeps a broken server from
# filling memory.
MAX_RESPONSE_BYTES = 1 << 20

ENROLL_PATH = "/v1/enroll/"
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_NUMBER = re.compile(r"[0-9]{2}")  # "10".."99" (docs: Number matching)

USER_AGENT = "mfaserver-authenticator/1"


@click.group("authenticator")
def authenticator() -> None:
    """Act as a push authenticator device (a phone app stand-in).

    For testing a server end to end, for kiosks, and as the reference client
    of the device protocol (docs/device-api.rst). The device's key and id are
    kept in the --store file; the server's config file is never read.
    """


# -- the store file ----------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """An enrolled device, as kept in its store file."""

    base_url: str
    device_id: str
    user: str
    key_type: str
    private_key: object  # a cryptography private key of key_type
    ca_file: str | None

    def to_json(self) -> str:
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        document = {
            "version": STORE_VERSION,
            "base_url": self.base_url,
            "device_id": self.device_id,
            "user": self.user,
            "key_type": self.key_type,
            "private_key": pem,
            "ca_file": self.ca_file,
        }
        return json.dumps(document, indent=2) + "\n"


def _key_matches(key_type: str, key) -> bool:
    if key_type == "ed25519":
        return isinstance(key, ed25519.Ed25519PrivateKey)
    return isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)


def load_device(path: str) -> Device:
    """The device in store file ``path``; CliError if missing, unsafe or malformed.

    Like ssh with its keys, a store others may read (or write) is refused:
    it holds the private key that approves sign-ins.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CliError(f"cannot open store {path}: {exc.strerror or one_line(exc)}") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if os.name == "posix" and mode & 0o077:
            raise CliError(
                f"store {path} is accessible by others (mode {stat.S_IMODE(mode):04o}); "
                f"it holds a private key: run chmod 600 {path}"
            )
        data = file.read(MAX_RESPONSE_BYTES)
    try:
        document = json.loads(data)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        if document.get("version") != STORE_VERSION:
            raise ValueError(f"unsupported version {document.get('version')!r}")
        base_url = _str_field(document, "base_url")
        device_id = _str_field(document, "device_id")
        if not _ID.fullmatch(device_id):
            raise ValueError("device_id is not a protocol identifier")
        user = _str_field(document, "user")
        key_type = _str_field(document, "key_type")
        if key_type not in push_protocol.KEY_TYPES:
            raise ValueError(f"unknown key_type {key_type!r}")
        key = serialization.load_pem_private_key(
            _str_field(document, "private_key").encode("ascii"), password=None
        )
        if not _key_matches(key_type, key):
            raise ValueError(f"private_key is not an {key_type} key")
        ca_file = document.get("ca_file")
        if ca_file is not None and not isinstance(ca_file, str):
            raise ValueError("ca_file must be a path or null")
    except (ValueError, TypeError, UnicodeError) as exc:
        raise CliError(
            f"store {path} is not a valid authenticator store: {one_line(exc)}"
        ) from None
    return Device(base_url, device_id, user, key_type, key, ca_file)


def _str_field(document: dict, name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"missing or invalid {name}")
    return value


def _reserve_store(path: str) -> int:
    """Create the store file, empty and 0600, failing if it exists: an fd to write.

    It is created before enrolling, so a path that cannot be written fails
    before the one-time enrollment token is used up.
    """
    try:
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise CliError(f"store {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise CliError(f"cannot create store {path}: {exc.strerror or one_line(exc)}") from None


# -- HTTP --------------------------------------------------------------------

# The key in click's ``ctx.meta`` (shared by every nested context) under which
# a caller may put another `open_connection`.
CONNECT = "mfaserver.authenticator.connect"


def open_connection(scheme: str, host: str, port: int | None, timeout: float,
                    context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    """An unopened ``http.client`` connection: HTTPS with ``context``, or clear HTTP."""
    if scheme == "https":
        return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    return http.client.HTTPConnection(host, port, timeout=timeout)


@dataclass(frozen=True)
class Server:
    """Where the device's server is and how to reach it safely.

    ``connect`` makes the connection for each request (`open_connection`'s
    signature); the commands take it from ``ctx.meta[CONNECT]`` when set.
    """

    base_url: str
    ca_file: str | None = None
    connect: Callable[..., http.client.HTTPConnection] = field(
        default=open_connection, repr=False, compare=False)

    def _endpoint(self):
        parts = urlsplit(self.base_url)
        try:
            port = parts.port
        except ValueError:
            raise CliError(f"invalid port in server URL {self.base_url}") from None
        host = parts.hostname
        if not host:
            raise CliError(f"server URL {self.base_url} has no host")
        if parts.scheme == "http":
            if not is_loopback(host):
                raise CliError(
                    f"refusing clear-text http:// to {host}: use https:// "
                    "(http is allowed only to a loopback address)"
                )
        elif parts.scheme != "https":
            raise CliError(f"server URL must be https://, not {parts.scheme or 'no'} scheme")
        return parts.scheme, host, port, parts.path.rstrip("/")

    def check(self) -> None:
        """CliError unless the URL is one this client will talk to."""
        self._endpoint()

    def request(self, method: str, path: str, *, body: dict | None = None,
                headers: dict[str, str] | None = None,
                timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict | None]:
        """Send one request; (status, JSON object or None). CliError on network trouble."""
        scheme, host, port, prefix = self._endpoint()
        context = None
        if scheme == "https":
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise CliError(f"cannot load CA file {self.ca_file}: {one_line(exc)}") from None
        connection = self.connect(scheme, host, port, timeout, context)
        all_headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        try:
            connection.request(method, prefix + path, body=payload, headers=all_headers)
            response = connection.getresponse()
            data = response.read(MAX_RESPONSE_BYTES)
            status, reason = response.status, response.reason
        except ssl.SSLCertVerificationError as exc:
            raise CliError(
                f"cannot verify the TLS certificate of {host}: "
                f"{exc.verify_message or one_line(exc)} (use --ca-file at enroll)"
            ) from None
        except socket.timeout:
            raise CliError(f"no answer from {host} within {timeout:g} seconds") from None
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"cannot reach {host}: {_network_reason(exc)}") from None
        finally:
            connection.close()
        try:
            document = json.loads(data) if data else None
        except ValueError:
            document = None
        if not isinstance(document, dict):
            document = None
        if not 200 <= status < 300:
            raise CliError(_refusal(status, reason, document))
        return status, document


def _network_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.errno in errno.errorcode:
        return os.strerror(exc.errno)
    return one_line(exc)


def _refusal(status: int, reason: str, document: dict | None) -> str:
    """The one line shown for an error response (its text comes from the network)."""
    error = document.get("error") if document else None
    message = document.get("message") if document else None
    if isinstance(error, str) and isinstance(message, str):
        text = (f"server refused: {printable(error)}: {printable(message, spaces=True)}"
                f" (HTTP {status})")
    else:
        text = f"server refused: {printable(reason, spaces=True)} (HTTP {status})"
    if status == 401 and error == "stale_timestamp":
        text += "; check this computer's clock (it must be within 60 seconds of the server's)"
    elif status == 429 or status >= 500:
        text += "; try again later"
    return text


def _unexpected(what: str) -> CliError:
    return CliError(f"unexpected response from server: {what}")


def _server(base_url: str, ca_file: str | None) -> Server:
    connect = click.get_current_context().meta.get(CONNECT, open_connection)
    return Server(base_url, ca_file, connect)


def _device_server(device: Device) -> Server:
    return _server(device.base_url, device.ca_file)


# -- enroll ------------------------------------------------------------------


def parse_enrollment_url(url: str) -> tuple[str, str]:
    """(base URL, token) of ``{base}/v1/enroll/{token}``; CliError if not that form."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise CliError("enrollment URL must not have a query or fragment")
    base_path, sep, token = parts.path.rpartition(ENROLL_PATH)
    if not sep or not _ID.fullmatch(token):
        raise CliError(f"not an enrollment URL (expected .../v1/enroll/TOKEN): {printable(url)}")
    base = parts._replace(path=base_path, query="", fragment="").geturl().rstrip("/")
    return base, token


@authenticator.command("enroll")
@click.argument("url")
@click.option("--store", "store_path", metavar="FILE", required=True,
              type=click.Path(dir_okay=False),
              help="Store file to create (mode 0600) for the key and device id.")
@click.option("--key-type", type=click.Choice(list(push_protocol.KEY_TYPES)),
              default="ed25519", show_default=True, help="Kind of key pair to make.")
@click.option("--notify-ntfy", metavar="URL", help="Wake-ups by an ntfy topic URL.")
@click.option("--notify-webhook", metavar="URL", help="Wake-ups by a webhook URL.")
@click.option("--ca-file", metavar="PEM",
              type=click.Path(exists=True, dir_okay=False, readable=True),
              help="Trust only this CA for the server's certificate "
                   "(kept in the store for later commands); default: system trust.")
@pass_state
def enroll(state: CliState, url: str, store_path: str, key_type: str,
           notify_ntfy: str | None, notify_webhook: str | None, ca_file: str | None) -> None:
    """Enroll a new device with the one-time enrollment URL from `device enroll`."""
    if notify_ntfy and notify_webhook:
        raise click.UsageError("give at most one of --notify-ntfy and --notify-webhook")
    base_url, token = parse_enrollment_url(url)
    ca_file = os.path.abspath(ca_file) if ca_file else None
    server = _server(base_url, ca_file)
    server.check()

    key = push_protocol.generate_device_key(key_type)
    public_key = push_protocol.public_key_text(key)
    timestamp = int(state.now())
    message = push_protocol.enroll_message(push_protocol.token_digest(token), public_key,
                                           timestamp)
    body: dict = {"public_key": public_key, "timestamp": timestamp,
                  "signature": push_protocol.sign(key, message)}
    if notify_ntfy:
        body["notify"] = {"type": "ntfy", "url": notify_ntfy}
    elif notify_webhook:
        body["notify"] = {"type": "webhook", "url": notify_webhook}

    fd = _reserve_store(store_path)
    written = False
    try:
        status, answer = server.request("POST", ENROLL_PATH + token, body=body)
        device_id = answer.get("device_id") if answer else None
        user = answer.get("user") if answer else None
        if status != 201:
            raise _unexpected(f"HTTP {status} instead of 201 Created")
        if not isinstance(device_id, str) or not _ID.fullmatch(device_id):
            raise _unexpected("no valid device_id")
        if not isinstance(user, str) or not user:
            raise _unexpected("no valid user")
        device = Device(base_url, device_id, user, key_type, key, ca_file)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            fd = -1
            file.write(device.to_json())
            file.flush()
            os.fsync(file.fileno())
        written = True
    finally:
        if not written:
            if fd >= 0:
                os.close(fd)
            # Only the empty file this command created; nothing is lost.
            Path(store_path).unlink(missing_ok=True)
    click.echo(f"enrolled device {device_id} for user {printable(user)}")


# -- pending -----------------------------------------------------------------


def _poll_headers(device: Device, now: float) -> dict[str, str]:
    timestamp = int(now)
    nonce = push_protocol.new_nonce()
    message = push_protocol.poll_message(device.device_id, timestamp, nonce)
    return {
        "X-MFA-Timestamp": str(timestamp),
        "X-MFA-Nonce": nonce,
        "X-MFA-Signature": push_protocol.sign(device.private_key, message),
    }


@authenticator.command("pending")
@click.option("--store", "store_path", metavar="FILE", required=True,
              type=click.Path(dir_okay=False), help="The device's store file.")
@click.option("--wait", type=click.IntRange(0, MAX_WAIT), default=0, show_default=True,
              help=f"Seconds the server may hold the request until a sign-in "
                   f"appears (0..{MAX_WAIT}).")
@pass_state
def pending(state: CliState, store_path: str, wait: int) -> None:
    """List the sign-ins waiting for this device's answer."""
    device = load_device(store_path)
    path = f"/v1/devices/{device.device_id}/transactions?wait={wait}"
    _, answer = _device_server(device).request(
        "GET", path, headers=_poll_headers(device, state.now()), timeout=POLL_TIMEOUT)
    transactions = answer.get("transactions") if answer else None
    if not isinstance(transactions, list) or not all(isinstance(t, dict) for t in transactions):
        raise _unexpected("no transactions list")
    if not transactions:
        click.echo("no pending sign-ins")
        return
    rows = []
    for tx in transactions:
        expires = tx.get("expires")
        rows.append([
            tx.get("txid"),
            tx.get("client"),
            tx.get("number"),
            tx.get("user"),
            tx.get("calling_station_id"),
            iso_utc(expires) if type(expires) is int else None,
        ])
    print_table(["TXID", "CLIENT", "NUMBER", "USER", "CALLING-STATION", "EXPIRES"], rows)


# -- approve, deny, fraud ----------------------------------------------------


def _answer(state: CliState, store_path: str, txid: str, decision: str,
            number: str | None) -> None:
    if not _ID.fullmatch(txid):
        raise click.BadParameter("not a transaction id (A-Z a-z 0-9 - _)", param_hint="TXID")
    device = load_device(store_path)
    timestamp = int(state.now())
    message = push_protocol.answer_message(device.device_id, txid, decision, timestamp)
    body = {
        "device_id": device.device_id,
        "decision": decision,
        "timestamp": timestamp,
        "signature": push_protocol.sign(device.private_key, message),
    }
    # The number is checked by the server, not signed: see "Number matching".
    if number is not None:
        body["number"] = number
    _device_server(device).request("POST", f"/v1/transactions/{quote(txid)}", body=body)
    click.echo(f"{decision} sent for {txid}")


def _check_number(ctx, param, value: str | None) -> str | None:
    if value is not None and not _NUMBER.fullmatch(value):
        raise click.BadParameter("must be the two-digit number shown with the sign-in")
    return value


def _answer_options(function):
    function = click.option(
        "--number", metavar="N", callback=_check_number,
        help="The number shown for the sign-in, sent along for number matching.",
    )(function)
    function = click.option("--store", "store_path", metavar="FILE", required=True,
                            type=click.Path(dir_okay=False),
                            help="The device's store file.")(function)
    return click.argument("txid")(function)


@authenticator.command("approve")
@_answer_options
@pass_state
def approve(state: CliState, txid: str, store_path: str, number: str | None) -> None:
    """Approve sign-in TXID: it is yours."""
    _answer(state, store_path, txid, "approve", number)


@authenticator.command("deny")
@_answer_options
@pass_state
def deny(state: CliState, txid: str, store_path: str, number: str | None) -> None:
    """Deny sign-in TXID (for example, started by mistake)."""
    _answer(state, store_path, txid, "deny", number)


@authenticator.command("fraud")
@_answer_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def fraud(state: CliState, txid: str, store_path: str, number: str | None, yes: bool) -> None:
    """Report sign-in TXID as fraud: someone else has the user's password.

    The server rejects the sign-in and blocks the user until an administrator
    clears the block; the user should change their password.
    """
    if not yes:
        confirm("Report this sign-in as fraud? The user will be blocked from signing in "
                "until an administrator clears it, and should change their password.")
    _answer(state, store_path, txid, "fraud", number)
