"""``mfaserver device ...``: push devices (enroll, list, delete)."""

from __future__ import annotations

import click

from mfaserver.cli.common import (
    CliError, CliState, iso_utc, pass_state, print_qr, print_table, printable,
)
from mfaserver.factors.push_protocol import new_enrollment_token, token_digest


@click.group()
def device() -> None:
    """Manage push devices (authenticator apps)."""


@device.command("enroll")
@click.argument("name")
@click.option("--no-qr", is_flag=True, help="Print only the URL, no QR code.")
@pass_state
def enroll(state: CliState, name: str, no_qr: bool) -> None:
    """Print a one-time enrollment URL (and its QR code) for NAME's phone.

    The app scans it and enrolls its key; the URL is valid once, for
    [push] enrollment_minutes (10 by default).
    """
    config = state.config()
    if config.web is None or not config.web.public_url:
        raise CliError("devices enroll through the web listener: set [web] public_url")
    store = state.user_store(name)
    token = new_enrollment_token()
    now = state.now()
    minutes = config.push.enrollment_minutes
    # Only the digest is stored: the URL is the secret, and it is shown once.
    store.add_enrollment(name, token_digest(token), now + minutes * 60, now=now)
    url = f"{config.web.public_url.rstrip('/')}/v1/enroll/{token}"
    click.echo(url)
    if not no_qr:
        print_qr(url)
    click.echo(f"valid once, until {iso_utc(now + minutes * 60)}, for user {name}")


@device.command("list")
@click.argument("name")
@pass_state
def list_devices(state: CliState, name: str) -> None:
    """List NAME's devices."""
    store = state.user_store(name)
    devices = store.list_devices(name)
    if not devices:
        click.echo(f"{name} has no devices")
        return
    print_table(("ID", "KEY", "NOTIFY", "ENROLLED"), [
        (d.id, d.public_key.partition(":")[0], printable(d.notify_type or "-"),
         iso_utc(d.created)) for d in devices])


@device.command("delete")
@click.argument("name")
@click.argument("device_id")
@pass_state
def delete_device(state: CliState, name: str, device_id: str) -> None:
    """Remove device DEVICE_ID of NAME (a lost or replaced phone)."""
    store = state.user_store(name)
    store.delete_device(name, device_id)
    click.echo(f"deleted device {device_id} of {name}")
