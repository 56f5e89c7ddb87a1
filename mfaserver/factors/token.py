"""The code from an authenticator app or an OATH hardware token (TOTP and HOTP).

`TokenFactor` is the `CodeFactor` over the maths in `mfaserver.factors.oath`
and the account's tokens: a code is checked against each token of the user,
and an accepted step or counter is recorded in the store atomically with the
check (a code is accepted once, ever). Nothing is sent: the user holds the
code already.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from mfaserver.auth.interfaces import AccountStore
from mfaserver.auth.model import (Account, CodeCheck, CodeResult, Login, Method, Reason,
                                  TokenKind)
from mfaserver.factors import oath

TOTP = Method(
    name="totp", label="a code from your app or token", starts=False,
    unusable=Reason.NOT_ENROLLED,
    unusable_message="No authenticator app or token is set up for your account. "
                     "Contact your administrator.")


class TokenFactor:
    """`CodeFactor` for the user's TOTP and HOTP tokens.

    ``totp_window`` is how many time steps either side of now a TOTP code
    may be from; ``hotp_look_ahead`` how many HOTP presses may have been
    skipped ([mfa] totp_window and hotp_look_ahead).
    """

    method = TOTP

    def __init__(self, store: AccountStore, clock: IReactorTime, *, totp_window: int = 1,
                 hotp_look_ahead: int = 10):
        self._store = store
        self._clock = clock
        self.totp_window = totp_window
        self.hotp_look_ahead = hotp_look_ahead

    def usable(self, account: Account) -> bool:
        return bool(account.tokens)

    def send(self, login: Login) -> Deferred[None]:
        return succeed(None)

    def check(self, account: Account, code: str) -> Deferred[CodeCheck | None]:
        """Fire with ACCEPTED (the use recorded), REPLAYED or WRONG under the token's
        kind ("totp" or "hotp"); None when the account has no token."""
        if not account.tokens:
            return succeed(None)
        return Deferred.fromCoroutine(self._check(account, code))

    async def _check(self, account: Account, code: str) -> CodeCheck:
        now = self._clock.seconds()
        reused_by = None
        for token in account.tokens:
            if oath.normalize_code(code, token.digits) is None:
                continue
            if token.kind is TokenKind.TOTP:
                step = oath.match_totp(token, code, now, window=self.totp_window)
                if step is not None:
                    drift = step - oath.totp_step(now, token.period)
                    if await self._store.use_totp_step(token.id, step, drift):
                        return CodeCheck(CodeResult.ACCEPTED, token.kind.value)
                    reused_by = token  # lost a race with another request using the same code
                elif oath.totp_replayed(token, code, now, window=self.totp_window):
                    reused_by = token
            else:
                counter = oath.match_hotp(token, code, look_ahead=self.hotp_look_ahead)
                if counter is not None:
                    if await self._store.use_hotp_counter(token.id, counter):
                        return CodeCheck(CodeResult.ACCEPTED, token.kind.value)
                    reused_by = token
                elif oath.hotp_replayed(token, code, look_back=self.hotp_look_ahead):
                    reused_by = token
        if reused_by is not None:
            return CodeCheck(CodeResult.REPLAYED, reused_by.kind.value)
        return CodeCheck(CodeResult.WRONG, account.tokens[0].kind.value)
