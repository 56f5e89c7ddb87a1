"""The portal's sessions: in memory, on the injected clock, bounded, one cookie each.

A browser gets a session when it first opens a portal page: before sign-in
it holds only the CSRF token of the sign-in form and, during a sign-in, the
core's challenge State (kept here, never in the page). Signing in replaces
it with a new session (a new id: a session id seen before sign-in is worth
nothing after it). A session ends after ``idle`` seconds without a request,
``max_age`` seconds after sign-in, or on sign-out.

Anonymous and signed-in sessions are bounded separately, so that a flood of
page loads can only push out other anonymous sessions, never a signed-in
user's; when a kind is full its least recently used session goes.

The cookie is ``__Host-mfaportal``: Secure, HttpOnly, SameSite=Strict,
Path=/ and no Domain (the ``__Host-`` prefix makes browsers insist on
those). Chromium keeps such a cookie on plain http://127.0.0.1 and
http://localhost too (they count as secure origins), so one name serves
every listener [web] allows.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

COOKIE = "__Host-mfaportal"
_COOKIE_ATTRIBUTES = "Path=/; Secure; HttpOnly; SameSite=Strict"

MAX_SESSIONS = 10_000       # signed-in sessions
MAX_SESSIONS_PER_USER = 10  # one user's, so that one user cannot push others out
MAX_ANONYMOUS = 10_000      # sessions of sign-in pages
_ID_BYTES = 32


@dataclass
class Challenge:
    """A sign-in halfway: the core's State and what it asked.

    ``username`` is the name as typed (the State is bound to it), ``user``
    the directory's canonical name; ``purpose`` is "signin" or "confirm"
    (a signed-in user proving it is them again).
    """

    state: bytes = field(repr=False)
    username: str
    user: str
    message: str
    purpose: str


@dataclass
class Session:
    """One browser's session. ``user`` is None until sign-in.

    ``factor_at`` is when the user last passed a second factor (or used an
    invite, which stands in for one): adding a factor or changing the phone
    needs it to be recent.
    """

    id: str = field(repr=False)
    csrf: str = field(repr=False)
    created: float
    seen: float
    user: str | None = None
    username: str | None = None
    factor_at: float | None = None
    challenge: Challenge | None = None
    pending_token: str | None = None       # serial of a TOTP token awaiting its first code
    pending_phone: str | None = None       # a number awaiting its texted code
    phone_attempts: int = 0                # wrong codes typed for it
    after_confirm: str = "/portal/"
    notice: str = ""

    def check_csrf(self, token: str | None) -> bool:
        """True if ``token`` is this session's CSRF token (constant time)."""
        return bool(token) and hmac.compare_digest(token.encode("utf-8", "replace"),
                                                   self.csrf.encode("ascii"))

    def take_notice(self) -> str:
        """The one-time message for the next page, now cleared."""
        notice, self.notice = self.notice, ""
        return notice


class Sessions:
    """The live sessions, by id. Every read goes through `get`, which ends the
    sessions that timed out."""

    def __init__(self, clock: IReactorTime, *, max_sessions: int = MAX_SESSIONS,
                 max_anonymous: int = MAX_ANONYMOUS):
        self._clock = clock
        self._limits = {True: max_sessions, False: max_anonymous}
        # Least recently seen first, one map per kind (signed in or not).
        self._by_id: dict[bool, OrderedDict[str, Session]] = {True: OrderedDict(),
                                                              False: OrderedDict()}

    def __len__(self) -> int:
        return sum(len(kind) for kind in self._by_id.values())

    def new(self) -> Session:
        """A new anonymous session (for a sign-in page)."""
        return self._add(self._make(), signed_in=False)

    def get(self, session_id: str | None, *, idle: float, max_age: float) -> Session | None:
        """The live session ``session_id`` (marked as seen now), or None.

        ``idle`` and ``max_age`` are in seconds, read from the settings by
        the caller on every request (a reload may change them).
        """
        if not session_id:
            return None
        now = self._clock.seconds()
        for signed_in, sessions in self._by_id.items():
            session = sessions.get(session_id)
            if session is None:
                continue
            if now - session.seen >= idle or now - session.created >= max_age:
                del sessions[session_id]
                return None
            session.seen = now
            sessions.move_to_end(session_id)
            return session
        return None

    def sign_in(self, old: Session | None, user: str, username: str) -> Session:
        """A new signed-in session for ``user`` (a new id), replacing ``old``."""
        if old is not None:
            self.end(old)
        session = self._make()
        session.user, session.username = user, username
        session.factor_at = session.created
        # Least recently seen first: the user's oldest session goes.
        mine = [sid for sid, other in self._by_id[True].items() if other.user == user]
        for sid in mine[:max(0, len(mine) - MAX_SESSIONS_PER_USER + 1)]:
            del self._by_id[True][sid]
        return self._add(session, signed_in=True)

    def end(self, session: Session) -> None:
        """Forget ``session`` (sign-out, fraud report, rotation)."""
        self._by_id[session.user is not None].pop(session.id, None)

    def end_user(self, user: str) -> int:
        """End every session of ``user``; return how many there were."""
        sessions = self._by_id[True]
        ids = [sid for sid, session in sessions.items() if session.user == user]
        for sid in ids:
            del sessions[sid]
        return len(ids)

    def _make(self) -> Session:
        now = self._clock.seconds()
        return Session(id=secrets.token_urlsafe(_ID_BYTES), csrf=secrets.token_urlsafe(_ID_BYTES),
                       created=now, seen=now)

    def _add(self, session: Session, *, signed_in: bool) -> Session:
        sessions = self._by_id[signed_in]
        while len(sessions) >= self._limits[signed_in]:
            sessions.popitem(last=False)
        sessions[session.id] = session
        return session


def session_cookie(session: Session | None) -> str:
    """The Set-Cookie value that hands ``session`` to the browser (None: removes it)."""
    if session is None:
        return f"{COOKIE}=; Max-Age=0; {_COOKIE_ATTRIBUTES}"
    return f"{COOKIE}={session.id}; {_COOKIE_ATTRIBUTES}"


def session_id_from(cookie_header: str | None) -> str | None:
    """The portal's session id in a Cookie header, or None."""
    for part in (cookie_header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE:
            return value.strip()
    return None
