"""What every portal request has: the `Visit`, refusals as pages, redirects, the
browser's address. Shared by `mfaserver.web.portal` and its sign-in pages."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from mfaserver.web.portal_sessions import Session
from mfaserver.web.server import Response, WebRequest

CLIENT = "portal"               # the client name of portal sign-ins and actions


@dataclass
class Visit:
    """One request to the portal: the [portal] settings now, the browser's
    session (None: none, or it ended), the form fields of a POST. A handler
    that replaces or ends the session assigns ``session``; the cookie follows."""

    request: WebRequest
    settings: object            # mfaserver.web.portal.PortalSettings
    session: Session | None
    fields: dict[str, str]

    def field(self, name: str) -> str:
        return self.fields.get(name, "")

    @property
    def user(self) -> str:
        """The signed-in user (handlers that need one are only called with one)."""
        assert self.session is not None and self.session.user is not None
        return self.session.user


class Refused(Exception):
    """An action refused with a page saying why (``status``); nothing was changed.
    ``link`` and ``link_text``: where the user may go on from there."""

    def __init__(self, status: int, title: str, text: str, link: str = "/portal/",
                 link_text: str = "Back to your account"):
        super().__init__(title)
        self.status, self.title, self.text = status, title, text
        self.link, self.link_text = link, link_text


def refused_to_sign_in(status: int, title: str, text: str) -> Refused:
    """A refusal whose way on is the sign-in page."""
    return Refused(status, title, text, "/portal/signin", "Sign in")


def redirect(location: str) -> Response:
    """303 See Other: after a POST, the browser GETs ``location``."""
    return Response(b"", "text/html; charset=utf-8", 303, (("Location", location),))


def utc(timestamp: float) -> str:
    """A time as people read it in the portal: minutes, UTC."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def client_address(request: WebRequest) -> str:
    """The browser's IP address, for the audit log and the core's calling station."""
    return request.client_address
