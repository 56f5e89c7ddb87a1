"""The ``mfaserver`` command: the click group and its top-level commands.

Nouns with several verbs live in their own modules (``users``, ``tokens``);
``check-config``, ``run``, ``bypass``, ``log`` and ``sync`` are single verbs
and live here.
"""

from __future__ import annotations

import click

from mfaserver.cli import authenticator, devices, store, tokens, users
from mfaserver.cli.common import (
    CliError,
    CliState,
    ErrorHandlingGroup,
    iso_utc,
    one_line,
    pass_state,
    printable,
)

MAX_BYPASS_MINUTES = 1440


@click.group(cls=ErrorHandlingGroup,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_option", metavar="FILE",
              help="Config file (default: $MFASERVER_CONFIG, "
                   "else /etc/mfaserver/mfaserver.toml).")
@click.version_option(package_name="mfaserver", prog_name="mfaserver")
@click.pass_context
def cli(ctx: click.Context, config_option: str | None) -> None:
    """Administer an mfaserver RADIUS MFA server.

    Changes are written straight to the database; a running server sees
    them at once.
    """
    state = ctx.ensure_object(CliState)
    state.config_option = config_option


cli.add_command(users.user)
cli.add_command(tokens.token)
cli.add_command(devices.device)
cli.add_command(authenticator.authenticator)
cli.add_command(store.migrate)
cli.add_command(store.store)


@cli.command("check-config")
@pass_state
def check_config(state: CliState) -> None:
    """Load the config file and report problems; exit 1 if it is unusable."""
    path = state.config_path()
    config = state.config()
    click.echo(f"{path}: OK")
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command()
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log lines as text or as JSON objects (default: [server] log_format).")
@click.option("--worker", type=click.IntRange(0, None), default=0, hidden=True,
              help="Which of [server] workers this process is (started by worker 0).")
@pass_state
@click.pass_context
def run(ctx: click.Context, state: CliState, log_format: str | None, worker: int) -> None:
    """Run the server in the foreground until stopped."""
    config = state.config()
    # Imported here so admin commands never pay for (or depend on) the daemon.
    from mfaserver.service import run_daemon

    ctx.exit(int(run_daemon(config, log_format=log_format, worker=worker) or 0))


@cli.command()
@click.argument("name")
@click.option("--minutes", type=click.IntRange(1, MAX_BYPASS_MINUTES), required=True,
              help=f"How long the bypass stays usable (1..{MAX_BYPASS_MINUTES}).")
@pass_state
def bypass(state: CliState, name: str, minutes: int) -> None:
    """Let NAME's next login pass on the password alone (one use)."""
    store = state.user_store(name)
    store.add_bypass(name, state.now() + minutes * 60)
    click.echo(f"bypass for {name}: next login within {minutes} minutes "
               "passes on the password alone")


@cli.command("log")
@click.option("--user", "user", metavar="NAME", help="Only this user's entries.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many entries to show.")
@pass_state
def show_log(state: CliState, user: str | None, limit: int) -> None:
    """Show recent authentication decisions, newest first.

    Columns: time (UTC), outcome, user, client, NAS IP, calling station,
    factor, reason; "-" where empty.
    """
    entries = state.store().recent_audit(user=user, limit=limit)
    # The order is part of the contract, so do not rely on the store for it.
    entries = sorted(entries, key=lambda e: (e.time, e.id or 0), reverse=True)
    for entry in entries:
        fields = (entry.outcome, entry.user, entry.client, entry.nas_ip,
                  entry.calling_station_id, entry.factor, entry.reason)
        click.echo(" ".join([iso_utc(entry.time), *map(printable, fields)]))


@cli.command()
@click.option("--dry-run", is_flag=True, help="Report what would change; change nothing.")
@click.option("--force", is_flag=True,
              help="Apply even an empty directory (disables every synced user).")
@pass_state
def sync(state: CliState, dry_run: bool, force: bool) -> None:
    """Import users and phone numbers from LDAP ([directory.ldap]).

    Adds new directory users, updates changed phone numbers (E.164; invalid
    ones are reported and not stored), disables users who left the
    directory and removes them after [directory.sync] keep_days. Users
    added with "user add" are never changed.
    """
    # Imported here so other commands never load the LDAP client.
    from mfaserver.directory.sync import SyncError, run_sync

    config = state.config()
    if config.directory.ldap is None:
        raise CliError(f"{config.path}: [directory.ldap] is not configured: nothing to sync from")
    # A dry run must not create a database as a side effect.
    store = state.store(create=not dry_run)
    try:
        report = run_sync(config, store, state.now(), force=force, dry_run=dry_run)
    except SyncError as e:
        raise CliError(one_line(e)) from None
    click.echo(report.summary())
    for line in report.details():
        click.echo(printable(line, spaces=True))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="mfaserver")


if __name__ == "__main__":
    main()
