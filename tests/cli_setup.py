"""Config files and in-process ``mfaserver`` runs for the CLI and sync tests (unit, integration)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from mfaserver.cli.common import CliState
from mfaserver.cli.main import cli
from mfaserver.store.db import SyncResult

NOW = 1_700_000_000.0
DAY = 86400.0
ALICE_PHONE = "+14155550123"
BOB_PHONE = "+442071838750"

# The smallest valid config.
CONFIG = """\
[server]
state_dir = "state"

[[radius.clients]]
name = "t"
address = "127.0.0.1"
secret = "0123456789abcdef0123"
"""


def write_config(tmp_path: Path, servers=("ldap://127.0.0.1:9",), ldap_extra="", sync_extra="",
                 with_ldap=True) -> Path:
    """Write ``tmp_path/mfaserver.toml``: `CONFIG` with [directory.sync], and
    [directory.ldap] on ``servers`` unless not ``with_ldap``; the extras go
    into those two sections."""
    path = tmp_path / "mfaserver.toml"
    text = f"""{CONFIG}
[directory.sync]
keep_days = 30
{sync_extra}
"""
    if with_ldap:
        urls = ", ".join(f'"{u}"' for u in servers)
        text += f"""
[directory.ldap]
servers = [{urls}]
base_dn = "dc=example,dc=org"
{ldap_extra}
"""
    path.write_text(text)
    return path


def invoke_sync(config_path: Path, *args: str, now: float = NOW):
    """Run ``mfaserver -c CONFIG sync ARGS`` in-process with the clock at ``now``."""
    state = CliState(clock=lambda: now)
    return CliRunner().invoke(cli, ["-c", str(config_path), "sync", *args], obj=state)


def sync_many_users(store, count: int, changes: int) -> None:
    """Sync ``count`` users into an empty ``store``, then again with ``changes`` of them
    gone, ``changes`` new ones and ``changes`` with a new number; check the counts."""
    entries = [(f"user{i:06d}", f"+1415555{i % 10000:04d}") for i in range(count)]
    assert store.sync_users(entries, now=NOW, keep_days=30) == SyncResult(added=count)
    changed = [(name, BOB_PHONE) if i < changes else (name, phone)
               for i, (name, phone) in enumerate(entries[changes:])]
    changed += [(f"new{i:06d}", None) for i in range(changes)]
    result = store.sync_users(changed, now=NOW + 1, keep_days=30)
    assert result == SyncResult(added=changes, updated=changes, disabled=changes,
                                unchanged=count - 2 * changes)
    assert store.count_users(source="ldap") == count + changes
