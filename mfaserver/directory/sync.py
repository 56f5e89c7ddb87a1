"""Directory sync: import users and their phone numbers from LDAP into the MFA store.

``mfaserver sync`` and the daemon's periodic run call `run_sync`: it reads
every user matching the sync filter from [directory.ldap] (a paged search,
bound as the service account), normalises phone numbers to E.164 and hands
the result to `Store.sync_users`, which adds, updates, disables and finally
removes 'ldap' users in one transaction. Users added with the CLI ('local')
are never changed.

Everything here blocks (ldap3 in its synchronous mode, SQLite): run it in
the CLI process or on a worker thread, never on the reactor thread.

Safety: a fetch that fails, is cut short or hits a size limit raises
`SyncError` and nothing is written; a fetch that returns no usable users
while the store holds 'ldap' users is refused unless ``force`` is given,
so a wrong base DN or filter cannot disable everyone at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import ldap3
from ldap3.core.exceptions import LDAPOperationResult

from mfaserver.directory.settings import LdapConfig, SyncConfig
from mfaserver.directory.ldap_worker import VerifiedTls, tls_context
from mfaserver.phones import InvalidPhoneNumber, parse_phone
from mfaserver.store.db import Store, StoreError, SyncResult, check_user_name

__all__ = [
    "DirectoryUser",
    "InvalidPhoneNumber",
    "Problem",
    "SyncError",
    "SyncReport",
    "fetch_directory_users",
    "normalise_phone",
    "prepare_entries",
    "run_sync",
    "sync_filter",
]

PAGE_SIZE = 500

# Matches accounts whose userAccountControl has ACCOUNTDISABLE (0x2) set.
_AD_DISABLED = "(userAccountControl:1.2.840.113556.1.4.803:=2)"


class SyncError(Exception):
    """The sync could not run; the message is one line for the operator."""


class _IncompleteSearch(Exception):
    """The search ended without success; its entries are not the whole directory."""


@dataclass(frozen=True)
class DirectoryUser:
    """One user as the directory lists it: name and phone as written there."""

    name: str
    phone_raw: str | None = None


@dataclass(frozen=True)
class Problem:
    """A directory entry the sync could not take as it is.

    ``raw`` is the offending phone number, if that is the problem; reports
    for logs leave it out (``numbers=False``).
    """

    name: str
    message: str
    raw: str | None = None

    def describe(self, *, numbers: bool = True) -> str:
        if self.raw is not None and numbers:
            return f"{self.name}: {self.raw!r}: {self.message}"
        return f"{self.name}: {self.message}"


@dataclass(frozen=True)
class SyncReport:
    """The outcome of one `run_sync`: what the directory held and what changed."""

    directory_users: int                 # entries the search returned
    result: SyncResult
    invalid_phones: tuple[Problem, ...] = ()   # users imported without a phone
    skipped: tuple[Problem, ...] = ()          # entries not imported at all
    dry_run: bool = False

    def summary(self) -> str:
        """One line with the counts, for the CLI and for the daemon's log."""
        r = self.result
        head = "sync (dry run, nothing changed)" if self.dry_run else "sync"
        parts = [
            f"{head}: {_plural(self.directory_users, 'user')} in the directory",
            f"added {r.added}, updated {r.updated}, re-enabled {r.reenabled},"
            f" disabled {r.disabled}, removed {r.removed}, unchanged {r.unchanged}",
        ]
        if self.invalid_phones:
            parts.append(_plural(len(self.invalid_phones), "invalid phone number"))
        if r.conflicts:
            parts.append(_plural(len(r.conflicts), "conflict") + " with local users")
        if self.skipped:
            parts.append(_plural(len(self.skipped), "entry", "entries") + " skipped")
        return "; ".join(parts)

    def details(self, *, numbers: bool = True) -> list[str]:
        """One line per problem; ``numbers=False`` leaves phone numbers out (for logs)."""
        lines = [f"invalid phone number: {p.describe(numbers=numbers)}"
                 for p in self.invalid_phones]
        lines += [f"conflict: {name}: a local user has this name; left alone"
                  for name in self.result.conflicts]
        lines += [f"skipped: {p.describe(numbers=numbers)}" for p in self.skipped]
        return lines


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else (plural or word + 's')}"


