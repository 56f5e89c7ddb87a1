"""The settings of the directories: what [directory] and its sub-tables hold.

`mfaserver.config` reads them from the file; the directories, the sync and
their tests take them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LdapConfig:
    """[directory.ldap]: an LDAP or Active Directory server set."""

    servers: tuple[str, ...]
    base_dn: str
    bind_dn: str = ""
    bind_password: str = field(default="", repr=False)
    start_tls: bool = False
    ca_file: Path | None = None
    user_filter: str = "(uid={username})"
    username_attribute: str = "uid"
    required_group: str = ""          # lower-cased DN, "" = no group required
    phone_attribute: str = "mobile"
    timeout: float = 5.0
    allow_plaintext: bool = False
    active_directory: bool = False
    ad_domain: str = ""               # NetBIOS name accepted in DOMAIN\user ("" = any)
    pool_size: int = 8
    retry_dead_after: float = 30.0
    processes: int = 0                # LDAP worker processes; 0 = automatic
    client: str = "libldap"           # "libldap" (python-ldap, on the reactor) or "ldap3"


@dataclass(frozen=True)
class UpstreamRadiusConfig:
    """[directory.radius]: upstream RADIUS servers that check the password."""

    servers: tuple[tuple[str, int], ...]
    secret: bytes = field(repr=False)
    timeout: float = 3.0
    retries: int = 1
    pass_through: tuple[str, ...] = ()
    nas_identifier: str = "mfaserver"
    retry_dead_after: float = 30.0


@dataclass(frozen=True)
class SyncConfig:
    """[directory.sync]: importing users and phone numbers from LDAP."""

    interval: float = 0.0             # seconds between runs in the daemon; 0 = never
    keep_days: int = 30               # users gone from LDAP stay (disabled) this long
    filter: str = ""                  # "" = user_filter with {username} = *


@dataclass(frozen=True)
class DirectoryConfig:
    """[directory]: the user directories, tried in order."""

    backends: tuple[str, ...] = ("local",)
    ldap: LdapConfig | None = None
    radius: UpstreamRadiusConfig | None = None
    sync: SyncConfig = SyncConfig()
