"""The web authenticator: an installable web app at /app/ that enrolls this browser as a
push device (from the enrollment link's QR code) and approves sign-ins.

The server side is small: it serves the app shell (a page, plain JavaScript
modules, a style sheet, icons, a manifest and a service worker, all from
``static/app``), answers a browser's GET of an enrollment link with a page
that enrolls it (or says, in words, why the link cannot be used), and tells
the page the Web Push key. Everything else, keys and signatures included,
happens in the browser, which speaks the device protocol of
docs/device-api.rst to ``web/devices.py`` like any app.

Routes:

``GET /`` and ``GET /app``
    Redirect to ``/app/``.
``GET /app/``
    The app shell: sign-ins waiting, the accounts of this browser.
``GET /app/<file>``
    The assets; ``sw.js`` (scope ``/app/``) carries a version made from
    the other assets, so that changing any of them updates the browser's copy.
``GET /app/settings.json``
    ``{"vapid_public_key": <base64url> or null}``.
``GET /v1/enroll/<token>`` with ``Accept: text/html``
    The enrollment page (apps POST to the same URL, see ``web/devices.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mfaserver.factors import push_protocol
from mfaserver.store import EnrollmentExpired, Store, UnknownEnrollment
from mfaserver.web import pages
from mfaserver.web.context import WebContext
from mfaserver.web.server import Response, WebApp, WebRequest, static_files
from mfaserver.web.validation import HttpError

STATIC = Path(__file__).parent / "static" / "app"
HOME = "/app/"
# In sw.js, replaced by the version of the shell it serves.
_VERSION_MARK = b"__SHELL_VERSION__"


def add_app_routes(app: WebApp, context: WebContext) -> None:
    """Route /app/ and the browser's GET of an enrollment link."""
    assets = static_files(STATIC)
    shell = pages.render("app/index.html")
    worker = service_worker(assets.files, shell)

    app.route("GET", "/", lambda request: redirect(HOME))
    app.route("GET", "/app", lambda request: redirect(HOME))
    app.route("GET", HOME, lambda request: shell)
    app.route("GET", "/app/sw.js", lambda request: worker)
    app.route("GET", "/app/<path:name>", assets)
    app.route("GET", "/app/settings.json",
              lambda request: {"vapid_public_key": context.vapid_public_key()})

    async def enrollment_page(request: WebRequest) -> Response:
        if "text/html" not in request.headers.get("accept", ""):
            raise HttpError(406, "not_acceptable",
                            "open this link in a browser; an app POSTs to it")
        digest = push_protocol.token_digest(request.params["token"])
        try:
            user = await context.store.read(Store.enrollment_user, digest,
                                            now=context.clock.seconds())
        except UnknownEnrollment:
            return pages.render("app/link_refused.html", status=404, known=False)
        except EnrollmentExpired:
            return pages.render("app/link_refused.html", status=410, known=True)
        return pages.render("app/enroll.html", user=user)

    app.route("GET", "/v1/enroll/<token>", enrollment_page)


def redirect(location: str) -> Response:
    """A 302 to ``location`` on this server."""
    return Response(b"", "text/plain; charset=utf-8", 302, (("Location", location),))


def service_worker(files: dict[str, Response], shell: Response) -> Response:
    """sw.js with the version of the shell written in: a digest of every asset and
    the page, so any change to them makes a new worker, which fetches the new shell."""
    digest = hashlib.sha256(shell.body)
    for name in sorted(files):
        if name != "sw.js":
            digest.update(name.encode() + b"\0" + files[name].body)
    for path in sorted(pages.ASSETS.rglob("*")):
        if path.is_file():
            digest.update(path.read_bytes())
    source = files["sw.js"]
    body = source.body.replace(_VERSION_MARK, digest.hexdigest()[:16].encode())
    # The browser looks for a new worker on every visit; never serve it stale.
    return Response(body, source.content_type, headers=(("Cache-Control", "no-cache"),))
