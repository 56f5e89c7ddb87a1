"""The `Directory` contract (tests/directory_contract.py) over the directories that need no server.

They answer before `authenticate` returns: `MemoryDirectory` by design,
`LocalDirectory` here because its store lookups and hash checks run at once
(`run_now`) instead of on threads. The real `LdapDirectory` and
`RadiusDirectory` run the same contract in
tests/integration/test_directory_contract.py.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from directory_contract import (DirectoryContract, GroupContract, PhoneContract,
                                UnavailableContract)
from mfaserver.auth.interfaces import DirectoryUnavailable, UnknownUser
from mfaserver import passwords
from mfaserver.directory.local import LocalDirectory
from mfaserver.store import Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import MemoryDirectory, run_now

NOW = 1_700_000_000.0
CHEAP_DUMMY_HASH = passwords.hash_password("dummy", log2_n=4)


class AnswersAtOnce:
    """`run` for directories whose Deferred has fired when `authenticate` returns."""

    def run(self, test):
        outcomes = []
        Deferred.fromCoroutine(test).addBoth(outcomes.append)
        assert outcomes, "a login did not fire at once"
        if isinstance(outcomes[0], Failure):
            outcomes[0].raiseException()


class TestMemoryDirectory(AnswersAtOnce, DirectoryContract, UnavailableContract, PhoneContract,
                          GroupContract):
    def directory(self):
        return MemoryDirectory({self.user: self.password}, phones={self.user: self.phone},
                               groups={self.user: [self.group]})

    def unavailable_directory(self):
        directory = self.directory()
        directory.failure = DirectoryUnavailable()
        return directory


class TestLocalDirectory(AnswersAtOnce, DirectoryContract, PhoneContract):
    """Over a real store (its migrations); a cheap scrypt cost keeps it fast.

    No `UnavailableContract`: there is no server. A store that fails makes
    the Deferred fail with the store's own error (the core then rejects with
    internal_error), not with DirectoryUnavailable.
    """

    @pytest.fixture(autouse=True)
    def _store(self, tmp_path, monkeypatch):
        # An unknown user costs a check against a dummy hash as dear as a real
        # one (timing): both are cheap here.
        monkeypatch.setattr(passwords, "dummy_hash", lambda: CHEAP_DUMMY_HASH)
        self.store = Store.open(tmp_path / "db.sqlite3", tmp_path / "seed.key")
        self.store.add_user(self.user, phone=self.phone, now=NOW,
                            password_hash=passwords.hash_password(self.password, log2_n=4))
        yield
        self.store.close()

    def directory(self):
        return LocalDirectory(ThreadedStore(self.store, run_now).lookup_password, run_now)

    def test_a_user_without_a_local_password_is_unknown_here(self):
        # A user synced from LDAP: a chain asks the next directory.
        self.store.add_user("carol", password_hash=None, phone=None, now=NOW)
        self.run(self.refusal("carol", self.password, UnknownUser))
