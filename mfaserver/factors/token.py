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
from mfaserver.auth.model import (Account, CodeCheck, CodeResult, CodeUse, Login, Method,
                                  Reason, Token, TokenKind)
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
        return self._check_from(account, code, 0, None)

    def match(self, account: Account, code: str, now: float) -> CodeUse | None:
        """The use `check` would record first for ``code`` at ``now`` (the first token
        the code matches), or None. Pure: the core calls it on the database thread
        (`mfaserver.auth.interfaces.StoredCodeFactor`)."""
        for token in account.tokens:
            if oath.normalize_code(code, token.digits) is None:
                continue
            if token.kind is TokenKind.TOTP:
                step = oath.match_totp(token, code, now, window=self.totp_window)
                if step is not None:
                    return CodeUse(token.id, TokenKind.TOTP, step,
                                   step - oath.totp_step(now, token.period))
            else:
                counter = oath.match_hotp(token, code, look_ahead=self.hotp_look_ahead)
                if counter is not None:
                    return CodeUse(token.id, TokenKind.HOTP, counter)
        return None

    # Callbacks rather than a coroutine: this is every login's hot path, and a
    # match costs one store write whose answer decides.

    def _check_from(self, account: Account, code: str, first: int,
                    reused_by: Token | None) -> Deferred[CodeCheck]:
        """Try the tokens from index ``first`` on; ``reused_by``: a token whose code
        this was, but used already."""
        now = self._clock.seconds()
        tokens = account.tokens
        for i in range(first, len(tokens)):
            token = tokens[i]
            if oath.normalize_code(code, token.digits) is None:
                continue
            if token.kind is TokenKind.TOTP:
                step = oath.match_totp(token, code, now, window=self.totp_window)
                if step is not None:
                    drift = step - oath.totp_step(now, token.period)
                    used = self._store.use_totp_step(token.id, step, drift)
                    return used.addCallback(self._recorded, account, code, i, token)
                if oath.totp_replayed(token, code, now, window=self.totp_window):
                    reused_by = token
            else:
                counter = oath.match_hotp(token, code, look_ahead=self.hotp_look_ahead)
                if counter is not None:
                    used = self._store.use_hotp_counter(token.id, counter)
                    return used.addCallback(self._recorded, account, code, i, token)
                if oath.hotp_replayed(token, code, look_back=self.hotp_look_ahead):
                    reused_by = token
        if reused_by is not None:
            return succeed(CodeCheck(CodeResult.REPLAYED, reused_by.kind.value))
        return succeed(CodeCheck(CodeResult.WRONG, tokens[0].kind.value))

    def _recorded(self, used: bool, account: Account, code: str, index: int, token: Token):
        if used:
            return CodeCheck(CodeResult.ACCEPTED, token.kind.value)
        # Lost a race with another request using the same code: try the rest.
        return self._check_from(account, code, index + 1, token)
