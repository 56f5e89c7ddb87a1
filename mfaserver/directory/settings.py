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
class AdConfig:
    """[directory.ad]: Active Directory without NPS, for MS-CHAPv2 logins.

    ``mschap = "ntlm_auth"`` has Samba's ``ntlm_auth`` (winbind, the machine
    joined to the domain) check MS-CHAPv2 responses, as FreeRADIUS does.
    """

    mschap: str = "none"                  # "none" | "ntlm_auth"
    ntlm_auth: str = "/usr/bin/ntlm_auth"
    domain: str = ""                      # --domain; "" lets winbind use its own
    config_file: str = ""                 # --configfile (an smb.conf), "" for the default
    timeout: float = 5.0                  # seconds before ntlm_auth is killed
    max_processes: int = 32               # ntlm_auth children at once; more: unavailable


@dataclass(frozen=True)
class DirectoryConfig:
    """[directory]: the user directories, tried in order."""

    backends: tuple[str, ...] = ("local",)
    ldap: LdapConfig | None = None
    radius: UpstreamRadiusConfig | None = None
    sync: SyncConfig = SyncConfig()
    ad: AdConfig | None = None
