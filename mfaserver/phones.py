"""Phone numbers: the one E.164 rule, shared by the store, the gateways and the CLI."""

from __future__ import annotations

import re

# [0-9], not \d: \d also matches other scripts' digits, which no provider accepts.
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def is_e164(number: str) -> bool:
    """True if ``number`` is an E.164 number: '+', a country code, 7 to 15 digits in all."""
    return isinstance(number, str) and _E164.fullmatch(number) is not None
