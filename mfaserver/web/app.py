"""The web authenticator: an installable web app at /app/ that enrolls this browser as a
push device (from the enrollment link's QR code) and approves sign-ins.

(Being written: issue 10. `add_app_routes` is what service.py calls.)
"""

from __future__ import annotations

from mfaserver.web.context import WebContext
from mfaserver.web.server import WebApp


def add_app_routes(app: WebApp, context: WebContext) -> None:
    """Route /app/ and the browser's GET of an enrollment link."""
