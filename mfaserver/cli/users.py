"""``mfaserver user ...``: local users, their passwords, phones and blocks."""

from __future__ import annotations

import click

from mfaserver.cli.common import (
    CliError,
    CliState,
    confirm,
    iso_utc,
    parse_phone,
    pass_state,
    print_qr,
    print_table,
    read_password,
    region_option,
    require_user,
)
from mfaserver.factors import METHOD_NAMES
from mfaserver.factors.push_protocol import new_enrollment_token, token_digest
from mfaserver.passwords import hash_password
from mfaserver.store import UserInfo

password_stdin_option = click.option(
    "--password-stdin", is_flag=True,
    help="Read the password as one line from stdin instead of prompting.",
)


def _status(info: UserInfo, now: float) -> str:
    if info.disabled_since is not None:
        return f"disabled (left the directory {iso_utc(info.disabled_since)})"
    if info.blocked:
        return "blocked"
    if info.locked_until is not None and info.locked_until > now:
        return f"locked until {iso_utc(info.locked_until)}"
    return "active"


@click.group()
def user() -> None:
    """Manage users."""


@user.command("add")
@click.argument("name")
@password_stdin_option
@click.option("--no-password", is_flag=True,
              help="Store no local password (the password is checked elsewhere, "
                   "e.g. by LDAP).")
@click.option("--phone", metavar="NUMBER", help="Phone number for SMS/voice, +CC form.")
@region_option
@pass_state
def add_user(state: CliState, name: str, password_stdin: bool, no_password: bool,
             phone: str | None, region: str | None) -> None:
    """Add user NAME, asking for a password."""
    if no_password and password_stdin:
        raise click.UsageError("--no-password and --password-stdin exclude each other")
    if not name.strip() or name != name.strip():
        raise CliError(f"invalid user name {name!r}")
    # Validate everything before the slow hash and before touching the store.
    e164 = parse_phone(phone, region) if phone is not None else None
    store = state.store(create=True)
    if store.get_user(name) is not None:
        raise CliError(f"user {name!r} already exists")
    password_hash = None if no_password else hash_password(read_password(password_stdin))
    store.add_user(name, password_hash=password_hash, phone=e164, now=state.now())
    click.echo(f"added user {name}")


@user.command("list")
@pass_state
def list_users(state: CliState) -> None:
    """List all users."""
    now = state.now()
    rows = [
        (info.name, info.phone, _status(info, now), info.failures, info.token_count,
         "yes" if info.has_password else "no")
        for info in state.store().list_users()
    ]
    print_table(("NAME", "PHONE", "STATUS", "FAILURES", "TOKENS", "PASSWORD"), rows)


@user.command("show")
@click.argument("name")
@pass_state
def show_user(state: CliState, name: str) -> None:
    """Show one user and their tokens."""
    store = state.store()
    info = require_user(store, name)
    lines = [
        ("name", info.name),
        ("phone", info.phone or "-"),
        ("status", _status(info, state.now())),
        ("blocked", "yes" if info.blocked else "no"),
        ("failures", info.failures),
        ("locked until", iso_utc(info.locked_until)),
        ("password", "yes" if info.has_password else "no"),
        ("source", info.source),
        ("created", iso_utc(info.created)),
        ("tokens", info.token_count),
    ]
    account = store.load_account(name)
    if account is not None:
        lines[-1:-1] = [
            ("default", account.default_method or "(server default)"),
            ("devices", account.devices),
            ("voice PIN", "set" if account.has_pin else "-"),
        ]
    for label, value in lines:
        click.echo(f"{label + ':':<14}{value}")
    for token in store.list_tokens(name):
        click.echo(f"  {token.serial}  {token.kind.value}")


@user.command("passwd")
@click.argument("name")
@password_stdin_option
@pass_state
def passwd(state: CliState, name: str, password_stdin: bool) -> None:
    """Set NAME's password."""
    store = state.user_store(name)
    store.set_password(name, hash_password(read_password(password_stdin)))
    click.echo(f"password set for {name}")


