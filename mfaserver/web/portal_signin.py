"""Signing in to the portal: through the core, as at a NAS named "portal".

The password field the core gets is what a NAS would send: ``password``,
``password,123456`` (a code) or ``password,push`` (a method that starts
something), with the configured delimiter. The core checks the password with
the directory chain, refuses blocked and locked users, counts wrong codes
towards the lockout, writes the audit row (client "portal") and answers with
a `Decision`: its Reply-Message is what the user reads. A challenge's State
stays in the session (`Challenge`), never in the page; the user's answer goes
back to the core with it. A held push keeps the POST open until the device
answers: no thread waits, the browser does.

Only a real second factor signs a user in (reason OK): a bypass, a failmode
"safe" or an unenrolled user let in by [mfa] unenrolled = "allow" does not.
The core does not say whom the directory recognised, so once it has accepted
the password (an accept or a challenge) the directory is asked once more for
the canonical name the store knows the user by.

The same flow confirms a signed-in user before they add a factor
(``/portal/confirm``, the step-up), and an invite link stands in for the
second factor of a user who has none yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mfaserver.auth.model import AuthRequest, Decision, Outcome, Reason
from mfaserver.auth.pipeline import MSG_TRY_LATER
from mfaserver.factors.push_protocol import token_digest
from mfaserver.store import InviteExpired, InviteRefused, Store, UnknownInvite
from mfaserver.web.portal_http import (CLIENT, Visit, client_address, redirect,
                                       refused_to_sign_in)
from mfaserver.web.portal_sessions import Challenge

if TYPE_CHECKING:
    from mfaserver.web.portal import Portal

log = Logger(namespace="mfaserver.web.portal")

MSG_NEEDS_FACTOR = ("Signing in here needs a second factor: a code from your app, "
                    "a push to your device or a texted code.")
MSG_NO_FACTOR = ("No second factor is set up for your account yet. Ask your administrator "
                 "for an invite link.")

# The buttons that start a method, by method name.
START_LABELS = {"push": "Send a push to my device", "sms": "Text me a code",
                "phone": "Call me"}


class SignIn:
    """The sign-in, challenge, step-up and invite pages of a `Portal`."""

    def __init__(self, portal: Portal):
        self.portal = portal

    # --- sign-in ---

    async def page(self, visit: Visit):
        """GET /portal/signin."""
        if visit.session is not None and visit.session.user is not None:
            return redirect("/portal/")
        if visit.session is None:
            visit.session = self.portal.sessions.new()
        return self._form(visit, "signin")

    async def submit(self, visit: Visit):
        """POST /portal/signin: user name, password, and a code or a method."""
        if visit.session.user is not None:
            return redirect("/portal/")
        username, password = visit.field("username").strip(), visit.field("password")
        if not username or not password:
            return self._form(visit, "signin", status=400, username=username,
                              error="Enter your user name and your password.")
        return await self._first_round(visit, username, password, "signin")

    # --- step-up: a signed-in user passes a second factor again ---

    async def confirm_page(self, visit: Visit):
        """GET /portal/confirm."""
        account = await self.portal.load_account(visit.user)
        if not self.portal.usable_methods(account):
            raise refused_to_sign_in(409, "No second factor yet", MSG_NO_FACTOR)
        return self._form(visit, "confirm")

    async def confirm(self, visit: Visit):
        """POST /portal/confirm: the password, and a code or a method."""
        if not visit.field("password"):
            return self._form(visit, "confirm", status=400, error="Enter your password.")
        return await self._first_round(visit, visit.session.username, visit.field("password"),
                                       "confirm")

    # --- the core's challenge ---

    async def challenge_page(self, visit: Visit):
        """GET /portal/challenge: the question of a sign-in in progress."""
        if visit.session is None or visit.session.challenge is None:
            return redirect("/portal/")
        return self._challenge(visit)

    async def answer(self, visit: Visit):
        """POST /portal/challenge: the answer (a code, a number, a menu choice)."""
        session = visit.session
        pending = session.challenge
        if pending is None:
            raise refused_to_sign_in(409, "This sign-in has ended", "Please start again.")
        answer = visit.field("answer").strip()
        if not answer:
            return self._challenge(visit, status=400, error="Type your answer.")
        if pending.purpose == "confirm" and session.user != pending.user:
            raise refused_to_sign_in(403, "You are not signed in", "Sign in first. Nothing was changed.")
        session.challenge = None
        decision = await self._authenticate(visit, pending.username, answer, pending.state)
        return self._decided(visit, decision, pending.username, pending.user, pending.purpose)

    # --- invites ---

    async def invite_page(self, visit: Visit):
        """GET /portal/invite/<token>: the invite's user, and a password field."""
        user, _ = await self._invite(visit)
        if visit.session is None:
            visit.session = self.portal.sessions.new()
        return self._invite_form(visit, user)

    async def use_invite(self, visit: Visit):
        """POST /portal/invite/<token>: the password right, the invite is used up
        (atomically) and the user signed in, to add their first factor."""
        user, digest = await self._invite(visit)
        password = visit.field("password")
        if not password:
            return self._invite_form(visit, user, status=400, error="Enter your password.")
        decision = await self._authenticate(visit, user, password)
        # The core says so only after the directory accepted the password (and a
        # bypass of the user's is used up by any login, this one too).
        if decision.reason not in (Reason.NOT_ENROLLED, Reason.UNENROLLED_ALLOWED,
                                   Reason.BYPASS):
            if decision.outcome is Outcome.REJECT:
                return self._invite_form(visit, user, status=401,
                                         error=decision.reply_message)
            raise _already_enrolled()
        try:
            await self.portal.context.store.run(Store.use_invite, digest, now=self.portal.now())
        except InviteRefused:
            raise _invite_expired() from None
        visit.session = self.portal.sessions.sign_in(visit.session, user, user)
        await self.portal.audit(visit, user, "invite_used", factor="invite", outcome="accept")
        visit.session.notice = ("Welcome. Add a sign-in method now: for the next 5 minutes "
                                "this invite counts as your second factor.")
        return redirect("/portal/")

    async def _invite(self, visit: Visit) -> tuple[str, str]:
        """The user a live invite is for, and its digest; refused if the user can
        sign in with a factor already."""
        digest = token_digest(visit.request.params["token"])
        try:
            user = await self.portal.context.store.read(Store.invite_user, digest,
                                                        now=self.portal.now())
        except UnknownInvite:
            raise refused_to_sign_in(404, "This invite link is not valid",
                           "Check that you opened the whole link, or ask your administrator "
                           "for a new one.") from None
        except InviteExpired:
            raise _invite_expired() from None
        if self.portal.usable_methods(await self.portal.load_account(user)):
            raise _already_enrolled()
        return user, digest

    def _invite_form(self, visit: Visit, user: str, *, status: int = 200, error: str = ""):
        return self.portal.page(visit, "portal/invite.html", status=status, user=user,
                                error=error, action=visit.request.path)

    # --- the flow ---

    async def _first_round(self, visit: Visit, username: str, password: str, purpose: str):
        try:
            field = self._password_field(visit, password)
        except ValueError as e:
            return self._form(visit, purpose, status=400, username=username, error=str(e))
        decision = await self._authenticate(visit, username, field)
        if decision.outcome is Outcome.REJECT or (
                decision.outcome is Outcome.ACCEPT and decision.reason is not Reason.OK):
            return self._decided(visit, decision, username, username, purpose)
        # The password was right: which user the store knows by this name.
        try:
            principal = await self.portal.core.directory.authenticate(username, password)
        except Exception as e:
            log.error("portal: the directory did not name {user} again: {error}",
                      user=username, error=str(e) or type(e).__name__)
            return self._form(visit, purpose, status=503, username=username,
                              error=MSG_TRY_LATER)
        return self._decided(visit, decision, username, principal.username, purpose)

    def _password_field(self, visit: Visit, password: str) -> str:
        """The User-Password a NAS would send for this form; ValueError says what is wrong."""
        delimiter = self.portal.core.policy.delimiter
        method = visit.field("method")
        if method:
            if method not in self._starters():
                raise ValueError("This method is not available.")
            return f"{password}{delimiter}{method}"
        code = "".join(visit.field("code").split())
        if not code:
            return password
        if not (code.isascii() and code.isdigit() and 6 <= len(code) <= 8):
            raise ValueError("A code is 6 to 8 digits.")
        return f"{password}{delimiter}{code}"

    def _authenticate(self, visit: Visit, username: str, password: str,
                      state: bytes | None = None):
        address = client_address(visit.request)
        deciding = self.portal.core.authenticate(AuthRequest(
            client_name=CLIENT, username=username, password=password, state=state,
            calling_station_id=address or None, source=address, bypass=False))
        # A browser that hangs up cancels only its own wait, never the sign-in:
        # the core finishes it (the push is answered or times out) and audits
        # it, as for a NAS that gave up. Cancelling the core's Deferred would
        # abandon it unaudited, and a held push tells that the password was right.
        waiting: Deferred[Decision] = Deferred()
        deciding.chainDeferred(waiting)
        return waiting

    def _decided(self, visit: Visit, decision: Decision, username: str, user: str,
                 purpose: str):
        session = visit.session
        session.challenge = None
        if decision.outcome is Outcome.CHALLENGE:
            session.challenge = Challenge(decision.state, username, user,
                                          decision.reply_message, purpose)
            return self._challenge(visit)
        if decision.outcome is Outcome.REJECT:
            return self._form(visit, purpose, status=401, username=username,
                              error=decision.reply_message or "Authentication failed.")
        if decision.reason is not Reason.OK:
            # A bypass, failmode "safe", or [mfa] unenrolled = "allow": no second factor.
            return self._form(visit, purpose, status=403, username=username,
                              error=MSG_NO_FACTOR if decision.reason is Reason.UNENROLLED_ALLOWED
                              else MSG_NEEDS_FACTOR)
        if purpose == "confirm":
            if session.user != user:
                raise refused_to_sign_in(403, "You are not signed in", "Sign in first. Nothing was changed.")
            session.factor_at = self.portal.now()
            session.notice = ("Thank you. For the next 5 minutes you can add a sign-in method "
                              "or change your phone number.")
            return redirect(session.after_confirm)
        visit.session = self.portal.sessions.sign_in(session, user, username)
        return redirect("/portal/")

    # --- pages ---

    def _starters(self) -> list[str]:
        """The configured methods a button can start, in fallback order."""
        core = self.portal.core
        return [name for name in core.factors if core.methods[name].starts]

    def _form(self, visit: Visit, purpose: str, *, status: int = 200, username: str = "",
              error: str = ""):
        return self.portal.page(
            visit, "portal/signin.html", status=status, purpose=purpose, username=username,
            error=error, starters=[(name, START_LABELS.get(name, name))
                                   for name in self._starters()])

    def _challenge(self, visit: Visit, *, status: int = 200, error: str = ""):
        pending = visit.session.challenge
        return self.portal.page(visit, "portal/challenge.html", status=status,
                                message=pending.message, purpose=pending.purpose, error=error)


def _invite_expired():
    return refused_to_sign_in(410, "This invite link has expired or was used already",
                    "Ask your administrator for a new one.")


def _already_enrolled():
    return refused_to_sign_in(409, "You can sign in already",
                    "A second factor is set up for your account: sign in with it.")
