"""``mfaserver token ...``: OATH tokens (TOTP apps, HOTP key fobs).

Seeds are shown exactly once, when ``token add`` creates the token (URI and
QR code for the authenticator app); no other command prints them.
"""

from __future__ import annotations

import sys

import click

from mfaserver.auth.model import Token, TokenKind
from mfaserver.cli.common import (
    CliError,
    CliState,
    one_line,
    pass_state,
    print_qr,
    print_table,
    printable,
    require_user,
)
from mfaserver.factors import oath
from mfaserver.store import NewToken, Store, StoreError
from mfaserver.tokens import importers

ISSUER = "mfaserver"


@click.group()
def token() -> None:
    """Manage OATH tokens."""


def _read_secret(text: str) -> bytes:
    # "-" reads the seed from stdin, which keeps it out of `ps` and shell history.
    if text == "-":
        text = sys.stdin.readline()
    try:
        return oath.parse_base32_secret(text)
    except ValueError as exc:
        # The message never repeats the input: it is a secret.
        raise CliError(f"invalid --secret: {one_line(exc)}") from None


@token.command("add")
@click.argument("name")
@click.option("--type", "kind", type=click.Choice(["totp", "hotp"], case_sensitive=False),
              required=True, help="Time-based (apps) or counter-based (key fobs).")
@click.option("--secret", metavar="BASE32",
              help="Existing seed in base32 ('-' reads it from stdin); "
                   "default: a new random seed.")
@click.option("--digits", type=click.Choice(["6", "8"]), default="6", show_default=True)
@click.option("--period", type=click.Choice(["30", "60"]), default=None,
              help="TOTP time step in seconds.  [default: 30]")
@click.option("--algorithm", type=click.Choice(list(oath.ALGORITHMS), case_sensitive=False),
              default="sha1", show_default=True)
@click.option("--counter", type=click.IntRange(min=0), default=None,
              help="HOTP next counter value.  [default: 0]")
@click.option("--serial", metavar="S", help="Token serial (default: assigned by the store).")
@click.option("--no-qr", is_flag=True, help="Print the URI only, no QR code.")
@pass_state
def add_token(state: CliState, name: str, kind: str, secret: str | None, digits: str,
              period: str | None, algorithm: str, counter: int | None,
              serial: str | None, no_qr: bool) -> None:
    """Give user NAME a new token and show it for enrolment."""
    kind_value = TokenKind(kind.lower())
    algorithm = algorithm.lower()
    # A parameter the token type ignores is a mistake worth pointing out.
    if kind_value is TokenKind.TOTP and counter is not None:
        raise click.UsageError("--counter applies to hotp tokens only")
    if kind_value is TokenKind.HOTP and period is not None:
        raise click.UsageError("--period applies to totp tokens only")
    seed = _read_secret(secret) if secret is not None else oath.generate_secret(algorithm)
    store = state.user_store(name)
    new = NewToken(kind=kind_value, secret=seed, digits=int(digits),
                   period=int(period or 30), algorithm=algorithm,
                   counter=counter or 0, serial=serial)
    added = store.add_token(name, new, now=state.now())
    uri = oath.otpauth_uri(added, issuer=ISSUER, account=name)
    click.echo(f"serial: {added.serial}")
    click.echo(f"uri: {uri}")
    if not no_qr:
        print_qr(uri)


def _token_rows(tokens: list[Token]):
    for t in tokens:
        if t.kind is TokenKind.TOTP:
            timing = f"period={t.period}s"
        else:
            timing = f"counter={t.counter}"
        yield (t.serial, t.kind.value, t.user, t.digits, timing, t.algorithm)


@token.command("list")
@click.argument("name", required=False)
@click.option("--unassigned", is_flag=True, help="List imported tokens with no user.")
@pass_state
def list_tokens(state: CliState, name: str | None, unassigned: bool) -> None:
    """List NAME's tokens (never their seeds)."""
    if unassigned == (name is not None):
        raise click.UsageError("give either NAME or --unassigned")
    store = state.store()
    if unassigned:
        tokens = store.list_unassigned_tokens()
    else:
        require_user(store, name)
        tokens = store.list_tokens(name)
    print_table(("SERIAL", "TYPE", "USER", "DIGITS", "PERIOD/COUNTER", "ALGORITHM"),
                _token_rows(tokens))


@token.command("delete")
@click.argument("name")
@click.argument("serial")
@pass_state
def delete_token(state: CliState, name: str, serial: str) -> None:
    """Delete NAME's token SERIAL."""
    store = state.user_store(name)
    store.delete_token(name, serial)
    click.echo(f"deleted token {serial} of {name}")


