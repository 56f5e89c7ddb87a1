"""Request validation for the web layer: HTTP errors and a tiny JSON schema checker.

A schema is a plain dict built with the helpers below, for example::

    DEVICE = object(
        required={"name": string(64), "platform": enum("android", "ios")},
        optional={"push_token": string(4096, pattern=r"[A-Za-z0-9:_-]+")},
    )
    check(body, DEVICE)   # raises BadRequest("name", "required") and the like

Only what the device API and the gateway callbacks need is supported: strings,
integers, booleans, enumerations, arrays and objects. Unknown fields are
refused unless ``extra=True``, so a typo in a client is loud, not ignored.
"""

from __future__ import annotations

import re
from typing import Any


class HttpError(Exception):
    """An expected failure that becomes a JSON error response.

    The response is ``{"error": code, "message": message}`` with ``status``;
    ``code`` is a short machine word such as ``"not_found"``.
    """

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class BadRequest(HttpError):
    """A value in the request does not match its schema; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(400, "invalid", f"{field}: {message}" if field else message)
        self.field = field


def string(max_len: int, pattern: str | None = None, min_len: int = 0) -> dict:
    """A string of ``min_len`` to ``max_len`` characters, matching ``pattern`` in full."""
    schema = {"type": "string", "min_len": min_len, "max_len": max_len}
    if pattern is not None:
        schema["pattern"] = re.compile(pattern)
    return schema


def integer(lo: int | None = None, hi: int | None = None) -> dict:
    """An integer (not a boolean, not a float) within ``lo`` and ``hi``, inclusive."""
    return {"type": "integer", "lo": lo, "hi": hi}


def boolean() -> dict:
    """true or false."""
    return {"type": "boolean"}


def enum(*values: Any) -> dict:
    """One of ``values``."""
    return {"type": "enum", "values": values}


def array(items: dict, max_items: int) -> dict:
    """A list of at most ``max_items`` values, each matching ``items``."""
    return {"type": "array", "items": items, "max_items": max_items}


def object(required: dict | None = None, optional: dict | None = None,
           extra: bool = False) -> dict:
    """An object with the ``required`` and ``optional`` fields (name -> schema).

    Other fields are refused unless ``extra`` is true. (The name shadows the
    builtin inside this module only; callers write ``validation.object``.)
    """
    return {"type": "object", "required": dict(required or {}),
            "optional": dict(optional or {}), "extra": extra}


def check(value: Any, schema: dict, path: str = "") -> None:
    """Raise `BadRequest` naming the first field of ``value`` that breaks ``schema``."""
    kind = schema["type"]
    if kind == "string":
        _check_string(value, schema, path)
    elif kind == "integer":
        # bool is a subclass of int in Python, but not a number in JSON.
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(path, "must be an integer")
        if schema["lo"] is not None and value < schema["lo"]:
            raise BadRequest(path, f"must be at least {schema['lo']}")
        if schema["hi"] is not None and value > schema["hi"]:
            raise BadRequest(path, f"must be at most {schema['hi']}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise BadRequest(path, "must be true or false")
    elif kind == "enum":
        # Compare types too, so that true does not pass for 1.
        if not any(type(value) is type(v) and value == v for v in schema["values"]):
            allowed = ", ".join(repr(v) for v in schema["values"])
            raise BadRequest(path, f"must be one of {allowed}")
    elif kind == "array":
        if not isinstance(value, list):
            raise BadRequest(path, "must be an array")
        if len(value) > schema["max_items"]:
            raise BadRequest(path, f"must have at most {schema['max_items']} items")
        for i, item in enumerate(value):
            check(item, schema["items"], f"{path}[{i}]")
    elif kind == "object":
        _check_object(value, schema, path)
    else:
        raise ValueError(f"unknown schema type {kind!r}")


def _check_string(value: Any, schema: dict, path: str) -> None:
    if not isinstance(value, str):
        raise BadRequest(path, "must be a string")
    if len(value) < schema["min_len"]:
        raise BadRequest(path, f"must be at least {schema['min_len']} characters")
    if len(value) > schema["max_len"]:
        raise BadRequest(path, f"must be at most {schema['max_len']} characters")
    pattern = schema.get("pattern")
    if pattern is not None and not pattern.fullmatch(value):
        raise BadRequest(path, "has an invalid format")


def _check_object(value: Any, schema: dict, path: str) -> None:
    if not isinstance(value, dict):
        raise BadRequest(path, "must be an object")
    prefix = f"{path}." if path else ""
    for name, field_schema in schema["required"].items():
        if name not in value:
            raise BadRequest(prefix + name, "required")
        check(value[name], field_schema, prefix + name)
    for name, field_schema in schema["optional"].items():
        if name in value:
            check(value[name], field_schema, prefix + name)
    if not schema["extra"]:
        known = schema["required"].keys() | schema["optional"].keys()
        for name in value:
            if name not in known:
                raise BadRequest(prefix + name, "unexpected field")
