"""`mfaserver.factors.deadlines.Deadlines`: one timer for many deadlines."""

from twisted.internet.task import Clock

from mfaserver.factors.deadlines import Deadlines


def make():
    clock = Clock()
    live: set[str] = set()
    expired: list[tuple[float, str]] = []

    def expire(item):
        live.discard(item)
        expired.append((clock.seconds(), item))
    return clock, live, expired, Deadlines(clock, live=live.__contains__, expire=expire)


def test_each_item_expires_at_its_deadline_with_one_timer_at_a_time():
    clock, live, expired, deadlines = make()
    for deadline, item in ((30, "c"), (10, "a"), (20, "b"), (10, "a2")):
        live.add(item)
        deadlines.add(deadline, item)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    assert expired == [(10, "a"), (10, "a2")]     # same deadline: in the order added
    clock.pump([10, 10])
    assert expired[2:] == [(20, "b"), (30, "c")]
    assert clock.getDelayedCalls() == []


def test_an_item_no_longer_live_does_not_expire_nor_keep_a_timer():
    clock, live, expired, deadlines = make()
    live.update(("a", "b"))
    deadlines.add(10, "a")
    deadlines.add(20, "b")
    live.discard("a")
    deadlines.arm()
    [timer] = clock.getDelayedCalls()
    assert timer.getTime() == 20                  # moved on to b
    live.discard("b")
    deadlines.arm()
    assert clock.getDelayedCalls() == []
    clock.advance(30)
    assert expired == []


def test_an_item_gone_without_arm_is_skipped_when_its_time_comes():
    clock, live, expired, deadlines = make()
    live.update(("a", "b"))
    deadlines.add(10, "a")
    deadlines.add(20, "b")
    live.discard("a")
    clock.advance(10)
    assert expired == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    assert expired == [(20, "b")]


def test_clear_forgets_everything():
    clock, live, expired, deadlines = make()
    live.add("a")
    deadlines.add(10, "a")
    deadlines.clear()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert expired == []
    deadlines.add(15, "a")                        # usable again
    clock.advance(5)
    assert expired == [(15, "a")]
