"""The self-service portal (/portal/), in memory: StubTreq over the WebApp, a Clock, the real
store in a temporary folder and the real core (`Authenticator`) with the real TOTP, push and
SMS factors, as tests/test_pipeline_oob.py builds it. No reactor, no sockets, no sleeps.

alice has a TOTP token, a push device and a phone; bob has nothing (he gets invites); carol
has only a phone.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from html import unescape
from pathlib import Path
from urllib.parse import urlencode

from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.model import AuthRequest, Device, Outcome, Reason, TokenKind
from mfaserver.auth.pipeline import MSG_LOCKED, Authenticator
from mfaserver.config import MfaConfig
from mfaserver.factors import METHODS, oath
from mfaserver.factors.push import (MSG_MATCH_NUMBER, NumberMatchingPushFactor, PushFactor,
                                    PushTransactions, push_limit)
from mfaserver.factors.push_protocol import (generate_device_key, new_enrollment_token,
                                             public_key_text, token_digest)
from mfaserver.factors.sms import SmsCodes
from mfaserver.factors.token import TokenFactor
from mfaserver.passwords import hash_password, verify_password
from mfaserver.store import NewToken, Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import MemoryDirectory, MemorySmsGateway, run_now
from mfaserver.web.context import WebContext
from mfaserver.web.portal import STEP_UP_SECONDS, PortalSettings, add_portal_routes
from mfaserver.web.portal_sessions import COOKIE, MAX_SESSIONS_PER_USER, Sessions
from mfaserver.web.server import CONTENT_SECURITY_POLICY, WebApp, WebSettings, make_site
from test_pipeline_oob import FakeAlerts

T0 = 1_700_000_010.0
SEED = bytes(range(20))
BASE = "https://mfa.example.org"
ALICE_PHONE = "+16502530000"
NEW_PHONE = "+16502530099"
CAROL_PHONE = "+16502530001"

POLICY = MfaConfig(lockout_threshold=3)


def totp_code(now: float, seed: bytes = SEED, steps: int = 0) -> str:
    return oath.hotp(seed, oath.totp_step(now) + steps)


@dataclasses.dataclass
class Page:
    """A portal answer as a test looks at it."""

    status: int
    headers: object
    body: str

    @property
    def location(self) -> str | None:
        values = self.headers.getRawHeaders("location")
        return values[0] if values else None

    @property
    def cookie(self) -> str | None:
        values = self.headers.getRawHeaders("set-cookie")
        return values[0] if values else None

    @property
    def csrf(self) -> str:
        return re.search(r'name="csrf" value="([^"]*)"', self.body).group(1)

    @property
    def text(self) -> str:
        """The words of the page, tags removed."""
        return " ".join(unescape(re.sub(r"<[^>]+>", " ", self.body)).split())


class Browser:
    """A browser: its own cookie jar (treq's, as StubTreq keeps one), and the last
    page's CSRF token. ``session_id`` is the portal cookie it was last given;
    setting it sends that id instead of the jar's."""

    def __init__(self, case: PortalCase):
        self.case = case
        self.http = StubTreq(case.resource)
        self.session_id: str | None = None
        self.forced = False
        self.csrf = ""
        self.followed: Page | None = None

    def force_session(self, session_id: str) -> None:
        """Send ``session_id`` from now on, whatever the server sets."""
        self.http = StubTreq(self.case.resource)     # an empty jar
        self.session_id, self.forced = session_id, True

    def start(self, method: str, path: str, fields: dict | None = None, *,
              csrf: bool = True) -> defer.Deferred:
        headers = {}
        if self.forced:
            headers["Cookie"] = [f"{COOKIE}={self.session_id}"]
        data = None
        if method == "POST":
            fields = dict(fields or {})
            if csrf:
                fields.setdefault("csrf", self.csrf)
            data = urlencode(fields).encode()
            headers["Content-Type"] = ["application/x-www-form-urlencoded"]
        d = self.http.request(method, BASE + path, data=data, headers=headers,
                              allow_redirects=False)
        d.addCallback(self._answered)
        self.http.flush()
        return d

    def _answered(self, response) -> defer.Deferred:
        def page(body: bytes) -> Page:
            result = Page(response.code, response.headers, body.decode("utf-8"))
            cookie = result.cookie
            if cookie is not None:
                value = cookie.split(";")[0].partition("=")[2]
                self.session_id = value or None
            if 'name="csrf"' in result.body:
                self.csrf = result.csrf
            return result
        return response.content().addCallback(page)

    def finish(self, d: defer.Deferred) -> Page:
        self.http.flush()
        return self.case.successResultOf(d)

    def get(self, path: str) -> Page:
        return self.finish(self.start("GET", path))

    def post(self, path: str, fields: dict | None = None, **kw) -> Page:
        """POST a form; a redirect is followed as a browser does (for the next page's
        CSRF token), but the answer to the POST is returned."""
        page = self.finish(self.start("POST", path, fields, **kw))
        self.followed = None
        if page.status == 303 and page.location.startswith("/portal/"):
            self.followed = self.get(page.location)
        return page

    def sign_in(self, username="alice", password="pw-alice", code: str | None = None) -> Page:
        self.get("/portal/signin")
        if code is None and username == "alice":
            code = totp_code(self.case.clock.seconds())
        return self.post("/portal/signin", {"username": username, "password": password,
                                            "code": code or ""})


class PortalCase(SynchronousTestCase):
    number_matching = False
    with_sms = True

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.db = Store.open(self.dir / "db.sqlite3", self.dir / "seed.key")
        self.addCleanup(self.db.close)
        self.store = ThreadedStore(self.db, run_now)
        self.directory = MemoryDirectory({"alice": "pw-alice", "bob": "pw-bob",
                                          "carol": "pw-carol"})
        self.db.add_user("alice", password_hash=None, phone=ALICE_PHONE, now=T0)
        self.db.add_user("bob", password_hash=None, phone=None, now=T0)
        self.db.add_user("carol", password_hash=None, phone=CAROL_PHONE, now=T0)
        self.db.add_token("alice", NewToken(kind=TokenKind.TOTP, secret=SEED, serial="APP-1"),
                          now=T0)
        self.enroll_device("alice")
        self.push = PushTransactions(self.clock)
        self.gateway = MemorySmsGateway()
        self.sms = SmsCodes(self.gateway, self.clock)
        push = NumberMatchingPushFactor if self.number_matching else PushFactor
        factors = {"totp": TokenFactor(self.store, self.clock),
                   "push": push(self.push, push_limit(self.clock, 30))}
        if self.with_sms:
            factors["sms"] = self.sms
        self.alerts = FakeAlerts()
        self.auth = Authenticator(self.directory, self.store, ChallengeRegistry(self.clock),
                                  POLICY, self.clock, methods=METHODS, factors=factors,
                                  alerts=self.alerts)
        self.settings: PortalSettings | None = PortalSettings()
        self.context = WebContext(
            clock=self.clock, store=self.store, authenticator=self.auth, push=self.push,
            hash_password=lambda text: defer.succeed(hash_password(text, log2_n=4)),
            public_url=BASE, vapid_public_key=lambda: None,
            portal_settings=lambda: self.settings, enrollment_minutes=lambda: 10.0)
        app = WebApp(self.clock)
        add_portal_routes(app, self.context)
        self.resource = app.resource()
        self.browser = Browser(self)

    def enroll_device(self, user: str) -> None:
        digest = f"digest-{user}"
        self.db.add_enrollment(user, digest, T0 + 600, now=T0)
        self.db.enroll_device(digest, Device(id=f"dev-{user}", user="",
                                             public_key=public_key_text(generate_device_key())),
                              now=T0)

    def audit(self, user="alice", client="portal"):
        return [(row.outcome, row.factor, row.reason)
                for row in reversed(self.db.recent_audit(user=user, limit=100))
                if row.client == client]

    def only_txn(self, user="alice"):
        [txn] = self.push.pending_for(user)
        return txn

    def invite(self, user="bob", hours=24.0) -> str:
        token = new_enrollment_token()
        now = self.clock.seconds()
        self.db.add_invite(user, token_digest(token), now + hours * 3600, now=now)
        return token

    def signed_in(self, browser: Browser | None = None) -> Page:
        """The account page, which only a signed-in browser sees."""
        page = (browser or self.browser).get("/portal/")
        self.assertEqual(page.status, 200, page.text)
        self.assertIn("Your sign-in methods", page.text)
        return page

    def assertSignedOut(self, browser: Browser | None = None) -> None:
        page = (browser or self.browser).get("/portal/")
        self.assertEqual((page.status, page.location), (303, "/portal/signin"))


class SignInTests(PortalCase):

    def test_the_sign_in_page_has_the_security_headers_and_no_script(self):
        page = self.browser.get("/portal/signin")
        self.assertEqual(page.status, 200)
        self.assertEqual(page.headers.getRawHeaders("content-security-policy"),
                         [CONTENT_SECURITY_POLICY])
        self.assertNotIn("<script", page.body)
        self.assertNotIn("style=", page.body)
        for label in ('for="username"', 'for="password"', 'for="code"'):
            self.assertIn(label, page.body)
        self.assertIn("Send a push to my device", page.text)
        self.assertIn("Text me a code", page.text)

    def test_password_and_code_sign_in_with_a_new_session_id(self):
        first = self.browser.get("/portal/signin")
        before = self.browser.session_id
        self.assertIsNotNone(before)
        page = self.browser.post("/portal/signin", {
            "username": "alice", "password": "pw-alice", "code": totp_code(T0)})
        self.assertEqual((page.status, page.location), (303, "/portal/"), first.text)
        self.assertNotEqual(self.browser.session_id, before)
        self.signed_in()
        self.assertEqual(self.audit(), [("accept", "totp", "ok")])
        # The id seen before sign-in is worth nothing now.
        stale = Browser(self)
        stale.force_session(before)
        self.assertSignedOut(stale)

    def test_the_cookie_is_host_prefixed_secure_httponly_strict_for_the_whole_site(self):
        cookie = self.browser.sign_in().cookie
        self.assertTrue(cookie.startswith(f"{COOKIE}="))
        self.assertTrue(COOKIE.startswith("__Host-"))
        attributes = [part.strip() for part in cookie.split(";")[1:]]
        self.assertEqual(sorted(attributes),
                         ["HttpOnly", "Path=/", "SameSite=Strict", "Secure"])

    def test_a_push_holds_the_post_until_the_device_approves(self):
        self.browser.get("/portal/signin")
        d = self.browser.start("POST", "/portal/signin", {
            "username": "alice", "password": "pw-alice", "method": "push"})
        self.browser.http.flush()
        self.assertNoResult(d)
        txn = self.only_txn()
        self.assertEqual(txn.client, "portal")
        self.push.answer(txn.txid, "alice", "approve")
        page = self.browser.finish(d)
        self.assertEqual((page.status, page.location), (303, "/portal/"))
        self.signed_in()
        self.assertEqual(self.audit(), [("accept", "push", "ok")])

    def test_a_denied_push_shows_the_reply_message(self):
        self.browser.get("/portal/signin")
        d = self.browser.start("POST", "/portal/signin", {
            "username": "alice", "password": "pw-alice", "method": "push"})
        self.push.answer(self.only_txn().txid, "alice", "deny")
        page = self.browser.finish(d)
        self.assertEqual(page.status, 401)
        self.assertIn("The sign-in was denied.", page.text)
        self.assertSignedOut()

    def test_a_texted_code_at_the_challenge_signs_in_and_the_state_stays_on_the_server(self):
        self.browser.get("/portal/signin")
        page = self.browser.post("/portal/signin", {
            "username": "alice", "password": "pw-alice", "method": "sms"})
        self.assertEqual(page.status, 200)
        self.assertIn("Enter the code sent to +*******0000.", page.text)
        # The only hidden field is the CSRF token: the State is not in the page.
        self.assertEqual(re.findall(r'type="hidden" name="(\w+)"', page.body), ["csrf"])
        page = self.browser.post("/portal/challenge", {"answer": self.gateway.last_code()})
        self.assertEqual((page.status, page.location), (303, "/portal/"))
        self.signed_in()
        self.assertEqual(self.audit(), [("challenge", "sms", "challenge_issued"),
                                        ("accept", "sms", "ok")])

    def test_a_bare_password_gets_the_users_default_method(self):
        self.db.set_default_method("alice", "totp")
        self.browser.get("/portal/signin")
        page = self.browser.post("/portal/signin", {"username": "alice",
                                                    "password": "pw-alice"})
        self.assertIn("Enter the code from your authenticator app or token.", page.text)
        page = self.browser.post("/portal/challenge", {"answer": totp_code(T0)})
        self.assertEqual(page.location, "/portal/")

    def test_a_wrong_password_is_refused_with_the_cores_message(self):
        page = self.browser.sign_in(password="wrong")
        self.assertEqual(page.status, 401)
        self.assertIn("Authentication failed.", page.text)
        self.assertIn('value="alice"', page.body)       # the name is kept, not the password
        self.assertNotIn("wrong", page.body)
        self.assertEqual(self.audit(), [("reject", "password", "bad_password")])
        self.assertSignedOut()

    def test_wrong_codes_count_towards_the_lockout(self):
        for _ in range(2):
            page = self.browser.sign_in(code="000000")
            self.assertIn("Wrong or already used code.", page.text)
        page = self.browser.sign_in(code="000000")
        self.assertIn(MSG_LOCKED, page.text)
        # Locked: even the right code is refused now, as at a NAS.
        page = self.browser.sign_in(code=totp_code(T0))
        self.assertEqual(page.status, 401)
        self.assertIn(MSG_LOCKED, page.text)
        self.assertIsNotNone(self.db.get_user("alice").locked_until)
        self.assertSignedOut()

    def test_a_malformed_code_is_refused_before_the_core(self):
        page = self.browser.sign_in(code="12ab")
        self.assertEqual(page.status, 400)
        self.assertIn("A code is 6 to 8 digits.", page.text)
        self.assertEqual(self.directory.calls, [])

    def test_a_bypass_is_neither_used_nor_used_up_by_the_portal(self):
        self.db.add_bypass("alice", T0 + 600)
        self.assertEqual(self.browser.sign_in().status, 303)    # with a code, as always
        self.assertEqual(self.db.load_account("alice").bypass_until, T0 + 600)

    def test_a_user_without_a_factor_is_sent_to_the_invite(self):
        page = self.browser.sign_in("bob", "pw-bob")
        self.assertIn("No second factor is set up for your account.", page.text)
        self.assertSignedOut()

    def test_the_session_is_for_the_name_the_directory_gives(self):
        class CaseFolding(MemoryDirectory):
            def authenticate(self, username, password):
                return super().authenticate(username.lower(), password)

        self.auth.directory = CaseFolding(self.directory.users)
        page = self.browser.sign_in("ALICE", "pw-alice", code=totp_code(T0))
        self.assertEqual(page.location, "/portal/")
        self.assertIn("Signed in as alice", self.signed_in().text)
        # The core audits the name as typed; the history shows those rows too.
        self.assertEqual(self.audit("ALICE"), [("accept", "totp", "ok")])
        page = self.browser.get("/portal/history")
        self.assertEqual(len(re.findall(r'name="id" value="\d+"', page.body)), 1)

    def test_unenrolled_users_let_in_by_the_policy_are_not_signed_in_to_the_portal(self):
        self.auth.policy = dataclasses.replace(POLICY, unenrolled="allow")
        page = self.browser.sign_in("bob", "pw-bob")
        self.assertEqual(page.status, 403)
        self.assertIn("Ask your administrator for an invite link.", page.text)
        self.assertSignedOut()
        token = self.invite("bob")
        self.browser.get(f"/portal/invite/{token}")
        page = self.browser.post(f"/portal/invite/{token}", {"password": "pw-bob"})
        self.assertEqual(page.location, "/portal/")

    def test_sign_out_ends_the_session(self):
        self.browser.sign_in()
        self.signed_in()
        page = self.browser.post("/portal/signout")
        self.assertEqual(page.status, 200)
        self.assertIn("Max-Age=0", page.cookie)
        self.assertEqual(self.audit()[-1], ("change", "session", "signed_out"))
        self.assertSignedOut()

    def test_every_error_is_a_page_never_a_traceback(self):
        self.browser.get("/portal/signin")
        d = self.browser.http.request(
            "POST", BASE + "/portal/signin", data=b'{"username": "alice"}',
            headers={"Content-Type": ["application/json"]}, allow_redirects=False)
        page = self.browser.finish(d.addCallback(self.browser._answered))
        self.assertEqual(page.status, 415)
        self.assertEqual(page.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertNotIn("Traceback", page.body)
        self.assertEqual(self.browser.get("/portal/nothing").status, 404)

    def test_pages_over_tls_carry_hsts(self):
        page = self.browser.get("/portal/signin")
        self.assertEqual(page.headers.getRawHeaders("strict-transport-security"),
                         ["max-age=31536000"])

    def test_a_portal_removed_by_a_reload_answers_not_found(self):
        self.settings = None
        page = self.browser.get("/portal/signin")
        self.assertEqual(page.status, 404)
        self.assertIn("The portal is not enabled", page.text)


class HangUpTests(PortalCase):
    """Over the real Site: a browser that hangs up while its push is held."""

    def test_hanging_up_leaves_the_sign_in_to_finish_and_be_audited(self):
        app = WebApp(self.clock)
        add_portal_routes(app, self.context)
        site = make_site(app, WebSettings())
        _, transport = _connect(site, b"GET /portal/signin HTTP/1.1\r\nHost: x\r\n\r\n")
        page = transport.value().decode()
        cookie = re.search(r"Set-Cookie: (__Host-mfaportal=[^;]+)", page).group(1)
        csrf = re.search(r'name="csrf" value="([^"]*)"', page).group(1)
        body = urlencode({"csrf": csrf, "username": "alice", "password": "pw-alice",
                          "method": "push"}).encode()
        protocol, transport = _connect(site, (
            b"POST /portal/signin HTTP/1.1\r\nHost: x\r\nCookie: %s\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n"
            % (cookie.encode(), len(body))) + body)
        self.assertEqual(len(self.push.pending_for("alice")), 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.push.pending_for("alice")), 1)    # still held
        self.clock.advance(POLICY.timeout + 1)
        self.assertEqual(self.audit()[-1][0], "reject")


def _connect(site, data: bytes):
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8443))
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return protocol, transport


