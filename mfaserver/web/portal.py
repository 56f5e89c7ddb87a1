"""The self-service portal at /portal/ (served when the config has a [portal] section).

(Being written: issue 10. `PortalSettings` is what config.py builds from
[portal]; `add_portal_routes` is what service.py calls.)
"""

from __future__ import annotations

from dataclasses import dataclass

from mfaserver.web.context import WebContext
from mfaserver.web.server import WebApp


@dataclass(frozen=True)
class PortalSettings:
    """[portal]: sessions, invites, and which factors users may enroll."""

    session_idle_minutes: float = 10.0
    session_max_hours: float = 8.0
    invite_hours: float = 24.0
    methods: tuple[str, ...] = ("push", "totp", "sms", "phone")


def add_portal_routes(app: WebApp, context: WebContext) -> None:
    """Route /portal/."""
