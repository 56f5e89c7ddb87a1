"""HTML pages: jinja2 templates, always autoescaped, and the assets they share.

Every page is rendered from a template in ``mfaserver/web/templates`` (never
an HTML string built by hand), with `render`; what a template shows is
escaped unless it says otherwise. Pages link only to this server's own
assets (``/assets/``): the Content-Security-Policy (`server.PAGE_HEADERS`)
allows nothing else, and no inline script or style.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from mfaserver.web.server import Response, WebApp, static_files

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
ASSETS = HERE / "static" / "assets"

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,                    # every template, whatever its name
    undefined=jinja2.StrictUndefined,   # a missing value is a bug, not an empty string
    trim_blocks=True, lstrip_blocks=True,
)

# What a person reads for an error status; the detail follows, if any.
_TITLES = {
    400: "This request could not be understood.",
    403: "This is not allowed.",
    404: "This page does not exist.",
    405: "This page cannot be used that way.",
    408: "This took too long.",
    409: "This was done already.",
    410: "This link has expired or was used already.",
    413: "This is too large.",
    415: "This request could not be understood.",
    429: "Too many attempts. Wait a while, then try again.",
    500: "Something went wrong on the server. Try again later.",
}


def render(template: str, *, status: int = 200, headers: tuple = (), **context) -> Response:
    """The page ``template`` filled with ``context``, as a Response."""
    body = _ENV.get_template(template).render(**context).encode("utf-8")
    return Response(body, "text/html; charset=utf-8", status, headers)


def error_page(status: int, detail: str = "") -> Response:
    """A page saying what went wrong, in words; never a traceback."""
    title = _TITLES.get(status, "Something went wrong.")
    return render("error.html", status=status, code=status, title=title, detail=detail)


def add_asset_routes(app: WebApp) -> None:
    """Serve the shared assets (style sheet, icons) under ``/assets/``."""
    app.route("GET", "/assets/<path:name>", static_files(ASSETS))
