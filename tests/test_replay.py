"""The RFC 5080 retransmission cache and the challenge registry, on an injected clock."""

from twisted.internet import task

from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.radius.replay import IN_PROGRESS, ReplyCache

KEY = ("192.0.2.1", 40000, 7)
AUTH = b"a" * 16


def test_copy_of_a_request_being_decided_is_dropped():
    cache = ReplyCache(task.Clock())
    assert cache.lookup(KEY, AUTH) is None
    cache.begin(KEY, AUTH)
    assert cache.lookup(KEY, AUTH) is IN_PROGRESS


def test_copy_of_a_decided_request_gets_the_cached_bytes_until_the_ttl():
    clock = task.Clock()
    cache = ReplyCache(clock, ttl=30)
    cache.begin(KEY, AUTH)
    cache.complete(KEY, AUTH, b"reply")
    clock.advance(29.9)
    assert cache.lookup(KEY, AUTH) == b"reply"
    clock.advance(0.2)
    assert cache.lookup(KEY, AUTH) is None


def test_same_identifier_with_a_new_authenticator_is_a_new_request_and_purges_the_old():
    cache = ReplyCache(task.Clock())
    cache.begin(KEY, AUTH)
    cache.complete(KEY, AUTH, b"reply")
    assert cache.lookup(KEY, b"b" * 16) is None
    assert cache.lookup(KEY, AUTH) is None
    cache.begin(KEY, AUTH)
    assert cache.lookup(KEY, b"c" * 16) is None
    assert cache.lookup(KEY, AUTH) is None


def test_other_port_or_identifier_is_a_different_request():
    cache = ReplyCache(task.Clock())
    cache.begin(KEY, AUTH)
    assert cache.lookup(("192.0.2.1", 40001, 7), AUTH) is None
    assert cache.lookup(("192.0.2.1", 40000, 8), AUTH) is None


def test_abandoned_request_can_be_decided_again():
    cache = ReplyCache(task.Clock())
    cache.begin(KEY, AUTH)
    cache.abandon(KEY, AUTH)
    assert cache.lookup(KEY, AUTH) is None


def test_cache_is_bounded_and_expires_old_entries():
    clock = task.Clock()
    cache = ReplyCache(clock, ttl=30, max_entries=100)
    for i in range(250):
        key = ("192.0.2.1", 1000 + i, 1)
        cache.begin(key, AUTH)
        cache.complete(key, AUTH, b"r")
    assert len(cache) == 100
    clock.advance(31)
    cache.begin(KEY, AUTH)
    cache.complete(KEY, AUTH, b"r")
    assert len(cache) == 1


def test_challenge_registry_is_bounded():
    registry = ChallengeRegistry(task.Clock(), ttl=300, max_entries=10)
    states = [registry.issue("vpn", f"user{i}") for i in range(25)]
    assert len(registry) == 10
    assert registry.redeem(states[0], "vpn", "user0") is None
    assert registry.redeem(states[-1], "vpn", "user24") is not None


def test_challenge_states_are_random_and_reveal_nothing():
    registry = ChallengeRegistry(task.Clock())
    a = registry.issue("vpn", "alice")
    b = registry.issue("vpn", "bob")
    assert len(a) >= 16 and a != b and b"alice" not in a