@token.command("assign")
@click.argument("name")
@click.argument("serial")
@pass_state
def assign_token(state: CliState, name: str, serial: str) -> None:
    """Give the unassigned (imported) token SERIAL to NAME."""
    store = state.user_store(name)
    store.assign_token(serial, name)
    click.echo(f"assigned token {serial} to {name}")


def _find_token(store: Store, name: str, serial: str) -> Token:
    for t in store.list_tokens(name):
        if t.serial == serial:
            return t
    raise CliError(f"user {name!r} has no token {serial!r}")


@token.command("resync")
@click.argument("name")
@click.argument("code1")
@click.argument("code2")
@click.option("--serial", metavar="S", help="Only try this token.")
@pass_state
def resync(state: CliState, name: str, code1: str, code2: str, serial: str | None) -> None:
    """Resynchronise NAME's token from two consecutive codes CODE1 CODE2.

    For HOTP the codes may be up to 1000 presses ahead; for TOTP the token's
    clock may be up to 120 steps off.
    """
    store = state.user_store(name)
    if serial is not None:
        candidates = [_find_token(store, name, serial)]
    else:
        candidates = store.list_tokens(name)
        if not candidates:
            raise CliError(f"user {name!r} has no tokens")
    now = state.now()
    for t in candidates:
        if t.kind is TokenKind.HOTP:
            counter = oath.resync_hotp(t, code1, code2)
            if counter is not None:
                store.set_hotp_counter(t.id, counter)
                click.echo(f"resynchronised {t.serial}: next counter {counter}")
                return
        else:
            found = oath.resync_totp(t, code1, code2, now)
            if found is not None:
                drift, last_step = found
                store.set_totp_sync(t.id, drift, last_step)
                click.echo(f"resynchronised {t.serial}: clock drift {drift:+d} steps")
                return
    raise CliError(f"the codes match no token of {name!r}")


def _existing_serials(store: Store) -> set[str]:
    serials = {t.serial for t in store.list_unassigned_tokens()}
    for info in store.list_users():
        serials.update(t.serial for t in store.list_tokens(info.name))
    return serials


@token.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--psk", metavar="HEX", help="Key of a PSKC file encrypted with a pre-shared key.")
@click.option("--user", "default_user", metavar="NAME",
              help="Owner of tokens the file assigns to no one.")
@pass_state
def import_tokens(state: CliState, file: str, psk: str | None,
                  default_user: str | None) -> None:
    """Import tokens from FILE (CSV or PSKC), all or nothing."""
    try:
        key = bytes.fromhex(psk) if psk is not None else None
    except ValueError:
        raise CliError("invalid --psk: not hexadecimal") from None
    imported = importers.load_tokens(file, psk=key)
    store = state.store(create=True)

    # Everything is checked before the first write, so a bad file adds nothing.
    owners = [t.user or default_user or None for t in imported]
    for owner in sorted({o for o in owners if o is not None}):
        require_user(store, owner)
    existing = _existing_serials(store)
    seen: set[str] = set()
    for t in imported:
        if t.serial is None:
            continue
        if t.serial in existing:
            raise CliError(f"{file}: token {t.serial!r} already exists")
        if t.serial in seen:
            raise CliError(f"{file}: token {t.serial!r} appears twice")
        seen.add(t.serial)

    now = state.now()
    added: list[Token] = []
    for t, owner in zip(imported, owners):
        new = NewToken(kind=TokenKind(t.kind), secret=t.secret, digits=t.digits,
                       period=t.period, algorithm=t.algorithm, counter=t.counter,
                       serial=t.serial)
        try:
            added.append(store.add_token(owner, new, now=now))
        except StoreError as exc:
            left = _undo_import(store, added)
            raise CliError(
                f"{file}: adding token {printable(t.serial)} failed: {one_line(exc)}; "
                + ("nothing imported" if not left else
                   "could not remove the tokens already added: " + " ".join(left))
            ) from None
    unassigned = sum(1 for owner in owners if owner is None)
    click.echo(f"imported {len(added)} tokens ({unassigned} unassigned)")


def _undo_import(store: Store, added: list[Token]) -> list[str]:
    """Delete the tokens of a failed import; return the serials still there."""
    left = [t.serial for t in added]
    for t in reversed(added):
        try:
            store.delete_token(t.user, t.serial)
        except StoreError:
            continue
        left.remove(t.serial)
    return left