# --- phone numbers ---

def normalise_phone(raw: str | None, region: str | None = None) -> str | None:
    """``raw`` in E.164 form, None if it is empty; raise InvalidPhoneNumber if unusable.

    Without ``region`` only international numbers ("+CC ...") are accepted:
    guessing the country of "030 1234567" could text a stranger.
    """
    if raw is None or not raw.strip():
        return None
    return parse_phone(raw, region)


def prepare_entries(
    users: Iterable[DirectoryUser], region: str | None = None
) -> tuple[list[tuple[str, str | None]], list[Problem], list[Problem]]:
    """Turn directory users into `Store.sync_users` entries.

    Returns ``(entries, invalid_phones, skipped)``. A user with an invalid
    number is imported without one; a name the store would refuse is
    skipped. A name listed twice (two entries with one uid) is imported once,
    with a phone only if both entries agree on it, so a code is never sent to
    the other person's number. Problems are sorted by name.
    """
    phones: dict[str, str | None] = {}
    invalid: list[Problem] = []
    skipped: list[Problem] = []
    clashing: set[str] = set()
    for user in users:
        try:
            check_user_name(user.name)
        except StoreError as e:
            skipped.append(Problem(name=repr(user.name), message=str(e)))
            continue
        try:
            phone = normalise_phone(user.phone_raw, region)
        except InvalidPhoneNumber as e:
            invalid.append(Problem(name=user.name, message=e.reason, raw=e.raw))
            phone = None
        if user.name in phones and phones[user.name] != phone:
            clashing.add(user.name)
            phone = None
        phones[user.name] = phone
    for name in sorted(clashing):
        invalid.append(Problem(name=name, message="listed more than once in the directory"
                                                  " with different phone numbers"))
    # Sorted, because directories return entries in no particular order.
    invalid.sort(key=lambda p: p.name)
    skipped.sort(key=lambda p: p.name)
    return list(phones.items()), invalid, skipped


# --- LDAP ---

def sync_filter(ldap: LdapConfig, sync: SyncConfig) -> str:
    """The search filter: [directory.sync] filter, else user_filter matching everyone.

    For Active Directory, disabled accounts are left out, so that they are
    disabled here too.
    """
    text = sync.filter or ldap.user_filter.replace("{username}", "*")
    if ldap.active_directory:
        text = f"(&{text}(!{_AD_DISABLED}))"
    return text


def _describe(exc: BaseException, limit: int = 200) -> str:
    """``exc`` as a short line (ldap3 puts whole certificates into some messages)."""
    text = " ".join(str(exc).split())
    # Socket errors arrive as reprs of nested tuples: keep the words only.
    text = re.sub(r" \(_ssl\.c:\d+\)", "", text).strip("()\"', ") or type(exc).__name__
    if isinstance(exc, LDAPOperationResult):  # the server's result code, e.g. noSuchObject
        text = exc.description + (f" ({exc.message})" if exc.message else "")
    elif "IP address mismatch" in text or "Hostname mismatch" in text:
        text = "the server's certificate is not valid for its host name"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _value(attributes, name: str) -> str | None:
    """The first value of ``name``, decoded; None if absent or empty."""
    if not name:
        return None
    values = attributes.get(name) or []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if value:
            return value
    return None


