"""The web authenticator's routes (mfaserver/web/app.py), in memory: StubTreq over the
app's resource, a real store on the caller's thread, a Clock.

What runs in the browser is tested in tests/integration/test_webapp_e2e.py;
here: what the server serves, with which types and headers, and what it says
about an enrollment link.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.factors import push_protocol as proto
from mfaserver.factors.push import PushTransactions
from mfaserver.store import Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import run_now
from mfaserver.web import app as webapp
from mfaserver.web import pages
from mfaserver.web.context import WebContext
from mfaserver.web.devices import DeviceApi
from mfaserver.web.server import CONTENT_SECURITY_POLICY, WebApp

NOW = 1_700_000_000
BASE = "https://mfa.example.com"
VAPID = "BOrB0" + "A" * 82
MAX_ASSET_BYTES = 150 * 1024
HTML = "text/html; charset=utf-8"


class AppRoutesTests(SynchronousTestCase):
    def setUp(self):
        tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, tmp, True)
        self.db = Store.open(tmp / "db.sqlite3", tmp / "seed.key")
        self.addCleanup(self.db.close)
        self.db.add_user("alice", password_hash=None, phone=None, now=NOW)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.vapid: str | None = None
        store = ThreadedStore(self.db, run_now)
        push = PushTransactions(self.clock)
        context = WebContext(
            clock=self.clock, store=store, authenticator=None, push=push,
            hash_password=None, public_url=BASE, vapid_public_key=lambda: self.vapid,
            portal_settings=lambda: None, enrollment_minutes=lambda: 10)
        app = WebApp(self.clock)
        pages.add_asset_routes(app)
        webapp.add_app_routes(app, context)
        # The device API shares the enrollment URL (POST) with the page (GET).
        DeviceApi(store, push, self.clock, report_fraud=lambda *a: defer.succeed(None),
                  audit=lambda entry: defer.succeed(None)).add_routes(app)
        self.http = StubTreq(app.resource())

    def get(self, path: str, accept: str = "text/html,application/xhtml+xml,*/*;q=0.8"):
        response = self.successResultOf(self.http.get(
            BASE + path, headers={"Accept": [accept]}, allow_redirects=False))
        self.http.flush()
        return response, self.successResultOf(response.content())

    def header(self, response, name: str) -> list[str] | None:
        return response.headers.getRawHeaders(name)

    def assertPage(self, response, body: bytes, status: int = 200) -> str:
        """A page with every security header, no inline script or style; its text."""
        self.assertEqual(response.code, status)
        self.assertEqual(self.header(response, "content-type"), [HTML])
        self.assertEqual(self.header(response, "content-security-policy"),
                         [CONTENT_SECURITY_POLICY])
        self.assertEqual(self.header(response, "x-frame-options"), ["DENY"])
        self.assertEqual(self.header(response, "referrer-policy"), ["no-referrer"])
        self.assertEqual(self.header(response, "x-content-type-options"), ["nosniff"])
        self.assertEqual(self.header(response, "cache-control"), ["no-store"])
        text = body.decode("utf-8")
        for script in re.findall(r"<script\b[^>]*>", text):
            self.assertRegex(script, r'src="/app/[a-z]+\.js"')
        self.assertNotIn("<style", text)
        self.assertNotRegex(text, r"\s(style|on[a-z]+)=")
        self.assertNotRegex(text, r"(src|href)=\"(https?:)?//")     # nothing from elsewhere
        return text

    def new_link(self, lifetime: float = 600) -> str:
        token = proto.new_enrollment_token()
        self.db.add_enrollment("alice", proto.token_digest(token), NOW + lifetime, now=NOW)
        return token

    # --- the app shell ---

    def test_the_root_and_app_without_a_slash_redirect_to_the_app(self):
        for path in ("/", "/app"):
            response, body = self.get(path)
            self.assertEqual((response.code, self.header(response, "location")),
                             (302, ["/app/"]))

    def test_the_app_is_a_page_that_loads_its_module_manifest_and_styles(self):
        response, body = self.get("/app/")
        text = self.assertPage(response, body)
        self.assertIn('<script type="module" src="/app/app.js"></script>', text)
        self.assertIn('<link rel="manifest" href="/app/manifest.webmanifest">', text)
        self.assertIn('href="/app/app.css"', text)
        self.assertIn('<div id="result" class="result" role="status" aria-live="polite">', text)
        self.assertIn('<label for="add-link">Enrollment link</label>', text)

    def test_assets_are_served_with_their_types_and_cached_for_an_hour(self):
        for name, content_type in (
                ("app.js", "text/javascript; charset=utf-8"),
                ("protocol.js", "text/javascript; charset=utf-8"),
                ("app.css", "text/css; charset=utf-8"),
                ("manifest.webmanifest", "application/manifest+json"),
                ("icon-192.png", "image/png")):
            response, body = self.get(f"/app/{name}", accept="*/*")
            self.assertEqual(response.code, 200, name)
            self.assertEqual(self.header(response, "content-type"), [content_type])
            self.assertEqual(self.header(response, "cache-control"), ["max-age=3600"])
            self.assertEqual(body, (webapp.STATIC / name).read_bytes())

    def test_an_unknown_asset_is_a_404_page(self):
        response, body = self.get("/app/nothing.js", accept="*/*")
        self.assertIn("This page does not exist.", self.assertPage(response, body, 404))

    def test_the_manifest_makes_it_installable_with_its_icons(self):
        response, body = self.get("/app/manifest.webmanifest", accept="*/*")
        manifest = json.loads(body)
        self.assertEqual((manifest["start_url"], manifest["scope"], manifest["display"]),
                         ("/app/", "/app/", "standalone"))
        sizes = {}
        for icon in manifest["icons"]:
            response, png = self.get(icon["src"], accept="image/*")
            self.assertEqual(self.header(response, "content-type"), ["image/png"])
            self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
            width, height = struct.unpack(">II", png[16:24])
            self.assertEqual(icon["sizes"], f"{width}x{height}")
            sizes[icon["purpose"], width] = icon["src"]
        self.assertTrue({("any", 192), ("any", 512), ("maskable", 512)} <= set(sizes))

    def test_the_service_worker_keeps_only_the_shell_under_its_version(self):
        response, body = self.get("/app/sw.js", accept="*/*")
        self.assertEqual(self.header(response, "content-type"),
                         ["text/javascript; charset=utf-8"])
        self.assertEqual(self.header(response, "cache-control"), ["no-cache"])
        source = body.decode()
        self.assertNotIn("__SHELL_VERSION__", source)
        self.assertRegex(source, r"const VERSION = '[0-9a-f]{16}';")
        shell = re.findall(r"'(/[a-z/.0-9-]*)'", source.split("const SHELL = [")[1]
                           .split("];")[0])
        self.assertIn("/app/", shell)
        for path in shell:
            self.assertEqual(self.get(path, accept="*/*")[0].code, 200, path)
            self.assertFalse(path.startswith("/v1/") or path.endswith("settings.json"), path)
        self.assertIn("showNotification('A sign-in needs you'", source)

    def test_the_worker_version_changes_with_any_asset(self):
        files = webapp.static_files(webapp.STATIC).files
        shell = pages.render("app/index.html")
        before = webapp.service_worker(files, shell).body
        self.assertEqual(webapp.service_worker(files, shell).body, before)
        changed = dict(files, **{"app.js": webapp.Response(b"changed", "text/javascript")})
        self.assertNotEqual(webapp.service_worker(changed, shell).body, before)
        other_shell = pages.render("app/enroll.html", user="x")
        self.assertNotEqual(webapp.service_worker(files, other_shell).body, before)

    def test_settings_say_whether_wake_ups_go_by_web_push(self):
        for key in (None, VAPID):
            self.vapid = key
            response, body = self.get("/app/settings.json", accept="*/*")
            self.assertEqual(self.header(response, "content-type"), ["application/json"])
            self.assertEqual(self.header(response, "cache-control"), ["no-store"])
            self.assertEqual(json.loads(body), {"vapid_public_key": key})

    def test_the_assets_weigh_at_most_150_kib(self):
        files = [p for p in webapp.STATIC.rglob("*") if p.is_file()]
        files += [p for p in (pages.TEMPLATES / "app").rglob("*") if p.is_file()]
        files.append(pages.ASSETS / "style.css")
        total = sum(p.stat().st_size for p in files)
        self.assertLessEqual(total, MAX_ASSET_BYTES, f"{total} bytes")

    # --- the enrollment link opened in a browser ---

    def test_a_live_link_is_a_page_that_enrolls_and_does_not_use_the_link_up(self):
        token = self.new_link()
        response, body = self.get(f"/v1/enroll/{token}")
        text = self.assertPage(response, body)
        self.assertIn('<script type="module" src="/app/enroll.js"></script>', text)
        self.assertIn("authenticator of <strong id=\"user\">alice</strong>", text)
        self.assertIn('<button type="button" id="enroll">Enroll this phone</button>', text)
        self.assertNotIn(token, text)
        # Looking did not use it: the app's POST to the same URL enrolls.
        key = proto.generate_device_key()
        public_key = proto.public_key_text(key)
        signature = proto.sign(key, proto.enroll_message(proto.token_digest(token),
                                                         public_key, NOW))
        response = self.successResultOf(self.http.post(
            f"{BASE}/v1/enroll/{token}", json={"public_key": public_key, "timestamp": NOW,
                                               "signature": signature}))
        self.http.flush()
        self.assertEqual(response.code, 201)
        self.assertEqual(self.successResultOf(response.json())["user"], "alice")

    def test_a_used_link_says_so(self):
        token = self.new_link()
        self.db.enroll_device(proto.token_digest(token), _device(), now=NOW)
        response, body = self.get(f"/v1/enroll/{token}")
        text = self.assertPage(response, body, 410)
        self.assertIn("<h1>This enrollment link cannot be used</h1>", text)
        self.assertIn("It has expired or was used already", text)
        self.assertIn("Ask your administrator for a new link.", text)

    def test_an_expired_link_says_so(self):
        token = self.new_link(lifetime=600)
        self.clock.advance(600)
        response, body = self.get(f"/v1/enroll/{token}")
        self.assertIn("It has expired or was used already", self.assertPage(response, body, 410))

    def test_an_unknown_link_says_so(self):
        response, body = self.get(f"/v1/enroll/{proto.new_enrollment_token()}")
        text = self.assertPage(response, body, 404)
        self.assertIn("The server does not know it.", text)

    def test_a_get_of_the_link_that_does_not_want_a_page_is_a_json_error(self):
        token = self.new_link()
        response, body = self.get(f"/v1/enroll/{token}", accept="application/json")
        self.assertEqual(response.code, 406)
        self.assertEqual(json.loads(body)["error"], "not_acceptable")


def _device():
    from mfaserver.auth.model import Device
    return Device(id=proto.new_device_id(), user="", public_key=proto.public_key_text(
        proto.generate_device_key()), notify_type=None, notify_url=None)
