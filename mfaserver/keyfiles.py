"""Files that hold a private key: read only when private, written once, never replaced.

The seed key (`mfaserver.store.crypto`) and the Web Push key
(`mfaserver.gateways.webpush`) live in files of their own in state_dir. A key
file must be a regular file (a link planted in its place is refused) that
neither group nor others may access; a new one is made with mode 0600, in a
folder made 0700, and never over an existing file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class KeyFileProblem(Exception):
    """The key file cannot be used; the message says why and how to fix it."""


def read_private(path: Path, what: str, max_size: int = 64 * 1024) -> bytes:
    """The contents of the key file ``path`` (``what`` names it in errors).

    Raises FileNotFoundError if it is missing, `KeyFileProblem` if it cannot
    be read, is not a regular file, lets group or others read it, or is
    larger than ``max_size`` (no key file is).
    """
    try:
        # O_NOFOLLOW: a symlink planted in place of the key is refused.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeyFileProblem(
            f"cannot read {what} {path}: {e.strerror}; it must be a regular file owned"
            f" by the service user with mode 0600") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileProblem(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileProblem(
                f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}, which lets"
                f" group/others read it; fix with: chmod 600 {path}")
        if st.st_size > max_size:
            raise KeyFileProblem(f"{what} {path} is too large ({st.st_size} bytes)")
        return os.read(fd, st.st_size)
    finally:
        os.close(fd)


def write_new_private(path: Path, data: bytes) -> None:
    """Write ``data`` as the new key file ``path`` (0600; its folder made 0700).

    Raises FileExistsError if the file exists: a key that data is tied to is
    never replaced. A file that could not be written whole is removed.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write ({written} bytes)")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        # A truncated key would fail every later start; leave nothing behind.
        os.unlink(path)
        raise
    os.close(fd)
