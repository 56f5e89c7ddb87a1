"""The self-service portal at /portal/ (served when the config has a [portal] section).

Users sign in here as at a NAS named "portal": the password and a second
factor they already have go to the core (`Authenticator.authenticate`), so
the directory chain, lockout, audit rows, factors, number matching and the
challenge State are the RADIUS ones, unchanged (`mfaserver.web.portal_signin`).
A user with no factor yet signs in once with an invite link from
``mfaserver user invite`` and their password.

Signed in, a user can add an authenticator app (the token stays inactive
until its first code), enroll this browser as a push device, remove devices
and tokens, change their phone number (after a texted code), choose their
default method, set their voice PIN, see their last sign-ins and report one
as not theirs. Adding a factor or changing the phone needs a second factor
passed in the last `STEP_UP_SECONDS`; [portal] methods limits which factors
may be added, removed or chosen.

Every page is a template (autoescaped, no script); every state-changing
request is a POST carrying the session's CSRF token; every action writes an
audit row with client "portal". Sessions: `mfaserver.web.portal_sessions`.
"""

from __future__ import annotations

import base64
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

from twisted.logger import Logger

from mfaserver import phones
from mfaserver.auth.interfaces import StoreUnavailable
from mfaserver.auth.model import Account, AuditEntry, TokenKind
from mfaserver.factors import oath
from mfaserver.factors.push_protocol import new_enrollment_token, token_digest
from mfaserver.factors.sms import MSG_TOO_MANY_CODES, SendRefused
from mfaserver.store import NewToken, Store, StoreError
from mfaserver.web import portal_signin
from mfaserver.web.context import WebContext
from mfaserver.web.pages import render
from mfaserver.web.portal_http import (CLIENT, Refused, Visit, client_address, redirect,
                                       refused_to_sign_in, utc)
from mfaserver.web.portal_sessions import Sessions, session_cookie, session_id_from
from mfaserver.web.server import Response, WebApp, WebRequest, loggable_path
from mfaserver.web.validation import HttpError

log = Logger(namespace="mfaserver.web.portal")

STEP_UP_SECONDS = 300.0         # how recent a second factor must be to add one
HISTORY_SIZE = 50               # sign-ins shown
ISSUER = "mfaserver"            # the issuer an authenticator app shows
MAX_PHONE_ATTEMPTS = 5          # wrong texted codes before the number must be sent again
MAX_PHONE_CHANGES = 10_000      # users with a new number's code outstanding, remembered

_TOKEN_KINDS = {TokenKind.TOTP: "time-based", TokenKind.HOTP: "counter-based"}

# How the portal names the methods (the core's labels are phrased for a menu).
METHOD_LABELS = {
    "push": "Push to my device",
    "totp": "Code from my authenticator app or token",
    "sms": "Text message",
    "phone": "Phone call",
}


@dataclass(frozen=True)
class PortalSettings:
    """[portal]: sessions, invites, and which factors users may enroll."""

    session_idle_minutes: float = 10.0
    session_max_hours: float = 8.0
    invite_hours: float = 24.0
    methods: tuple[str, ...] = ("push", "totp", "sms", "phone")


def add_portal_routes(app: WebApp, context: WebContext) -> None:
    """Route /portal/."""
    Portal(context).add_routes(app)


def _grouped(secret: bytes) -> str:
    """A seed as base32 in groups of four, for typing it into an app by hand."""
    text = base64.b32encode(secret).decode("ascii").rstrip("=")
    return " ".join(text[i:i + 4] for i in range(0, len(text), 4))


def _qr_data_uri(text: str) -> str:
    """``text`` as a QR code, an SVG image in a data: URI (the CSP allows data: images)."""
    import segno     # only the portal's TOTP page draws QR codes
    return segno.make_qr(text, error="m").svg_data_uri(scale=5, border=4, dark="#000",
                                                       light="#fff")


