"""The admin CLI as a process of its own: what only a real pipe shows.

The commands themselves are tested in-process in tests/test_cli.py.
"""

from __future__ import annotations

import subprocess

import pytest

from mfaserver.config import load_config
from mfaserver.store import Store

from .conftest import MFASERVER, write_config

pytestmark = pytest.mark.integration

NOW = 1_700_000_000.0


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    config_path = write_config(tmp_path, port=1812)
    config = load_config(config_path)
    with Store.open(config.database_path, config.key_path) as store:
        for i in range(3):
            store.add_user(f"user{i}", password_hash=None, phone=None, now=NOW)
    proc = subprocess.Popen([*MFASERVER, "-c", str(config_path), "user", "list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes: its first write meets a closed pipe
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert b"error" not in stderr and b"Traceback" not in stderr
