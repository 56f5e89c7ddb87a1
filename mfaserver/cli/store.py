"""``mfaserver migrate`` and ``mfaserver store copy``: the store's schema and its engine."""

from __future__ import annotations

from pathlib import Path

import click

from mfaserver.cli.common import CliError, CliState, pass_state


@click.command()
@pass_state
def migrate(state: CliState) -> None:
    """Bring the store's schema up to date (the daemon also does it at start).

    Safe to run on several nodes at once: one migrates, the others find it done.
    """
    from mfaserver.store import SCHEMA_VERSION
    state.store(create=True)
    click.echo(f"store schema at version {SCHEMA_VERSION} ({_describe(state)})")


@click.group()
def store() -> None:
    """The durable store as a whole."""


@store.command("copy")
@click.option("--to", "target", required=True, metavar="DSN|FILE",
              help="A PostgreSQL connection string (key=value or postgresql://...) or "
                   "the path of a new SQLite database file.")
@pass_state
def copy(state: CliState, target: str) -> None:
    """Copy the whole configured store into an empty one, with its encrypted seeds.

    Moves a SQLite store to PostgreSQL, or back. The target uses the same seed
    key file (state_dir/seed.key): give every node a copy of it. Stop the
    daemon first; the target must be empty. Then point [store] at the target.
    """
    from mfaserver.store.copy import copy_store

    source = state.store()
    destination, label = _open_target(state, target)
    try:
        report = copy_store(source, destination)
    finally:
        destination.close()
    click.echo(f"copied {report.summary()} to {label}")


def _open_target(state: CliState, target: str):
    config = state.config()
    if _is_dsn(target):
        from mfaserver.store.pg import PgStore, describe
        if config.store.backend == "postgresql" and config.store.dsn == target:
            raise CliError("the target is the configured store")
        return PgStore.open(target, config.key_path, create=False), describe(target)
    from mfaserver.store import Store
    path = Path(target).absolute()
    if config.store.backend == "sqlite" and path == config.database_path.absolute():
        raise CliError("the target is the configured store")
    if not path.parent.is_dir():
        raise CliError(f"{path.parent} is not a directory")
    return Store.open(path, config.key_path, create=True), str(path)


def _is_dsn(target: str) -> bool:
    """A libpq connection string (URI or key=value) rather than a file path."""
    return target.startswith(("postgresql://", "postgres://")) or "=" in target.split("/")[0]


def _describe(state: CliState) -> str:
    config = state.config()
    if config.store.backend == "postgresql":
        from mfaserver.store.pg import describe
        return describe(config.store.dsn)
    return f"SQLite {config.database_path}"
