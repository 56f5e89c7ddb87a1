"""Active Directory specifics: the names users type and the reasons behind a refused bind.

Pure functions, no I/O; `mfaserver.directory.ldap` uses them when
``active_directory = true``.

Names. ``alice@example.org`` is a userPrincipalName: the search is
``(&(userPrincipalName=alice@example.org)F*)``, where ``F*`` is the configured
filter with ``{username}`` replaced by ``*``, so the admin's constraints
(object class, "not disabled"...) still apply. ``EXAMPLE\\alice`` loses its
domain prefix, which must equal ``ad_domain`` (case-insensitively) when that
is set, and ``alice`` goes into the configured filter, like a bare name.

Bind errors. A refused bind is LDAP result 49 whatever the cause; AD tells
the cause in the diagnostic message, as the hexadecimal Win32 code after
``data``: ``80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext
error, data 52e, v4563``. Samba AD writes the same message.
"""

from __future__ import annotations

import re

from ldap3.utils.conv import escape_filter_chars

from mfaserver.auth.interfaces import InvalidCredentials, UnknownUser
from mfaserver.auth.model import Reason

# Matching rule LDAP_MATCHING_RULE_IN_CHAIN: memberOf through nested groups.
IN_CHAIN = "1.2.840.113556.1.4.1941"

_DATA = re.compile(r"\bdata ([0-9a-f]+)\b", re.IGNORECASE)

# Win32 codes in the "data" field of a refused bind (MS-ADTS, [MS-ERREF]).
BIND_ERRORS = {
    "52e": (Reason.BAD_PASSWORD, "wrong password"),
    # 525 (no such user) cannot happen for a DN our search found, unless the
    # entry went away in between: report it as a wrong password so that the
    # answer does not tell which user names exist.
    "525": (Reason.BAD_PASSWORD, "user not found"),
    "530": (Reason.LOGON_NOT_PERMITTED, "logon not permitted at this time"),
    "531": (Reason.LOGON_NOT_PERMITTED, "logon not permitted at this workstation"),
    "532": (Reason.PASSWORD_EXPIRED, "password expired"),
    "533": (Reason.ACCOUNT_DISABLED, "account disabled"),
    "701": (Reason.ACCOUNT_EXPIRED, "account expired"),
    "773": (Reason.MUST_CHANGE_PASSWORD, "password must be changed"),
    "775": (Reason.ACCOUNT_LOCKED, "account locked out"),
}


def bind_failure(message: str) -> InvalidCredentials:
    """The `InvalidCredentials` for a bind that AD refused (result 49) with ``message``.

    ``detail`` names the code, e.g. ``"AD data 533: account disabled"``;
    an unknown or missing code counts as a wrong password.
    """
    match = _DATA.search(message)
    if match is None:
        return InvalidCredentials(Reason.BAD_PASSWORD, "AD refused the bind (no data code)")
    code = match.group(1).lower()
    reason, text = BIND_ERRORS.get(code, (Reason.BAD_PASSWORD, "unknown code"))
    return InvalidCredentials(reason, f"AD data {code}: {text}")


def search_filter(username: str, user_filter: str, ad_domain: str) -> tuple[str, str]:
    """The search filter for a name typed as ``user``, ``DOMAIN\\user`` or ``user@domain``.

    Returns ``(filter, name)``, ``name`` being what the user typed without a
    domain prefix. Raises `UnknownUser` for another domain's prefix or an
    empty name.
    """
    domain, backslash, name = username.partition("\\")
    if backslash:
        if not domain or (ad_domain and domain.casefold() != ad_domain.casefold()):
            raise UnknownUser()
    else:
        name = username
    if not name:
        raise UnknownUser()
    if not backslash and "@" in name:
        others = user_filter.replace("{username}", "*")
        return f"(&(userPrincipalName={escape_filter_chars(name)}){others})", name
    return user_filter.replace("{username}", escape_filter_chars(name)), name


def member_filter(group_dn: str) -> str:
    """Filter matching a user entry that is a member of ``group_dn``, directly or nested."""
    return f"(memberOf:{IN_CHAIN}:={escape_filter_chars(group_dn)})"
