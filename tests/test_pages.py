"""Pages and assets: templates with autoescaping, HTML errors for what a browser shows,
the security headers of every page, static files read once. In memory (StubTreq)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.web import pages
from mfaserver.web.server import CONTENT_SECURITY_POLICY, HttpError, WebApp, static_files


class PageTests(SynchronousTestCase):
    def setUp(self):
        self.app = WebApp(task.Clock())
        pages.add_asset_routes(self.app)
        self.client = StubTreq(self.app.resource())

    def get(self, path: str, **headers):
        response = self.successResultOf(self.client.get(
            "http://mfa.example.com" + path, headers={k: [v] for k, v in headers.items()}))
        return response, self.successResultOf(response.content())

    def test_an_error_under_app_or_portal_is_a_page_with_the_security_headers(self):
        for path in ("/portal/nothing-here", "/app/nothing-here.js"):
            response, body = self.get(path)
            self.assertEqual(response.code, 404)
            self.assertEqual(response.headers.getRawHeaders("content-type"),
                             ["text/html; charset=utf-8"])
            self.assertIn(b"This page does not exist.", body)
            self.assertEqual(response.headers.getRawHeaders("content-security-policy"),
                             [CONTENT_SECURITY_POLICY])
            self.assertNotIn("unsafe-inline", CONTENT_SECURITY_POLICY)
            self.assertEqual(response.headers.getRawHeaders("x-frame-options"), ["DENY"])
            self.assertNotIn(b"<script", body)

    def test_an_api_error_stays_json_and_a_browser_asking_for_html_gets_a_page(self):
        response, body = self.get("/v1/nothing")
        self.assertEqual((response.code, body), (404, b'{"error":"not_found",'
                                                       b'"message":"no such resource"}'))
        response, body = self.get("/v1/nothing", Accept="text/html,*/*")
        self.assertIn(b"<h1>This page does not exist.</h1>", body)

    def test_the_shared_style_sheet_is_served_and_cached_for_an_hour(self):
        response, body = self.get("/assets/style.css")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["text/css; charset=utf-8"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["max-age=3600"])
        self.assertIn(b"--accent", body)

    def test_templates_escape_what_they_show(self):
        page = pages.render("error.html", code=400, title="<b>x</b>",
                            detail="<script>alert(1)</script>")
        self.assertIn(b"&lt;script&gt;alert(1)&lt;/script&gt;", page.body)
        self.assertNotIn(b"<script>", page.body)


class StaticFilesTests(SynchronousTestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        (self.dir / "app.js").write_text("x")
        (self.dir / "sub").mkdir()
        (self.dir / "sub" / "page.html").write_text("<p>hi</p>")
        (self.dir / "secret.key").write_text("never served: not a known type")
        self.serve = static_files(self.dir)

    def fetch(self, name: str):
        from mfaserver.web.server import WebRequest
        return self.serve(WebRequest("GET", "/x", {"name": name}, {}, {}, b"", "http://x/"))

    def test_known_files_are_served_with_their_type(self):
        self.assertEqual(self.fetch("app.js").content_type, "text/javascript; charset=utf-8")
        page = self.fetch("sub/page.html")
        self.assertIn(("Content-Security-Policy", CONTENT_SECURITY_POLICY), page.headers)

    def test_anything_else_is_not_found(self):
        for name in ("secret.key", "../app.js", "sub/../app.js", "/etc/passwd", "", "missing"):
            with self.assertRaises(HttpError) as raised:
                self.fetch(name)
            self.assertEqual(raised.exception.status, 404)
