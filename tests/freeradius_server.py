"""Run a real FreeRADIUS 3.2 on 127.0.0.1 for the upstream RADIUS integration tests.

`running_freeradius` writes a minimal configuration into a directory (one
client, 127.0.0.1, that must send Message-Authenticator; a ``users`` file;
PAP, and MS-CHAPv2 with MPPE keys by the ``mschap`` module), checks it with ``freeradius -C``, runs ``freeradius -f`` in the
foreground on a free UDP port, and always stops it again.

FreeRADIUS before 3.2.5 adds Message-Authenticator to a reply only when the
reply carries one, so the ``post-auth`` section below puts it there for
Access-Accept and Access-Reject. mfaserver drops unsigned replies
(BlastRADIUS), so an upstream FreeRADIUS older than 3.2.5 needs the same
lines.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

FREERADIUS = "/usr/sbin/freeradius"

# A (name, password, reply attributes) table in the users file format.
USERS = """\
alice   Cleartext-Password := "alice-password"
        Class = "vpn-users",
        Filter-Id = "staff",
        Framed-IP-Address = 10.1.2.3,
        Session-Timeout = 3600

bob     Cleartext-Password := "bob-password"
        Filter-Id = "guests"

carol   Cleartext-Password := "pässwörd, longer than one block"
        Class = "carol"

dave    Cleartext-Password := "dave-password", Response-Packet-Type := Access-Challenge
        Reply-Message = "Enter your token code"
"""

# The global part of radiusd.conf: paths, logging to stdout, no Status-Server
# answered. Formatted with ``directory``.
RADIUSD_GLOBALS = """\
prefix = /usr
raddbdir = {directory}
confdir = ${{raddbdir}}
dictdir = /usr/share/freeradius
libdir = /usr/lib/freeradius
run_dir = ${{raddbdir}}
logdir = ${{raddbdir}}
name = radiusd
pidfile = ${{raddbdir}}/radiusd.pid
max_request_time = 30
cleanup_delay = 5
max_requests = 1024
hostname_lookups = no

log {{
    destination = stdout
    auth = yes
}}

security {{
    allow_core_dumps = no
    max_attributes = 200
    reject_delay = 0
    status_server = no
}}

"""

_RADIUSD_CONF = RADIUSD_GLOBALS + """\
client mfaserver {{
    ipaddr = 127.0.0.1
    secret = {secret}
    require_message_authenticator = yes
}}

modules {{
    pap {{
    }}
    files {{
        filename = ${{raddbdir}}/users
    }}
    # MS-CHAPv2 against the Cleartext-Password of the users file, with MPPE keys.
    mschap {{
        use_mppe = yes
        require_encryption = no
        require_strong = yes
    }}
}}

server default {{
    listen {{
        type = auth
        ipaddr = 127.0.0.1
        port = {port}
    }}
    authorize {{
        files
        mschap
        pap
    }}
    authenticate {{
        Auth-Type PAP {{
            pap
        }}
        Auth-Type MS-CHAP {{
            mschap
        }}
    }}
    post-auth {{
        # FreeRADIUS < 3.2.5 signs a reply only if it holds a Message-Authenticator.
        update reply {{
            &Message-Authenticator := 0x00
        }}
        Post-Auth-Type REJECT {{
            update reply {{
                &Message-Authenticator := 0x00
            }}
        }}
        Post-Auth-Type Challenge {{
            update reply {{
                &Message-Authenticator := 0x00
            }}
        }}
    }}
}}
"""


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FreeRadius:
    """A running FreeRADIUS and where to reach it."""

    port: int
    secret: bytes
    directory: Path
    proc: subprocess.Popen

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def log_text(self) -> str:
        return (self.directory / "radiusd.out").read_text(errors="replace")


def daemon_config(server: FreeRadius, pass_through: tuple[str, ...]) -> str:
    """The mfaserver config lines that make ``server`` the upstream directory."""
    names = ", ".join(f'"{name}"' for name in pass_through)
    return f"""
[directory]
backend = "radius"

[directory.radius]
servers = ["127.0.0.1:{server.port}"]
secret = "{server.secret.decode()}"
timeout = 2
pass_through = [{names}]
"""


def write_config(directory: Path, port: int, secret: bytes, users: str = USERS,
                 radiusd_conf: str = _RADIUSD_CONF) -> None:
    """Write radiusd.conf (``radiusd_conf`` formatted with ``directory``, ``port`` and
    ``secret``) and the users file into ``directory``."""
    (directory / "radiusd.conf").write_text(
        radiusd_conf.format(directory=directory, port=port, secret=secret.decode("ascii")))
    (directory / "users").write_text(users)


@contextlib.contextmanager
def running_freeradius(directory: Path, secret: bytes, users: str = USERS,
                       radiusd_conf: str = _RADIUSD_CONF) -> Iterator[FreeRadius]:
    """Run FreeRADIUS from a fresh config in ``directory`` (the default one, or
    ``radiusd_conf``: see `write_config`); stop it on exit."""
    if shutil.which(FREERADIUS) is None:
        pytest.fail("freeradius is missing: run scripts/test, which installs it")
    port = free_udp_port()
    write_config(directory, port, secret, users, radiusd_conf)
    check = subprocess.run([FREERADIUS, "-C", "-d", str(directory), "-l", "stdout"],
                           capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise AssertionError(f"freeradius -C refused the config:\n{check.stdout}{check.stderr}")
    with open(directory / "radiusd.out", "w") as out:
        proc = subprocess.Popen([FREERADIUS, "-f", "-d", str(directory), "-l", "stdout"],
                                stdout=out, stderr=subprocess.STDOUT)
    server = FreeRadius(port, secret, directory, proc)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_ready(server: FreeRadius, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if "Ready to process requests" in server.log_text():
            return
        if server.proc.poll() is not None:
            raise AssertionError(f"freeradius exited:\n{server.log_text()}")
        time.sleep(0.05)
    raise AssertionError(f"freeradius did not start:\n{server.log_text()}")
