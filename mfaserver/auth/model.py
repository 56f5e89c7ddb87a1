"""Frozen values passed between the RADIUS front end, the core and the store.

Nothing here does I/O. The RADIUS layer turns a packet into an `AuthRequest`,
the `Authenticator` answers with a `Decision`, the store hands out `Account`
records. Secrets (passwords, codes, seeds) are kept out of ``repr`` so that a
value logged by mistake cannot leak them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Outcome(str, enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    CHALLENGE = "challenge"


class Reason(str, enum.Enum):
    """Why a decision was taken: written to the audit log, never to the NAS."""

    OK = "ok"
    BYPASS = "bypass"
    UNENROLLED_ALLOWED = "unenrolled_allowed"
    CHALLENGE_ISSUED = "challenge_issued"
    EMPTY_PASSWORD = "empty_password"
    BAD_PASSWORD = "bad_password"
    UNKNOWN_USER = "unknown_user"
    USER_BLOCKED = "user_blocked"
    USER_LOCKED = "user_locked"
    NOT_ENROLLED = "not_enrolled"
    CODE_MISSING = "code_missing"
    BAD_CODE = "bad_code"
    CODE_REUSED = "code_reused"
    BAD_STATE = "bad_state"
    NOT_PAP = "not_pap"
    PASSWORD_UNDECODABLE = "password_undecodable"
    DIRECTORY_UNAVAILABLE = "directory_unavailable"
    # Refusals reported by a directory (LDAP/AD bind errors, group checks):
    PASSWORD_EXPIRED = "password_expired"
    MUST_CHANGE_PASSWORD = "must_change_password"
    ACCOUNT_DISABLED = "account_disabled"
    ACCOUNT_EXPIRED = "account_expired"
    ACCOUNT_LOCKED = "account_locked"
    LOGON_NOT_PERMITTED = "logon_not_permitted"
    NOT_IN_GROUP = "not_in_group"
    AMBIGUOUS_USER = "ambiguous_user"
    # Out-of-band delivery:
    RATE_LIMITED = "rate_limited"
    GATEWAY_FAILED = "gateway_failed"
    FAILMODE_SAFE = "failmode_safe"
    NO_PHONE = "no_phone"
    NO_DEVICE = "no_device"
    FACTOR_DENIED = "factor_denied"
    FACTOR_TIMEOUT = "factor_timeout"
    FRAUD_REPORTED = "fraud_reported"
    NO_ANSWER = "no_answer"
    WRONG_NUMBER = "wrong_number"
    TOO_MANY_PENDING = "too_many_pending"
    SEED_INTEGRITY = "seed_integrity"
    # MS-CHAPv2: the user has no approval factor the VPN can wait for.
    NO_APPROVAL_FACTOR = "no_approval_factor"
    MSCHAP_NOT_CONFIGURED = "mschap_not_configured"
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL_ERROR = "internal_error"


class Verdict(str, enum.Enum):
    """What the user answered to an out-of-band request (push or phone call)."""

    APPROVE = "approve"
    DENY = "deny"
    FRAUD = "fraud"
    NO_ANSWER = "no_answer"    # the call ended (busy, not picked up) without an answer


class TokenKind(str, enum.Enum):
    TOTP = "totp"
    HOTP = "hotp"


# The HMAC hashes an OATH token may use (RFC 6238 allows these three); the
# token maths, the store, the importers and the CLI all check against this.
OATH_ALGORITHMS = ("sha1", "sha256", "sha512")


class Secret(bytes):
    """Octets that must never reach a log: MPPE keys, challenge responses.

    A ``bytes`` (so the wire code uses it as is) whose ``repr`` hides it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<secret, {len(self)} octets>"

    __str__ = __repr__


@dataclass(frozen=True)
class MsChapV2:
    """The MS-CHAPv2 credentials of an Access-Request (RFC 2548 §2.3.2, §2.3.4).

    ``challenge`` is MS-CHAP-Challenge (the authenticator challenge, 16
    octets), ``response`` is MS-CHAP2-Response (50 octets: ident, flags, peer
    challenge, reserved, NT-Response), both as received. The core never
    looks inside: a directory that can check them does.
    """

    challenge: bytes = field(repr=False)
    response: bytes = field(repr=False)


# The names of the MS-CHAPv2 items that travel from the directory to the NAS
# in an Access-Accept, opaque to the core: the RADIUS edge encodes them (the
# MPPE keys salt-encrypted with the NAS's secret, RFC 2548 §2.4.2/§2.4.3).
MSCHAP2_SUCCESS = "MS-CHAP2-Success"
MPPE_SEND_KEY = "MS-MPPE-Send-Key"
MPPE_RECV_KEY = "MS-MPPE-Recv-Key"
MSCHAP_REPLY_ITEMS = frozenset((MSCHAP2_SUCCESS, MPPE_SEND_KEY, MPPE_RECV_KEY))


@dataclass(frozen=True)
class AuthRequest:
    """One Access-Request as the core sees it.

    ``password`` is the decoded User-Password (None when the request carried
    none, e.g. CHAP); ``state`` is the RADIUS State attribute, if any.
    """

    client_name: str
    username: str
    password: str | None = field(repr=False)
    state: bytes | None = field(default=None, repr=False)
    nas_ip: str | None = None
    nas_identifier: str | None = None
    calling_station_id: str | None = None
    source: str = ""  # "ip:port" of the NAS, for logs
    pap: bool = True  # False: CHAP / MS-CHAP / EAP: refused, except MS-CHAPv2 below
    # False: a pending one-login bypass is neither used nor used up (the
    # portal, where a bypass must not stand in for a second factor).
    bypass: bool = True
    # The MS-CHAPv2 credentials, when the request carries them (then pap is False).
    mschap: MsChapV2 | None = None
    # What the request authenticates with, for logs: "pap", "chap",
    # "mschapv1", "mschapv2", "eap", "leap".
    protocol: str = "pap"


