"""Phone numbers: the one E.164 rule and the one parser, shared by the store, the
gateways, the directory sync and the CLI."""

from __future__ import annotations

import re

import phonenumbers

# [0-9], not \d: \d also matches other scripts' digits, which no provider accepts.
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def is_e164(number: str) -> bool:
    """True if ``number`` is an E.164 number: '+', a country code, 7 to 15 digits in all."""
    return isinstance(number, str) and _E164.fullmatch(number) is not None


class InvalidPhoneNumber(ValueError):
    """A phone number that cannot be used; ``reason`` says why, ``no_country`` whether
    it lacked a country code (a default region would help)."""

    def __init__(self, raw: str, reason: str, *, no_country: bool = False):
        super().__init__(f"{raw!r}: {reason}")
        self.raw = raw
        self.reason = reason
        self.no_country = no_country


_PARSE_REASONS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
        "no valid country code (write it as +CC...)",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
    phonenumbers.NumberParseException.TOO_LONG: "too long",
}


def parse_phone(raw: str, region: str | None = None) -> str:
    """``raw`` in E.164 form, or `InvalidPhoneNumber`.

    Without ``region`` (a country such as "DE") only international numbers
    ("+CC ...") are accepted: guessing the country of "030 1234567" could
    text a stranger.
    """
    try:
        parsed = phonenumbers.parse(raw.strip(), region.upper() if region else None)
    except phonenumbers.NumberParseException as e:
        raise InvalidPhoneNumber(
            raw, _PARSE_REASONS.get(e.error_type, "not a phone number"),
            no_country=e.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE,
        ) from None
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidPhoneNumber(raw, "not a valid number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