def _search_server(url: str, ldap: LdapConfig, search_filter: str) -> list[DirectoryUser]:
    """All matching users from the server at ``url``; raises SyncError on any failure."""
    stage = "connect"
    conn = None
    try:
        tls = VerifiedTls(tls_context(ldap))
        server = ldap3.Server(url, tls=tls, connect_timeout=ldap.timeout, get_info=ldap3.NONE)
        conn = ldap3.Connection(
            server,
            user=ldap.bind_dn or None,
            password=ldap.bind_password or None,
            authentication=ldap3.SIMPLE if ldap.bind_dn else ldap3.ANONYMOUS,
            auto_bind=ldap3.AUTO_BIND_NONE,
            client_strategy=ldap3.SYNC,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds: it must be an int.
            receive_timeout=max(1, math.ceil(ldap.timeout)),
            auto_referrals=False,
            read_only=True,
            raise_exceptions=True,
        )
        conn.open()
        if ldap.start_tls and not server.ssl:
            stage = "StartTLS"
            conn.start_tls()
        stage = "bind"
        conn.bind()
        stage = "search"
        attributes = [ldap.username_attribute]
        if ldap.phone_attribute:
            attributes.append(ldap.phone_attribute)
        users = []
        for entry in conn.extend.standard.paged_search(
            ldap.base_dn, search_filter, search_scope=ldap3.SUBTREE,
            attributes=attributes, paged_size=PAGE_SIZE, generator=True,
        ):
            if entry.get("type") != "searchResEntry":
                continue  # continuation references: we do not follow referrals
            found = entry.get("attributes") or {}
            name = _value(found, ldap.username_attribute)
            if name is None:
                continue  # the filter matched an entry that is not a login
            users.append(DirectoryUser(name=name,
                                       phone_raw=_value(found, ldap.phone_attribute)))
        # ldap3 raises for most error results, but not for a size or time
        # limit or a referral: a directory cut short would disable everyone
        # past the limit, so anything but success fails the whole fetch.
        result = conn.result or {}
        if result.get("result") != 0:
            raise _IncompleteSearch(f"{result.get('description') or 'no result'} after"
                                    f" {len(users)} entries, not the whole directory")
        return users
    except Exception as e:  # ldap3 raises many types; the caller tries the next server
        raise SyncError(f"{stage} failed: {_describe(e)}") from e
    finally:
        try:
            if conn is not None:
                conn.unbind()
        except Exception:  # unbinding a broken connection may fail; nothing to undo
            pass


def fetch_directory_users(ldap: LdapConfig, sync: SyncConfig) -> list[DirectoryUser]:
    """Every user the sync filter matches under base_dn, from the first server that answers.

    Binds as bind_dn (anonymously if it is empty), with TLS as for logins:
    ldaps:// or StartTLS, certificates checked against ca_file (else the
    system CAs). Raises SyncError naming each server's failure.
    """
    search_filter = sync_filter(ldap, sync)
    errors = []
    for url in ldap.servers:
        try:
            return _search_server(url, ldap, search_filter)
        except SyncError as e:
            errors.append(f"{url}: {e}")
    raise SyncError("cannot read users from LDAP: " + "; ".join(errors))


# --- the whole run ---

def run_sync(
    config,
    store: Store,
    now: float,
    *,
    force: bool = False,
    dry_run: bool = False,
    fetch: Callable[[LdapConfig, SyncConfig], list[DirectoryUser]] = fetch_directory_users,
) -> SyncReport:
    """Fetch the directory and apply it to ``store``; see the module docstring.

    ``config`` is the daemon's `mfaserver.config.Config`: its ``path`` and
    ``directory`` settings are read.

    Raises SyncError if LDAP is not configured or cannot be read, or if it
    lists no usable user while the store has 'ldap' users and ``force`` is
    not set; StoreError if the database fails. ``fetch`` is for tests.
    """
    ldap = config.directory.ldap
    if ldap is None:
        raise SyncError(f"{config.path}: [directory.ldap] is not configured: nothing to sync from")
    users = fetch(ldap, config.directory.sync)
    entries, invalid, skipped = prepare_entries(users)
    if not entries and not force:
        synced = store.count_users(source="ldap")
        if synced:
            raise SyncError(
                f"the directory returned no users: refusing to disable all {synced} synced"
                " users (check base_dn and the sync filter, or use --force)")
    result = store.sync_users(entries, now=now, keep_days=config.directory.sync.keep_days,
                              dry_run=dry_run)
    return SyncReport(directory_users=len(users), result=result,
                      invalid_phones=tuple(invalid), skipped=tuple(skipped), dry_run=dry_run)