@dataclass(frozen=True)
class Principal:
    """A user whose password the directory has accepted.

    ``username`` is the directory's canonical name (e.g. ``alice`` when the
    user typed ``EXAMPLE\\alice`` or ``alice@example.org``): the MFA store is
    keyed by it. ``groups`` holds the configured group DNs the user is a
    member of, lower-cased; ``attributes`` are reply attributes the directory
    wants in the Access-Accept (name, text or raw octets), e.g. passed through
    from an upstream RADIUS server.
    """

    username: str
    phone: str | None = None
    attributes: tuple[tuple[str, str | bytes], ...] = ()
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Decision:
    """The core's answer. ``reply_message`` goes to the user; ``reason`` to the audit log.

    ``state`` is set only on a challenge. ``factor`` names what completed or
    failed ("totp", "hotp", "bypass", "password", ...) for the audit row.
    """

    outcome: Outcome
    reason: Reason
    reply_message: str = ""
    state: bytes | None = field(default=None, repr=False)
    factor: str = ""
    attributes: tuple[tuple[str, str | bytes], ...] = ()

    @classmethod
    def accept(cls, reason=Reason.OK, factor="", message="", attributes=()):
        return cls(Outcome.ACCEPT, reason, message, None, factor, tuple(attributes))

    @classmethod
    def reject(cls, reason, message="Authentication failed.", factor=""):
        return cls(Outcome.REJECT, reason, message, None, factor)

    @classmethod
    def challenge(cls, state, message, factor=""):
        return cls(Outcome.CHALLENGE, Reason.CHALLENGE_ISSUED, message, state, factor)


@dataclass(frozen=True)
class Token:
    """An OATH token with its seed decrypted (seeds are decrypted only in memory)."""

    id: int
    serial: str
    user: str | None
    kind: TokenKind
    secret: bytes = field(repr=False)
    digits: int = 6
    period: int = 30           # TOTP only
    algorithm: str = "sha1"    # one of OATH_ALGORITHMS
    counter: int = 0           # HOTP: the next counter value expected
    last_step: int | None = None  # TOTP: the last time step accepted (replay guard)
    drift: int = 0             # TOTP: learned clock drift, in steps
    active: bool = True        # False: enrolled in the portal, awaiting its first code


@dataclass(frozen=True)
class Account:
    """Everything the login path needs to know about a user, read in one go."""

    name: str
    phone: str | None
    blocked: bool
    failures: int
    locked_until: float | None
    tokens: tuple[Token, ...] = ()
    has_password: bool = False
    bypass_until: float | None = None  # expiry of a pending one-login bypass, if any
    default_method: str | None = None  # a Method name; None: [mfa] default_method
    devices: int = 0                   # push devices enrolled
    has_pin: bool = False              # a voice PIN is set


@dataclass(frozen=True)
class Method:
    """A second factor as users and administrators name it.

    ``name`` is what ``[mfa] default_method``, ``mfaserver user set-default``
    and the keyword after the password (``password,push``) say. ``starts``
    is True when choosing the method starts something (a text, a push, a
    call): such a method may be named after the password and is a numbered
    choice in the challenge menu; False when the user already holds the code
    (an app or token). ``label`` is how the menu offers it. ``unusable`` and
    ``unusable_message`` are the audit reason and the user's text when the
    user asks for it but cannot use it (no phone, no device).
    """

    name: str
    label: str
    starts: bool
    unusable: "Reason"
    unusable_message: str


@dataclass(frozen=True)
class Login:
    """One login as a second factor sees it: whose, through which NAS, from where."""

    account: Account
    client: str
    nas_ip: str | None = None
    calling_station_id: str | None = None

    @property
    def user(self) -> str:
        return self.account.name

    @property
    def key(self) -> tuple:
        """What makes two requests "the same login": one push or call for both."""
        return (self.account.name, self.client, self.calling_station_id)


class CodeResult(str, enum.Enum):
    """What a code factor found for a typed code."""

    ACCEPTED = "accepted"   # right, and now used up
    REPLAYED = "replayed"   # right once, but used already
    WRONG = "wrong"


@dataclass(frozen=True)
class CodeCheck:
    """A code factor's finding, and the factor to audit it under ("totp", "hotp", "sms")."""

    result: CodeResult
    factor: str


@dataclass(frozen=True)
class CodeUse:
    """A typed code matched to one of the user's tokens, for the store to record:
    the TOTP step it was (with the clock drift it shows) or the HOTP counter."""

    token_id: int
    kind: TokenKind
    value: int
    drift: int = 0


@dataclass(frozen=True)
class Device:
    """An enrolled push device (see docs/device-api.rst)."""

    id: str
    user: str
    public_key: str
    notify_type: str | None = None     # "ntfy" | "webhook" | "webpush" | None
    notify_url: str | None = None      # for webpush: the subscription's endpoint
    created: float = 0.0
    last_used: float | None = None
    notify_keys: str | None = None     # webpush: {"p256dh": ..., "auth": ...} as JSON


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log: one per decision."""

    time: float
    user: str
    client: str
    nas_ip: str | None
    calling_station_id: str | None
    factor: str
    outcome: str
    reason: str
    id: int | None = None
