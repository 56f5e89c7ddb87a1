"""The contract of the `Directory` seam: what the core relies on from every directory.

Mixins of test methods, run over the fake and the real directories:
tests/test_directory_contract.py (`MemoryDirectory`, `LocalDirectory`) and
tests/integration/test_directory_contract.py (`LdapDirectory` on slapd,
`RadiusDirectory` against FreeRADIUS). A suite subclasses `DirectoryContract`
and the mixins its directory fulfils, names its users, and provides
`directory` (and `unavailable_directory`) and `run`.

Each test is a coroutine (`contract_test`) that awaits the logins; `run`
takes it from there. In memory, every Deferred has fired by the time
`authenticate` returns, so `run` drives the coroutine to its end at once; on
the real reactor, `run` hands pytest-twisted a Deferred to wait for.

What the core relies on (`mfaserver.auth.pipeline`): `authenticate` returns
a Deferred and never raises; it fires with a `Principal` whose username is
the canonical name (the store is keyed by it) and whose groups are the
lower-cased DNs of the configured groups (the reply rules match them); it
fails with `InvalidCredentials` (final), `UnknownUser` (a chain asks the next
directory) or `DirectoryUnavailable` (fail closed); an empty password is
never accepted.
"""

from __future__ import annotations

import functools
from typing import Any, Coroutine

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mfaserver.auth.interfaces import (
    Directory,
    DirectoryUnavailable,
    InvalidCredentials,
    UnknownUser,
)
from mfaserver.auth.model import Principal, Reason


def contract_test(test):
    """Make the coroutine ``test`` a test method: it returns what `run` makes of it."""
    @functools.wraps(test)
    def method(self):
        return self.run(test(self))

    return method


class DirectoryContract:
    """What every `Directory` does, with `user` known (password `password`), `unknown` not."""

    user = "alice"
    password = "alice-password"
    unknown = "bob"
    # What an unknown user fails with. A directory that cannot tell an unknown
    # user from a wrong password says InvalidCredentials (final: a chain does
    # not ask the next directory, so such a directory belongs last in one).
    unknown_user_error: type[Exception] = UnknownUser

    def directory(self) -> Directory:
        """A directory that knows `user` with `password` and does not know `unknown`."""
        raise NotImplementedError

    def run(self, test: Coroutine) -> Deferred | None:
        """Run a contract test's coroutine (see the module docstring)."""
        raise NotImplementedError

    async def login(self, name: str, password: str, directory: Directory | None = None) -> Any:
        """What the login fires with: a `Principal`, or the `Failure`."""
        d = (directory or self.directory()).authenticate(name, password)
        assert isinstance(d, Deferred), d
        [outcome] = await d.addBoth(lambda result: [result])
        return outcome

    async def refusal(self, name: str, password: str, *kinds: type[Exception],
                      directory: Directory | None = None) -> Exception:
        """The exception the login fails with; the test fails unless it is one of ``kinds``."""
        outcome = await self.login(name, password, directory)
        assert isinstance(outcome, Failure) and outcome.check(*kinds), (name, outcome)
        return outcome.value

    @contract_test
    async def test_right_password_fires_with_a_principal_of_the_canonical_name(self):
        principal = await self.login(self.user, self.password)
        assert isinstance(principal, Principal)
        assert principal.username == self.user

    @contract_test
    async def test_another_spelling_of_the_name_never_comes_back_as_typed(self):
        # The store is keyed by Principal.username: a spelling that a directory
        # accepts must come back canonical, or one user would have two accounts.
        for typed in (self.user.upper(), self.user.capitalize(), f" {self.user}",
                      f"{self.user} "):
            outcome = await self.login(typed, self.password)
            if isinstance(outcome, Principal):
                assert outcome.username == self.user, typed
            else:
                assert outcome.check(UnknownUser, InvalidCredentials), (typed, outcome)

    @contract_test
    async def test_wrong_password_is_invalid_credentials(self):
        e = await self.refusal(self.user, "wrong-" + self.password, InvalidCredentials)
        assert e.reason is Reason.BAD_PASSWORD

    @contract_test
    async def test_unknown_user_is_unknown_user(self):
        await self.refusal(self.unknown, self.password, self.unknown_user_error)

    @contract_test
    async def test_empty_password_is_never_accepted(self):
        for name in (self.user, self.unknown):
            for password in ("", " "):
                await self.refusal(name, password, InvalidCredentials, UnknownUser)

    @contract_test
    async def test_authenticate_never_raises_synchronously(self):
        # Odd input is refused through the Deferred like any other login.
        for name, password in [("", self.password), ("\x00", self.password),
                               ("a" * 300, self.password), ("*", "*"),
                               ("\ufffd", self.password), (self.user, "\x00"),
                               (self.user, "p" * 300), (self.user, "\u200b")]:
            await self.refusal(name, password, InvalidCredentials, UnknownUser)


class UnavailableContract:
    """A directory whose server is down fails closed (mix into a `DirectoryContract`)."""

    def unavailable_directory(self) -> Directory:
        """The same directory, but its server is down."""
        raise NotImplementedError

    @contract_test
    async def test_a_down_server_is_directory_unavailable(self):
        down = self.unavailable_directory()
        for name in (self.user, self.unknown):
            await self.refusal(name, self.password, DirectoryUnavailable, directory=down)


class PhoneContract:
    """A directory that keeps phone numbers reports the user's (`phone`)."""

    phone = "+14155550123"

    @contract_test
    async def test_the_principal_carries_the_users_phone(self):
        principal = await self.login(self.user, self.password)
        assert principal.phone == self.phone


class GroupContract:
    """A directory with groups reports the configured ones the user is in (`group`).

    The core matches them against ``[[radius.reply]] group``, lower-cased.
    """

    group = "cn=vpn-users,ou=groups,dc=example,dc=org"

    @contract_test
    async def test_the_principal_carries_the_users_configured_groups_lower_cased(self):
        principal = await self.login(self.user, self.password)
        assert principal.groups == {self.group.lower()}
