"""Plumbing shared by the admin commands: state, errors, store access, output.

The CLI is an edge like ``service.py``: it is the one place besides the daemon
that reads the clock, the config file and the database. Every command opens
the SQLite store directly, so a running daemon sees a change at once.
"""

from __future__ import annotations

import io
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import click

from mfaserver import phones
from mfaserver.config import Config, ConfigError, load_config, open_store, resolve_config_path
from mfaserver.store import KeyFileError, SeedIntegrityError, Store, StoreError, UserInfo
from mfaserver.tokens.importers import TokenImportError

# Failures an admin can cause or fix (bad input, bad config, missing key, a
# locked or unreadable database): shown as one line, never as a traceback.
# Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (
    ConfigError,
    StoreError,
    KeyFileError,
    SeedIntegrityError,
    TokenImportError,
    sqlite3.Error,
    OSError,
)


class CliError(click.ClickException):
    """A one-line ``error: ...`` on stderr and exit status 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=True)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` folded onto one line (some messages quote a file)."""
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


class ErrorHandlingGroup(click.Group):
    """The root group: turns expected failures of any subcommand into CliError.

    Subgroups are invoked from inside this ``invoke``, so wrapping it once
    covers every command. Click's own usage errors pass through untouched.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as Unix tools do,
            # with the status of a process killed by SIGPIPE.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(128 + 13)
        except EXPECTED_ERRORS as exc:
            if isinstance(exc, SeedIntegrityError):
                message = f"seed integrity check failed: {one_line(exc)}"
            elif isinstance(exc, sqlite3.Error):
                message = f"database: {one_line(exc)}"
            else:
                message = one_line(exc)
            raise CliError(message) from None


@dataclass
class CliState:
    """Per-invocation state, kept in ``ctx.obj``.

    ``clock`` is injectable so tests can pin the time; the config and the
    store are opened lazily, once, and the store is closed with the context.
    """

    config_option: str | None = None
    clock: Callable[[], float] = time.time
    _config: Config | None = field(default=None, repr=False)
    _store: Store | None = field(default=None, repr=False)

    def config_path(self) -> Path:
        return resolve_config_path(self.config_option)

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path())
        return self._config

    def store(self, *, create: bool = False) -> Store:
        """The store; only commands that add things may ``create`` it.

        Reading commands never create a database or key as a side effect
        (a mistyped config path should fail, not start an empty install).
        """
        if self._store is None:
            config = self.config()
            fresh = [p for p in _state_files(config) if not p.exists()]
            self._store = open_store(config, create=create)
            click.get_current_context().find_root().call_on_close(self._close_store)
            if fresh:
                give_to_state_dir_owner(config.server.state_dir,
                                        [p for p in fresh if p.exists()])
        return self._store

    def user_store(self, name: str) -> Store:
        """The store, once it is known to hold the user ``name`` (else a CliError)."""
        store = self.store()
        require_user(store, name)
        return store

    def now(self) -> float:
        return self.clock()

    def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()


pass_state = click.make_pass_decorator(CliState, ensure=True)


def _state_files(config: Config) -> list[Path]:
    db = config.database_path
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
            config.key_path]


def give_to_state_dir_owner(state_dir: Path, paths: Iterable[Path]) -> None:
    """Hand files root just created to the owner of the state directory.

    Admins run the CLI with sudo while the daemon runs as its own user: a
    database or key created 0600 by root on the first ``user add`` would
    lock the daemon out. Non-root runs create files as themselves already.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    owner = os.stat(state_dir)
    if owner.st_uid == 0:
        return
    for path in paths:
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


def require_user(store: Store, name: str) -> UserInfo:
    """The user called ``name``, or a CliError naming it."""
    user = store.get_user(name)
    if user is None:
        raise CliError(f"no such user {name!r}")
    return user


def confirm(question: str) -> None:
    """Ask ``question`` (y/N) on the terminal; stop unless the answer is yes.

    A script or a pipe has no one to ask: rather than click's bare "Aborted!"
    (it reads no answer, which counts as no), the command stops saying that
    ``--yes`` confirms it.
    """
    if not stdin_is_terminal():
        raise CliError(f"{question} Standard input is not a terminal, so nobody can "
                       "answer: add --yes to confirm.")
    click.confirm(question, abort=True)


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def read_password(password_stdin: bool) -> str:
    """A new password: one line from stdin, or asked twice without echo."""
    if password_stdin:
        line = sys.stdin.readline()
        # Only the line ending goes: spaces may be part of the password.
        if line.endswith("\n"):
            line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
        password = line
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True,
                                default="", show_default=False)
    if not password:
        raise CliError("empty password")
    return password


def parse_phone(number: str, region: str | None = None) -> str:
    """``number`` in E.164 form; international (+CC) unless ``region`` is given."""
    try:
        return phones.parse_phone(number, region)
    except phones.InvalidPhoneNumber as e:
        hint = " or pass --region" if e.no_country and not region else ""
        raise CliError(f"invalid phone number {number!r}: {e.reason}{hint}") from None


def region_option(function):
    """The ``--region`` option shared by the commands that take a phone number."""
    return click.option(
        "--region", metavar="CC",
        help="Default country (e.g. US, DE) for numbers written without +CC.",
    )(function)


def printable(value: object, *, spaces: bool = False) -> str:
    """``value`` safe for one field of a terminal line; "-" if empty.

    Usernames and station ids in the audit log come from the network: control
    characters (newlines, ANSI escapes) are escaped so a hostile value cannot
    forge log lines or drive the admin's terminal; so are spaces, which would
    shift the columns, unless ``spaces`` allows them.
    """
    if value is None or value == "":
        return "-"
    text = str(value)
    if all(ch.isprintable() and (spaces or ch != " ") for ch in text):
        return text
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if spaces else escaped.replace(" ", "\\x20")


def iso_utc(timestamp: float | None) -> str:
    """``timestamp`` as ISO-8601 UTC to the second, or "-"."""
    if timestamp is None:
        return "-"
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Left-aligned columns, two spaces apart, with a header line."""
    cells = [[printable(cell, spaces=True) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    for row in [list(headers), *cells]:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths))
        click.echo(line.rstrip())


def print_qr(data: str) -> None:
    """Draw ``data`` as a QR code on stdout, for a phone's authenticator app.

    The compact form (Unicode half blocks) is drawn when stdout can encode
    it; otherwise ANSI colour blocks. Always a full QR code, never a Micro
    QR code, which authenticator apps cannot read.
    """
    qr = _make_qr(data)
    out = sys.stdout
    buffer = io.StringIO()
    qr.terminal(out=buffer, compact=True)
    text = buffer.getvalue()
    encoding = getattr(out, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        buffer = io.StringIO()
        qr.terminal(out=buffer)
        text = buffer.getvalue()
    out.write(text)
    out.flush()


def _make_qr(data: str):
    import segno  # only token add draws QR codes

    return segno.make_qr(data, error="m")