class NumberMatchingTests(PortalCase):
    number_matching = True

    def test_the_challenge_asks_for_the_number_and_the_post_waits_for_the_device(self):
        self.browser.get("/portal/signin")
        page = self.browser.post("/portal/signin", {
            "username": "alice", "password": "pw-alice", "method": "push"})
        self.assertIn(MSG_MATCH_NUMBER, page.text)
        txn = self.only_txn()
        d = self.browser.start("POST", "/portal/challenge", {"answer": txn.number})
        self.assertNoResult(d)
        self.push.answer(txn.txid, "alice", "approve", number=txn.number)
        page = self.browser.finish(d)
        self.assertEqual(page.location, "/portal/")
        self.signed_in()


class SessionTests(PortalCase):

    def test_a_session_ends_after_the_idle_timeout(self):
        self.browser.sign_in()
        self.clock.advance(9 * 60)
        self.signed_in()
        self.clock.advance(9 * 60)
        self.signed_in()                    # each request restarts the idle time
        self.clock.advance(10 * 60)
        page = self.browser.get("/portal/")
        self.assertEqual(page.location, "/portal/signin")
        page = self.browser.get("/portal/signin")
        self.assertIn("Your session has ended.", page.text)

    def test_a_session_ends_after_its_maximum_age_however_busy(self):
        self.browser.sign_in()
        for _ in range(8 * 60 // 5 - 1):
            self.clock.advance(5 * 60)
            self.signed_in()
        self.clock.advance(5 * 60)
        self.assertSignedOut()

    def test_the_timeouts_are_read_from_the_settings_on_every_request(self):
        self.browser.sign_in()
        self.settings = dataclasses.replace(self.settings, session_idle_minutes=2)
        self.clock.advance(3 * 60)
        self.assertSignedOut()

    def test_a_flood_of_sign_in_pages_cannot_push_out_signed_in_sessions(self):
        sessions = Sessions(self.clock, max_sessions=2, max_anonymous=2)
        signed_in = sessions.sign_in(sessions.new(), "alice", "alice")
        for _ in range(10):
            sessions.new()
        self.assertEqual(len(sessions), 3)
        self.assertIs(sessions.get(signed_in.id, idle=60, max_age=60), signed_in)
        for user in ("bob", "carol"):
            sessions.sign_in(None, user, user)
        self.assertIsNone(sessions.get(signed_in.id, idle=60, max_age=60))

    def test_one_user_cannot_fill_the_sessions_their_oldest_ends_instead(self):
        sessions = Sessions(self.clock, max_sessions=100)
        bob = sessions.sign_in(None, "bob", "bob")
        mine = [sessions.sign_in(None, "alice", "alice") for _ in range(MAX_SESSIONS_PER_USER)]
        self.clock.advance(1)
        sessions.get(mine[0].id, idle=60, max_age=60)       # seen now: no longer the oldest
        newest = sessions.sign_in(None, "alice", "alice")
        self.assertIsNone(sessions.get(mine[1].id, idle=60, max_age=60))
        for kept in (mine[0], newest, bob):
            self.assertIs(sessions.get(kept.id, idle=60, max_age=60), kept)
        self.assertEqual(len(sessions), MAX_SESSIONS_PER_USER + 1)

    def test_a_cookie_for_no_session_is_removed(self):
        self.browser.force_session("made-up")
        page = self.browser.get("/portal/")
        self.assertEqual(page.location, "/portal/signin")
        self.assertTrue(page.cookie.startswith(f"{COOKIE}="))
        self.assertNotEqual(self.browser.session_id, "made-up")


class CsrfTests(PortalCase):

    def setUp(self):
        super().setUp()
        self.browser.sign_in()

    def assertRefused(self, page: Page) -> None:
        self.assertEqual(page.status, 403)
        self.assertIn("This form has expired", page.text)
        self.assertIn("Nothing was changed.", page.text)

    def test_a_post_without_the_token_changes_nothing(self):
        before = self.audit()
        self.assertRefused(self.browser.post("/portal/pin", {"pin": "1234", "pin2": "1234"},
                                             csrf=False))
        self.assertRefused(self.browser.post("/portal/devices/delete", {"device": "dev-alice"},
                                             csrf=False))
        self.assertIsNone(self.db.get_pin_hash("alice"))
        self.assertEqual(len(self.db.list_devices("alice")), 1)
        self.assertEqual(self.audit(), before)
        self.signed_in()                    # the session itself goes on

    def test_a_forged_token_or_another_sessions_token_changes_nothing(self):
        other = Browser(self)
        other.sign_in()
        for token in ("forged", other.csrf, self.browser.csrf[:-1]):
            self.assertRefused(self.browser.post("/portal/default", {
                "method": "totp", "csrf": token}))
        self.assertIsNone(self.db.load_account("alice").default_method)

    def test_a_sign_in_without_the_token_does_not_reach_the_core(self):
        other = Browser(self)
        other.get("/portal/signin")
        self.assertRefused(other.post("/portal/signin", {
            "username": "alice", "password": "pw-alice", "code": "123456"}, csrf=False))
        self.assertEqual(self.directory.calls, ["alice", "alice"])  # the first sign-in only


class StepUpTests(PortalCase):

    def test_adding_a_factor_after_five_minutes_asks_for_a_second_factor_again(self):
        self.browser.sign_in()
        self.clock.advance(STEP_UP_SECONDS + 1)
        page = self.browser.post("/portal/totp")
        self.assertEqual(page.location, "/portal/confirm")
        self.assertEqual([t.serial for t in self.db.list_tokens("alice")], ["APP-1"])
        page = self.browser.get("/portal/confirm")
        self.assertIn("Confirm it's you", page.text)
        page = self.browser.post("/portal/confirm", {
            "password": "pw-alice", "code": totp_code(self.clock.seconds())})
        self.assertEqual(page.location, "/portal/")
        self.assertIn("For the next 5 minutes", self.browser.followed.text)
        page = self.browser.post("/portal/totp")
        self.assertEqual(page.location, "/portal/totp")

    def test_setting_the_voice_pin_after_five_minutes_asks_again(self):
        self.browser.sign_in()
        self.clock.advance(STEP_UP_SECONDS + 1)
        page = self.browser.post("/portal/pin", {"pin": "4321", "pin2": "4321"})
        self.assertEqual(page.location, "/portal/confirm")
        self.assertIsNone(self.db.get_pin_hash("alice"))

    def test_changing_the_phone_after_five_minutes_asks_again_and_comes_back(self):
        self.browser.sign_in()
        self.clock.advance(STEP_UP_SECONDS + 1)
        page = self.browser.post("/portal/phone", {"phone": NEW_PHONE})
        self.assertEqual(page.location, "/portal/confirm")
        self.assertEqual(self.gateway.sent, [])
        self.browser.get("/portal/confirm")
        page = self.browser.post("/portal/confirm", {"password": "pw-alice", "method": "sms"})
        page = self.browser.post("/portal/challenge", {"answer": self.gateway.last_code()})
        self.assertEqual(page.location, "/portal/phone")

    def test_a_wrong_second_factor_at_the_step_up_keeps_the_session_but_not_the_right(self):
        self.browser.sign_in()
        self.clock.advance(STEP_UP_SECONDS + 1)
        self.browser.get("/portal/confirm")
        page = self.browser.post("/portal/confirm", {"password": "pw-alice", "code": "000000"})
        self.assertEqual(page.status, 401)
        self.assertEqual(self.browser.post("/portal/push").location, "/portal/confirm")
        self.signed_in()


class InviteTests(PortalCase):

    def test_an_invite_and_the_password_sign_in_once_to_add_a_first_factor(self):
        token = self.invite("bob")
        page = self.browser.get(f"/portal/invite/{token}")
        self.assertEqual(page.status, 200)
        self.assertIn('value="bob"', page.body)
        page = self.browser.post(f"/portal/invite/{token}", {"password": "wrong"})
        self.assertEqual(page.status, 401)
        self.assertEqual(self.db.invite_user(token_digest(token), now=T0), "bob")  # not used
        page = self.browser.post(f"/portal/invite/{token}", {"password": "pw-bob"})
        self.assertEqual(page.location, "/portal/")
        self.assertIn("no second factor yet", self.browser.followed.text)
        # The invite counts as the second factor: bob can add one at once.
        self.assertEqual(self.browser.post("/portal/totp").location, "/portal/totp")
        self.assertIn(("accept", "invite", "invite_used"), self.audit("bob"))
        # Used up.
        other = Browser(self)
        page = other.get(f"/portal/invite/{token}")
        self.assertEqual(page.status, 410)
        self.assertIn("expired or was used already", page.text)

    def test_an_expired_invite_is_refused(self):
        token = self.invite("bob", hours=1)
        self.clock.advance(3601)
        page = self.browser.get(f"/portal/invite/{token}")
        self.assertEqual(page.status, 410)

    def test_an_unknown_invite_is_not_found(self):
        page = self.browser.get(f"/portal/invite/{new_enrollment_token()}")
        self.assertEqual(page.status, 404)

    def test_an_invite_takes_only_its_own_users_password(self):
        token = self.invite("bob")
        self.browser.get(f"/portal/invite/{token}")
        page = self.browser.post(f"/portal/invite/{token}", {"password": "pw-alice"})
        self.assertEqual(page.status, 401)
        self.assertSignedOut()
        self.assertEqual(self.db.invite_user(token_digest(token), now=T0), "bob")

    def test_an_invite_for_a_user_who_has_a_factor_is_refused(self):
        token = self.invite("alice")
        page = self.browser.get(f"/portal/invite/{token}")
        self.assertEqual(page.status, 409)
        self.assertIn("You can sign in already", page.text)

    def test_the_invite_step_up_lasts_five_minutes_and_cannot_be_renewed_without_a_factor(self):
        token = self.invite("bob")
        self.browser.get(f"/portal/invite/{token}")
        self.browser.post(f"/portal/invite/{token}", {"password": "pw-bob"})
        self.clock.advance(STEP_UP_SECONDS + 1)
        self.assertEqual(self.browser.post("/portal/totp").location, "/portal/confirm")
        page = self.browser.get("/portal/confirm")
        self.assertEqual(page.status, 409)
        self.assertIn("Ask your administrator for an invite link.", page.text)


class ActionTests(PortalCase):

    def setUp(self):
        super().setUp()
        self.browser.sign_in()

    def test_a_new_authenticator_app_is_inactive_until_its_first_code(self):
        page = self.browser.post("/portal/totp")
        self.assertEqual(page.location, "/portal/totp")
        [old, new] = self.db.list_tokens("alice")
        self.assertFalse(new.active)
        page = self.browser.get("/portal/totp")
        self.assertIn('src="data:image/svg+xml', page.body)
        secret = re.search(r'<code id="secret">([A-Z2-7 ]+)</code>', page.body).group(1)
        self.assertEqual(oath.parse_base32_secret(secret), new.secret)
        page = self.browser.post("/portal/totp/confirm", {"code": "000000"})
        self.assertEqual(page.status, 400)
        self.assertFalse(self.db.list_tokens("alice")[1].active)
        code = totp_code(T0, new.secret)
        page = self.browser.post("/portal/totp/confirm", {"code": code})
        self.assertEqual(page.location, "/portal/")
        self.assertTrue(self.db.list_tokens("alice")[1].active)
        self.assertIn("Your authenticator app is set up.", self.browser.followed.text)
        # The replay guard: the code that confirmed the app signs nobody in.
        decision = self.successResultOf(self.auth.authenticate(AuthRequest(
            client_name="vpn", username="alice", password=f"pw-alice,{code}")))
        self.assertEqual(decision.reason, Reason.CODE_REUSED)
        decision = self.successResultOf(self.auth.authenticate(AuthRequest(
            client_name="vpn", username="alice",
            password=f"pw-alice,{totp_code(T0, new.secret, 1)}")))
        self.assertEqual(decision.outcome, Outcome.ACCEPT)
        self.assertEqual(self.audit()[1:], [
            ("change", "totp", "token_added"), ("refused", "totp", "token_code_wrong"),
            ("change", "totp", "token_activated")])

    def test_starting_again_replaces_the_unconfirmed_token(self):
        self.browser.post("/portal/totp")
        self.browser.post("/portal/totp")
        self.assertEqual([t.active for t in self.db.list_tokens("alice")], [True, False])

    def test_enrolling_this_browser_sends_it_to_a_one_time_enrollment_link(self):
        page = self.browser.post("/portal/push")
        self.assertEqual(page.status, 303)
        token = page.location.removeprefix("/v1/enroll/")
        self.assertNotEqual(token, page.location)
        self.assertEqual(self.db.enrollment_user(token_digest(token), now=T0), "alice")
        self.assertEqual(self.audit()[-1], ("change", "push", "enrollment_link"))

    def test_devices_and_tokens_are_listed_and_removed(self):
        page = self.signed_in()
        self.assertIn("APP-1", page.text)
        self.assertIn("Phone app", page.text)
        self.assertEqual(self.browser.post("/portal/devices/delete",
                                           {"device": "dev-alice"}).location, "/portal/")
        self.assertEqual(self.browser.post("/portal/tokens/delete",
                                           {"serial": "APP-1"}).location, "/portal/")
        self.assertEqual((self.db.list_devices("alice"), self.db.list_tokens("alice")), ([], []))
        self.assertEqual([a[2] for a in self.audit()[1:]], ["device_removed", "token_removed"])

    def test_someone_elses_device_cannot_be_removed(self):
        self.enroll_device("carol")
        page = self.browser.post("/portal/devices/delete", {"device": "dev-carol"})
        self.assertEqual(page.status, 404)
        self.assertEqual(len(self.db.list_devices("carol")), 1)

    def test_a_new_phone_number_is_saved_once_its_texted_code_comes_back(self):
        page = self.browser.post("/portal/phone", {"phone": "+1 650-253-0099"})
        self.assertEqual(page.location, "/portal/phone")
        self.assertEqual(self.gateway.sent[-1][0], NEW_PHONE)
        page = self.browser.get("/portal/phone")
        self.assertIn(f"Code we texted to {NEW_PHONE}", page.text)
        code = self.gateway.last_code()
        # The code is not a sign-in code.
        decision = self.successResultOf(self.auth.authenticate(AuthRequest(
            client_name="vpn", username="alice", password=f"pw-alice,{code}")))
        self.assertEqual(decision.outcome, Outcome.REJECT)
        self.assertEqual(self.browser.post("/portal/phone/confirm", {"code": "000000"}).status,
                         400)
        self.assertEqual(self.db.get_user("alice").phone, ALICE_PHONE)
        page = self.browser.post("/portal/phone/confirm", {"code": code})
        self.assertEqual(page.location, "/portal/")
        self.assertEqual(self.db.get_user("alice").phone, NEW_PHONE)
        self.assertEqual([a[2] for a in self.audit()[1:]],
                         ["phone_code_sent", "phone_code_wrong", "phone_changed"])

    def test_a_code_confirms_only_the_number_it_was_texted_to(self):
        # Two sessions of one user: A asks for a number the user does not
        # hold, B for one they do; B's code typed in A must not save A's number.
        other = Browser(self)
        self.clock.advance(31)
        other.sign_in(code=totp_code(self.clock.seconds()))
        self.assertEqual(self.browser.post("/portal/phone", {"phone": "+16502530077"}).status,
                         303)
        self.assertEqual(other.post("/portal/phone", {"phone": NEW_PHONE}).status, 303)
        code = self.gateway.last_code()
        page = self.browser.post("/portal/phone/confirm", {"code": code})
        self.assertEqual(page.status, 409)
        self.assertIn("A newer code was sent to another number", page.text)
        self.assertEqual(self.db.get_user("alice").phone, ALICE_PHONE)
        page = other.post("/portal/phone/confirm", {"code": code})
        self.assertEqual(page.location, "/portal/")
        self.assertEqual(self.db.get_user("alice").phone, NEW_PHONE)

    def test_five_wrong_codes_for_a_new_number_end_it(self):
        self.browser.post("/portal/phone", {"phone": NEW_PHONE})
        code = self.gateway.last_code()
        for _ in range(5):
            page = self.browser.post("/portal/phone/confirm", {"code": "000000"})
        self.assertIn("Too many wrong codes", page.text)
        self.assertEqual(self.browser.post("/portal/phone/confirm", {"code": code}).status, 409)
        self.assertEqual(self.db.get_user("alice").phone, ALICE_PHONE)

    def test_a_user_blocked_elsewhere_is_signed_out_of_the_portal(self):
        # A fraud report from a phone, or an administrator's block.
        other = Browser(self)
        self.clock.advance(31)
        other.sign_in(code=totp_code(self.clock.seconds()))
        self.db.set_blocked("alice", True)
        page = self.browser.post("/portal/devices/delete", {"device": "dev-alice"})
        self.assertEqual(page.status, 403)
        self.assertEqual([d.id for d in self.db.list_devices("alice")], ["dev-alice"])
        self.assertSignedOut()
        self.assertSignedOut(other)

    def test_a_deleted_user_is_signed_out_of_the_portal(self):
        self.db.delete_user("alice")
        self.assertSignedOut()

    def test_the_portals_own_actions_do_not_push_sign_ins_out_of_the_history(self):
        for _ in range(205):       # more than the rows once read to find 50 sign-ins
            self.browser.post("/portal/default", {"method": ""})
        page = self.browser.get("/portal/history")
        self.assertNotIn("No sign-ins yet", page.text)
        self.assertIn("Your last 1 sign-ins", page.text)

    def test_a_number_that_is_not_one_is_refused_with_a_reason(self):
        page = self.browser.post("/portal/phone", {"phone": "0301234567"})
        self.assertEqual(page.status, 400)
        self.assertIn("country code", page.text)
        self.assertEqual(self.gateway.sent, [])

    def test_the_default_method_is_chosen_among_the_users_allowed_methods(self):
        page = self.signed_in()
        self.assertIn('<option value="totp"', page.body)
        self.assertNotIn('<option value="phone"', page.body)    # not configured
        self.browser.post("/portal/default", {"method": "totp"})
        self.assertEqual(self.db.load_account("alice").default_method, "totp")
        self.assertEqual(self.browser.post("/portal/default", {"method": "phone"}).status, 400)
        self.browser.post("/portal/default", {"method": ""})
        self.assertIsNone(self.db.load_account("alice").default_method)
        self.assertEqual([a for a in self.audit()[1:]],
                         [("change", "totp", "default_method"), ("change", "", "default_method")])

    def test_the_voice_pin_is_4_to_12_digits_typed_twice_and_stored_hashed(self):
        self.assertEqual(self.browser.post("/portal/pin", {"pin": "12", "pin2": "12"}).status,
                         400)
        self.assertEqual(self.browser.post("/portal/pin",
                                           {"pin": "1234", "pin2": "1235"}).status, 400)
        self.assertEqual(self.browser.post("/portal/pin", {"pin": "1234", "pin2": "1234"}).location,
                         "/portal/")
        self.assertTrue(verify_password("1234", self.db.get_pin_hash("alice")))
        self.assertEqual(self.audit()[-1], ("change", "phone", "pin_set"))

    def test_the_methods_setting_limits_what_may_be_added_or_changed(self):
        self.settings = dataclasses.replace(self.settings, methods=("push",))
        self.assertEqual(self.browser.post("/portal/totp").status, 403)
        self.assertEqual(self.browser.post("/portal/tokens/delete", {"serial": "APP-1"}).status,
                         403)
        self.assertEqual(self.browser.post("/portal/pin", {"pin": "1234", "pin2": "1234"}).status,
                         403)
        self.assertEqual(self.browser.get("/portal/phone").status, 403)
        page = self.signed_in()
        self.assertNotIn("Add an authenticator app", page.text)
        self.assertEqual(len(self.db.list_tokens("alice")), 1)

    def test_history_lists_the_last_sign_ins_and_this_wasnt_me_blocks_the_user(self):
        for _ in range(3):
            self.successResultOf(self.auth.authenticate(AuthRequest(
                client_name="vpn", username="alice", password="pw-alice,000000",
                nas_ip="10.0.0.1", calling_station_id="198.51.100.7")))
        page = self.browser.get("/portal/history")
        self.assertIn("198.51.100.7", page.text)
        self.assertIn("10.0.0.1", page.text)
        ids = re.findall(r'name="id" value="(\d+)"', page.body)
        self.assertEqual(len(ids), 4)               # three refusals, the portal sign-in
        page = self.browser.post("/portal/fraud", {"id": ids[0]})
        self.assertIn("Was this sign-in not you?", page.text)
        self.assertFalse(self.db.get_user("alice").blocked)
        page = self.browser.post("/portal/fraud", {"id": ids[0], "confirm": "yes"})
        self.assertIn("your account is now blocked", page.text)
        self.assertTrue(self.db.get_user("alice").blocked)
        self.assertEqual(len(self.alerts.sent), 1)
        self.assertIn(("block", "portal", "fraud_reported"), self.audit(client="vpn"))
        self.assertEqual(self.audit()[-1], ("block", "totp", "fraud_reported"))
        self.assertSignedOut()

    def test_another_users_sign_in_cannot_be_reported(self):
        self.successResultOf(self.auth.authenticate(AuthRequest(
            client_name="vpn", username="carol", password="pw-carol,000000")))
        [row] = self.db.recent_audit(user="carol")
        page = self.browser.post("/portal/fraud", {"id": str(row.id), "confirm": "yes"})
        self.assertEqual(page.status, 404)
        self.assertFalse(self.db.get_user("carol").blocked)


class NoSmsTests(PortalCase):
    with_sms = False

    def test_the_phone_page_says_that_text_messages_are_not_set_up(self):
        self.browser.sign_in()
        page = self.browser.get("/portal/phone")
        self.assertIn("Text messages are not set up on this server", page.text)
        self.assertNotIn('action="/portal/phone"', page.body)
        self.assertEqual(self.browser.post("/portal/phone", {"phone": NEW_PHONE}).status, 409)
