"""HTTP: the listener, routing and request validation for the device API,
provider callbacks and health checks (thin adapters over the core)."""

from mfaserver.web.server import (Form, Response, WebApp, WebRequest, WebSettings, listen,
                                  make_site)
from mfaserver.web.validation import BadRequest, HttpError

__all__ = ["BadRequest", "Form", "HttpError", "Response", "WebApp", "WebRequest",
           "WebSettings", "listen", "make_site"]