@user.command("set-phone")
@click.argument("name")
@click.argument("number", required=False)
@click.option("--clear", is_flag=True, help="Remove the phone number.")
@region_option
@pass_state
def set_phone(state: CliState, name: str, number: str | None, clear: bool,
              region: str | None) -> None:
    """Set (or with --clear, remove) NAME's phone number."""
    if clear == (number is not None):
        raise click.UsageError("give either NUMBER or --clear")
    e164 = None if clear else parse_phone(number, region)
    store = state.user_store(name)
    store.set_phone(name, e164)
    click.echo(f"phone of {name} {'cleared' if clear else 'set to ' + e164}")


@user.command("set-default")
@click.argument("name")
@click.argument("method", type=click.Choice(METHOD_NAMES + ("none",)))
@pass_state
def set_default(state: CliState, name: str, method: str) -> None:
    """Set the second factor a bare password starts for NAME ("none": the server's)."""
    store = state.user_store(name)
    store.set_default_method(name, None if method == "none" else method)
    click.echo(f"default method of {name} set to {method}")


@user.command("set-pin")
@click.argument("name")
@click.option("--pin-stdin", is_flag=True, help="Read the PIN as one line from stdin.")
@click.option("--clear", is_flag=True, help="Remove the PIN.")
@pass_state
def set_pin(state: CliState, name: str, pin_stdin: bool, clear: bool) -> None:
    """Set NAME's PIN for phone calls in [voice] pin mode (4 to 12 digits)."""
    store = state.user_store(name)
    if clear:
        store.set_pin(name, None)
        click.echo(f"PIN of {name} cleared")
        return
    if pin_stdin:
        pin = click.get_text_stream("stdin").readline().rstrip("\r\n")
    else:
        pin = click.prompt("PIN", hide_input=True, confirmation_prompt=True)
    # "0" alone reports fraud on the call, so a PIN is at least 4 digits.
    if not (pin.isascii() and pin.isdigit() and 4 <= len(pin) <= 12):
        raise CliError("a PIN is 4 to 12 digits")
    store.set_pin(name, hash_password(pin))
    click.echo(f"PIN of {name} set")


@user.command("invite")
@click.argument("name")
@click.option("--hours", type=click.FloatRange(1, 720), metavar="HOURS",
              help="How long the link stays valid (default: [portal] invite_hours).")
@click.option("--no-qr", is_flag=True, help="Print only the URL, no QR code.")
@pass_state
def invite(state: CliState, name: str, hours: float | None, no_qr: bool) -> None:
    """Print a one-time portal link (and its QR code) for NAME's first second factor.

    With the link and their password, a user who has no second factor yet
    signs in to the portal once and sets one up there.
    """
    config = state.config()
    if config.portal is None:
        raise CliError("invites are for the self-service portal: add a [portal] section")
    if config.web is None or not config.web.public_url:
        raise CliError("the portal is reached through the web listener: set [web] public_url")
    store = state.user_store(name)
    token = new_enrollment_token()
    now = state.now()
    expires = now + (config.portal.invite_hours if hours is None else hours) * 3600
    # Only the digest is stored: the URL is the secret, and it is shown once.
    store.add_invite(name, token_digest(token), expires, now=now)
    url = f"{config.web.public_url.rstrip('/')}/portal/invite/{token}"
    click.echo(url)
    if not no_qr:
        print_qr(url)
    click.echo(f"valid once, until {iso_utc(expires)}, for user {name}")
    account = store.load_account(name)
    if account is not None and (account.tokens or account.devices):
        click.echo(f"note: {name} has a second factor already; the portal takes an invite "
                   "only from a user who has none", err=True)


@user.command("block")
@click.argument("name")
@pass_state
def block(state: CliState, name: str) -> None:
    """Refuse all logins of NAME until unblocked."""
    store = state.user_store(name)
    store.set_blocked(name, True)
    click.echo(f"blocked {name}")


@user.command("unblock")
@click.argument("name")
@pass_state
def unblock(state: CliState, name: str) -> None:
    """Allow NAME to log in again; also clears a lockout after failures."""
    store = state.user_store(name)
    store.set_blocked(name, False)
    click.echo(f"unblocked {name}")


@user.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def delete_user(state: CliState, name: str, yes: bool) -> None:
    """Delete NAME and their tokens."""
    store = state.store()
    info = require_user(store, name)
    if not yes:
        confirm(f"Delete user {name} and {info.token_count} token(s)?")
    store.delete_user(name)
    click.echo(f"deleted user {name}")