class Portal:
    """The portal's routes over the daemon's `WebContext`."""

    def __init__(self, context: WebContext):
        self.context = context
        self.sessions = Sessions(context.clock)
        # user -> the number their newest phone-change code was texted to
        self._phone_sent: OrderedDict[str, str] = OrderedDict()

    @property
    def core(self):
        return self.context.authenticator

    def now(self) -> float:
        return self.context.clock.seconds()

    def add_routes(self, app: WebApp) -> None:
        signin = portal_signin.SignIn(self)
        app.route("GET", "/portal", lambda request: redirect("/portal/"))
        routes = [
            ("GET", "/portal/", self.account, True),
            ("GET", "/portal/signin", signin.page, False),
            ("POST", "/portal/signin", signin.submit, False),
            ("GET", "/portal/challenge", signin.challenge_page, False),
            ("POST", "/portal/challenge", signin.answer, False),
            ("GET", "/portal/invite/<token>", signin.invite_page, False),
            ("POST", "/portal/invite/<token>", signin.use_invite, False),
            ("GET", "/portal/confirm", signin.confirm_page, True),
            ("POST", "/portal/confirm", signin.confirm, True),
            ("POST", "/portal/signout", self.sign_out, True),
            ("POST", "/portal/totp", self.add_totp, True),
            ("GET", "/portal/totp", self.totp_page, True),
            ("POST", "/portal/totp/confirm", self.confirm_totp, True),
            ("POST", "/portal/push", self.enroll_browser, True),
            ("POST", "/portal/tokens/delete", self.delete_token, True),
            ("POST", "/portal/devices/delete", self.delete_device, True),
            ("GET", "/portal/phone", self.phone_page, True),
            ("POST", "/portal/phone", self.send_phone_code, True),
            ("POST", "/portal/phone/confirm", self.confirm_phone, True),
            ("POST", "/portal/default", self.set_default, True),
            ("GET", "/portal/pin", self.pin_page, True),
            ("POST", "/portal/pin", self.set_pin, True),
            ("GET", "/portal/history", self.history, True),
            ("POST", "/portal/fraud", self.report_fraud, True),
        ]
        for method, path, handler, signed_in in routes:
            app.route(method, path, self._serve(handler, signed_in=signed_in))

    # --- every request: settings, session, CSRF, cookie, refusals as pages ---

    def _serve(self, handler: Callable[[Visit], Awaitable[Response]], *, signed_in: bool):
        async def serve(request: WebRequest) -> Response:
            settings = self.context.portal_settings()
            if settings is None:    # [portal] removed by a reload
                raise HttpError(404, "not_found", "The portal is not enabled on this server.")
            sent = session_id_from(request.headers.get("cookie"))
            session = self.sessions.get(sent, idle=settings.session_idle_minutes * 60,
                                        max_age=settings.session_max_hours * 3600)
            if session is not None and session.user is not None:
                account = await self.load_account(session.user)
                if account is None or account.blocked:
                    # Blocked since signing in (a fraud report from a phone or
                    # a call, an administrator) or deleted: every session of
                    # the user ends, or whoever reported would still be in.
                    self.sessions.end_user(session.user)
                    session = None
            visit = Visit(request, settings, session, {})
            try:
                if request.method == "POST":
                    visit.fields = request.form().fields
                    if session is None or not session.check_csrf(visit.fields.get("csrf")):
                        log.warn("portal: refused a {path} without a valid CSRF token",
                                 path=loggable_path(request.path))
                        raise _refused_csrf()
                if signed_in and (session is None or session.user is None):
                    response = self._to_sign_in(visit, ended=sent is not None and session is None)
                else:
                    try:
                        response = await handler(visit)
                    except StoreUnavailable:
                        # Logged once by the store; nothing was changed.
                        raise Refused(503, "Try again later",
                                      "The sign-in service is unavailable.") from None
            except Refused as e:
                response = self.page(visit, "portal/message.html", status=e.status,
                                     title=e.title, text=e.text, link=e.link,
                                     link_text=e.link_text)
            if visit.session is None and sent is not None:
                response = _with_header(response, "Set-Cookie", session_cookie(None))
            elif visit.session is not None and visit.session.id != sent:
                response = _with_header(response, "Set-Cookie", session_cookie(visit.session))
            return response
        return serve

    def _to_sign_in(self, visit: Visit, *, ended: bool) -> Response:
        """A page that needs a signed-in user, without one: the sign-in page."""
        if visit.request.method == "POST":
            raise refused_to_sign_in(403, "You are not signed in",
                                     "Sign in first. Nothing was changed.")
        if visit.session is None:
            visit.session = self.sessions.new()
        if ended:
            visit.session.notice = "Your session has ended. Please sign in again."
        return redirect("/portal/signin")

    def page(self, visit: Visit, template: str, *, status: int = 200, **values) -> Response:
        """``template`` with what every portal page shows: the CSRF token, the user,
        a one-time notice."""
        session = visit.session
        return render(template, status=status,
                      csrf=session.csrf if session is not None else "",
                      signed_in_as=session.user if session is not None else None,
                      notice=session.take_notice() if session is not None else "",
                      **values)

    async def audit(self, visit: Visit, user: str, reason: str, *, factor: str = "",
                    outcome: str = "change") -> None:
        """One audit row (client "portal") for an action; a failure to write it is
        logged, and the action stands (as for the core's rows)."""
        entry = AuditEntry(time=self.now(), user=user, client=CLIENT, nas_ip=None,
                           calling_station_id=client_address(visit.request) or None,
                           factor=factor, outcome=outcome, reason=reason)
        log.info("portal: {reason} for {user}", reason=reason, user=user, factor=factor,
                 audit=True)
        try:
            await self.context.store.record_audit(entry)
        except Exception:
            log.failure("could not write the portal's audit row for {user}", user=user)

    async def load_account(self, user: str) -> Account | None:
        return await self.context.store.load_account(user)

    def usable_methods(self, account: Account | None) -> list[str]:
        """The configured methods ``account`` can sign in with, in fallback order."""
        if account is None:
            return []
        return [name for name, factor in self.core.factors.items() if factor.usable(account)]

    def _allowed(self, visit: Visit, *methods: str) -> None:
        """Refuse unless [portal] methods lets users change one of ``methods``."""
        if not any(method in visit.settings.methods for method in methods):
            raise Refused(403, "Not available",
                          "Your administrator does not let users change this here.")

    def _stepped_up(self, visit: Visit, after: str) -> Response | None:
        """None if a second factor was passed recently; else the way to pass one,
        coming back to ``after``."""
        session = visit.session
        if session.factor_at is not None and self.now() - session.factor_at <= STEP_UP_SECONDS:
            return None
        session.after_confirm = after
        return redirect("/portal/confirm")

    # --- the account page ---

    async def account(self, visit: Visit) -> Response:
        user = visit.user
        store = self.context.store
        account = await self.load_account(user)
        tokens = await store.read(Store.list_tokens, user)
        devices = await store.read(Store.list_devices, user)
        methods = visit.settings.methods
        apps = _FactorList(
            "apps", "Authenticator apps and tokens", "/portal/tokens/delete", "serial",
            [(t.serial, _TOKEN_KINDS[t.kind].capitalize()
              + ("" if t.active else ", not confirmed yet"), t.serial, f"Remove token {t.serial}")
             for t in tokens],
            removable="totp" in methods,
            add=("/portal/totp", "Add an authenticator app") if "totp" in methods else None)
        kinds = {d.id: "Web browser" if d.notify_type == "webpush" else "Phone app"
                 for d in devices}
        push = _FactorList(
            "devices", "Devices for push", "/portal/devices/delete", "device",
            [(f"{kinds[d.id]}, added {utc(d.created)}",
              f"Last used: {utc(d.last_used) if d.last_used else 'never'}", d.id,
              f"Remove the {kinds[d.id]} added {utc(d.created)}") for d in devices],
            removable="push" in methods,
            add=("/portal/push", "Use this browser for push") if "push" in methods else None)
        return self.page(
            visit, "portal/account.html", user=user, factor_lists=[apps, push],
            phone=account.phone if account is not None else None,
            can_change_phone="sms" in methods or "phone" in methods,
            defaults=self._default_choices(visit, account),
            default=account.default_method if account is not None else None,
            can_set_pin="phone" in methods,
            has_pin=account is not None and account.has_pin,
            no_factor=not self.usable_methods(account))

    def _default_choices(self, visit: Visit, account: Account | None) -> list[tuple[str, str]]:
        """(method, label) for the methods the user may choose as their default."""
        return [(name, METHOD_LABELS.get(name, name)) for name in self.usable_methods(account)
                if name in visit.settings.methods]

    async def sign_out(self, visit: Visit) -> Response:
        await self.audit(visit, visit.user, "signed_out", factor="session")
        self.sessions.end(visit.session)
        visit.session = None
        return self.page(visit, "portal/message.html", title="You are signed out",
                         text="You can close this page.", link="/portal/signin",
                         link_text="Sign in again")

    # --- an authenticator app (TOTP) ---

    async def add_totp(self, visit: Visit) -> Response:
        self._allowed(visit, "totp")
        step_up = self._stepped_up(visit, "/portal/")
        if step_up is not None:
            return step_up
        user, store = visit.user, self.context.store
        # A token enrolled here but never confirmed is of no use: one at a time.
        for token in await store.read(Store.list_tokens, user):
            if not token.active:
                await store.run(Store.delete_token, user, token.serial)
        token = await store.run(Store.add_token, user,
                                NewToken(kind=TokenKind.TOTP, secret=oath.generate_secret()),
                                now=self.now(), active=False)
        visit.session.pending_token = token.serial
        await self.audit(visit, user, "token_added", factor="totp")
        return redirect("/portal/totp")

    async def _pending_token(self, visit: Visit):
        serial = visit.session.pending_token
        if serial is not None:
            for token in await self.context.store.read(Store.list_tokens, visit.user):
                if token.serial == serial and not token.active:
                    return token
        visit.session.pending_token = None
        return None

    async def totp_page(self, visit: Visit, *, error: str = "", status: int = 200) -> Response:
        token = await self._pending_token(visit)
        if token is None:
            return redirect("/portal/")
        uri = oath.otpauth_uri(token, issuer=ISSUER, account=visit.user)
        return self.page(visit, "portal/totp.html", status=status, qr=_qr_data_uri(uri),
                         secret=_grouped(token.secret), serial=token.serial, error=error)

    async def confirm_totp(self, visit: Visit) -> Response:
        token = await self._pending_token(visit)
        if token is None:
            raise Refused(409, "Nothing to confirm",
                          "Start adding the authenticator app again.")
        code = "".join(visit.field("code").split())
        now = self.now()
        step = oath.match_totp(token, code, now, window=self.core.policy.totp_window)
        # The replay guard, as at sign-in: a code counts once.
        if step is None or not await self.context.store.use_totp_step(
                token.id, step, step - oath.totp_step(now, token.period)):
            await self.audit(visit, visit.user, "token_code_wrong", factor="totp",
                             outcome="refused")
            return await self.totp_page(
                visit, status=400,
                error="That code is not right. Check that the app shows this account, "
                      "then type the code it shows now.")
        await self.context.store.run(Store.activate_token, visit.user, token.serial)
        visit.session.pending_token = None
        await self.audit(visit, visit.user, "token_activated", factor="totp")
        visit.session.notice = "Your authenticator app is set up."
        return redirect("/portal/")

    # --- this browser as a push device ---

    async def enroll_browser(self, visit: Visit) -> Response:
        self._allowed(visit, "push")
        step_up = self._stepped_up(visit, "/portal/")
        if step_up is not None:
            return step_up
        token = new_enrollment_token()
        now = self.now()
        expires = now + self.context.enrollment_minutes() * 60
        # As `mfaserver device enroll`: only the digest is stored.
        await self.context.store.run(Store.add_enrollment, visit.user, token_digest(token),
                                     expires, now=now)
        await self.audit(visit, visit.user, "enrollment_link", factor="push")
        return redirect(f"/v1/enroll/{token}")

    # --- removing ---

    async def delete_token(self, visit: Visit) -> Response:
        self._allowed(visit, "totp")
        serial = visit.field("serial")
        await self._delete(visit, Store.delete_token, serial, "token_removed", "totp")
        if visit.session.pending_token == serial:
            visit.session.pending_token = None
        visit.session.notice = f"Token {serial} was removed."
        return redirect("/portal/")

    async def delete_device(self, visit: Visit) -> Response:
        self._allowed(visit, "push")
        await self._delete(visit, Store.delete_device, visit.field("device"),
                           "device_removed", "push")
        visit.session.notice = "The device was removed."
        return redirect("/portal/")

    async def _delete(self, visit: Visit, delete, what: str, reason: str, factor: str) -> None:
        try:
            await self.context.store.run(delete, visit.user, what)
        except StoreUnavailable:
            raise
        except StoreError:
            raise Refused(404, "Not found", "This was removed already, or is not yours.")
        await self.audit(visit, visit.user, reason, factor=factor)

    # --- the phone number ---

    def _sms(self):
        return self.core.factors.get("sms")

    def _phone_key(self, user: str) -> str:
        # The texted code is kept apart from the user's sign-in codes (a user
        # name cannot hold a control character): it must not sign anyone in.
        return f"{user}\x00new-phone"

    async def phone_page(self, visit: Visit, *, error: str = "", status: int = 200,
                         number: str = "") -> Response:
        self._allowed(visit, "sms", "phone")
        account = await self.load_account(visit.user)
        pending = visit.session.pending_phone
        return self.page(visit, "portal/phone.html", status=status, error=error,
                         sms_configured=self._sms() is not None,
                         phone=account.phone if account is not None else None,
                         pending=pending, number=number)

    async def send_phone_code(self, visit: Visit) -> Response:
        self._allowed(visit, "sms", "phone")
        sms = self._sms()
        if sms is None:
            return await self.phone_page(visit, status=409)
        step_up = self._stepped_up(visit, "/portal/phone")
        if step_up is not None:
            return step_up
        typed = visit.field("phone")
        try:
            number = phones.parse_phone(typed)
        except phones.InvalidPhoneNumber as e:
            return await self.phone_page(
                visit, status=400, number=typed,
                error=f"This number cannot be used: {e.reason}. "
                      "Write it with + and the country code, e.g. +44 20 7946 0000.")
        try:
            # The code is kept per user (one live code, the per-user text
            # limit): note now, before the send completes, which number this
            # newest code goes to. Only that number can be confirmed with it,
            # whichever session or earlier send is waiting for another.
            sending = sms.send_code(self._phone_key(visit.user), number)
            self._phone_sent[visit.user] = number
            self._phone_sent.move_to_end(visit.user)
            while len(self._phone_sent) > MAX_PHONE_CHANGES:
                self._phone_sent.popitem(last=False)
            await sending
        except SendRefused:
            return await self.phone_page(visit, status=429, error=MSG_TOO_MANY_CODES,
                                         number=typed)
        except Exception as e:
            log.error("portal: could not text a code for {user}: {error}", user=visit.user,
                      error=str(e))
            return await self.phone_page(
                visit, status=502, number=typed,
                error="The text message could not be sent. Try again later.")
        visit.session.pending_phone = number
        visit.session.phone_attempts = 0
        await self.audit(visit, visit.user, "phone_code_sent", factor="sms")
        return redirect("/portal/phone")

    async def confirm_phone(self, visit: Visit) -> Response:
        self._allowed(visit, "sms", "phone")
        session, sms = visit.session, self._sms()
        if session.pending_phone is None or sms is None:
            raise Refused(409, "Nothing to confirm", "Enter your new number again.",
                          "/portal/phone", "Change your phone number")
        code = "".join(visit.field("code").split())
        if self._phone_sent.get(visit.user) != session.pending_phone:
            session.pending_phone = None    # a newer code went to another number
            raise Refused(409, "Nothing to confirm",
                          "A newer code was sent to another number. Enter your new number"
                          " again.", "/portal/phone", "Change your phone number")
        if not sms.check_code(self._phone_key(visit.user), code):
            session.phone_attempts += 1     # counted before any wait: parallel tries too
            await self.audit(visit, visit.user, "phone_code_wrong", factor="sms",
                             outcome="refused")
            if session.phone_attempts >= MAX_PHONE_ATTEMPTS:
                session.pending_phone = None
                return await self.phone_page(
                    visit, status=400, error="Too many wrong codes. Enter your number again.")
            return await self.phone_page(visit, status=400,
                                         error="That code is not right, or it has expired.")
        number, session.pending_phone = session.pending_phone, None
        self._phone_sent.pop(visit.user, None)
        await self.context.store.run(Store.set_phone, visit.user, number)
        await self.audit(visit, visit.user, "phone_changed", factor="sms")
        session.notice = f"Your phone number is now {number}."
        return redirect("/portal/")

    # --- the default method, the voice PIN ---

    async def set_default(self, visit: Visit) -> Response:
        choice = visit.field("method")
        account = await self.load_account(visit.user)
        allowed = [name for name, _ in self._default_choices(visit, account)]
        if choice and choice not in allowed:
            raise Refused(400, "Not available", "You cannot choose this method.")
        await self.context.store.run(Store.set_default_method, visit.user, choice or None)
        await self.audit(visit, visit.user, "default_method", factor=choice)
        visit.session.notice = ("Your default method is now: "
                                f"{METHOD_LABELS.get(choice, choice)}." if choice
                                else "The server's default method applies to you now.")
        return redirect("/portal/")

    async def pin_page(self, visit: Visit, *, error: str = "", status: int = 200) -> Response:
        self._allowed(visit, "phone")
        account = await self.load_account(visit.user)
        return self.page(visit, "portal/pin.html", status=status, error=error,
                         has_pin=account is not None and account.has_pin)

    async def set_pin(self, visit: Visit) -> Response:
        self._allowed(visit, "phone")
        # The PIN guards phone-call approvals: like a factor, it is changed
        # only with a second factor passed in the last minutes.
        step_up = self._stepped_up(visit, "/portal/pin")
        if step_up is not None:
            return step_up
        pin, again = visit.field("pin"), visit.field("pin2")
        # "0" alone reports fraud on a call, so a PIN is at least 4 digits.
        if not (pin.isascii() and pin.isdigit() and 4 <= len(pin) <= 12):
            return await self.pin_page(visit, status=400, error="A PIN is 4 to 12 digits.")
        if pin != again:
            return await self.pin_page(visit, status=400, error="The two PINs differ.")
        pin_hash = await self.context.hash_password(pin)
        await self.context.store.run(Store.set_pin, visit.user, pin_hash)
        await self.audit(visit, visit.user, "pin_set", factor="phone")
        visit.session.notice = "Your PIN is set."
        return redirect("/portal/")

    # --- sign-ins, and "this wasn't me" ---

    async def _sign_ins(self, visit: Visit) -> list[AuditEntry]:
        """The user's last sign-ins, newest first (the portal's own actions left out).

        Audit rows carry the name as typed; a user who signed in to the portal
        under another spelling of their name sees the rows of both.
        """
        names = {visit.user, visit.session.username or visit.user}
        rows: list[AuditEntry] = []
        for name in names:
            # Filtered in the query: the portal's own actions, however many,
            # must not push real sign-ins out of the list.
            rows += await self.context.store.read(Store.recent_audit, user=name,
                                                  limit=HISTORY_SIZE,
                                                  outcomes=("accept", "reject"))
        rows.sort(key=lambda row: (row.time, row.id or 0), reverse=True)
        return rows[:HISTORY_SIZE]

    async def history(self, visit: Visit) -> Response:
        rows = await self._sign_ins(visit)
        return self.page(visit, "portal/history.html", rows=[_shown(row) for row in rows])

    async def report_fraud(self, visit: Visit) -> Response:
        """"This wasn't me": asked once more, then the core blocks the user, closes
        their pending approvals, alerts the admins and audits; their sessions end."""
        user = visit.user
        wanted = visit.field("id")
        row = next((row for row in await self._sign_ins(visit) if str(row.id) == wanted), None)
        if row is None:
            raise Refused(404, "Not found", "This sign-in is not among your recent ones.",
                          "/portal/history", "Your recent sign-ins")
        if visit.field("confirm") != "yes":
            return self.page(visit, "portal/fraud.html", row=_shown(row))
        await self.core.report_fraud(user, row.client, CLIENT)
        await self.audit(visit, user, "fraud_reported", factor=row.factor, outcome="block")
        self.sessions.end_user(user)
        visit.session = None
        return self.page(
            visit, "portal/message.html", title="Reported: your account is now blocked",
            text="Nobody can sign in as you until your administrator unblocks your account; "
                 "they have been told. Change your password as soon as you can: someone else "
                 "probably knows it.",
            link="", link_text="")


@dataclass(frozen=True)
class _FactorList:
    """A section of the account page: one kind of factor the user holds, each with
    (name, detail, the value the remove form posts as ``field``, the remove
    button's accessible name), and the button that adds one."""

    id: str
    title: str
    remove_action: str
    field: str
    items: list[tuple[str, str, str, str]]
    removable: bool
    add: tuple[str, str] | None


def _shown(row: AuditEntry) -> dict:
    """An audit row as the history shows it."""
    return {"id": row.id, "time": utc(row.time), "client": row.client, "nas": row.nas_ip or "",
            "station": row.calling_station_id or "", "factor": row.factor or "",
            "accepted": row.outcome == "accept"}


def _refused_csrf() -> Refused:
    return Refused(403, "This form has expired",
                   "The page was open for too long, or the form did not come from this site. "
                   "Nothing was changed. Open the page again and retry.")


def _with_header(response: Response, name: str, value: str) -> Response:
    return dataclasses.replace(response, headers=response.headers + ((name, value),))
