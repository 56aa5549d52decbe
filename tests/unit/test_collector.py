"""The agent's full garbage collections: frozen start-up heap, none automatic, run when the host lock is free."""

import gc

import pytest

from netplugin.agent import collector
from netplugin.agent.collector import Collector
from netplugin.agent.rwlock import RWLock


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_stop_gives_full_collections_back(restore_gc):
    before = gc.get_threshold()
    c = Collector(RWLock(), Clock())
    c.start()
    c.stop()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    c.stop()  # twice is harmless


def test_full_collections_wait_for_a_free_host_lock_unless_long_overdue(restore_gc):
    lock, clock = RWLock(), Clock()
    c = Collector(lock, clock)
    c.start()
    assert gc.get_threshold()[2] == collector.NEVER and gc.get_freeze_count() > 0

    clock.now += collector.MIN_GAP - 1
    c.step()
    assert c.stats["collections"] == 0  # too soon
    clock.now += 2
    with lock.shared():  # an ADD in flight
        c.step()
        assert c.stats["collections"] == 0
        clock.now += collector.MAX_GAP
        c.step()  # overdue: collected anyway
        assert c.stats == {"collections": 1, "forced": 1, "last_ms": c.stats["last_ms"]}
    clock.now += collector.MIN_GAP
    c.step()
    assert c.stats["collections"] == 2 and c.stats["forced"] == 1


def test_a_cycle_left_by_a_request_is_freed_by_the_loop_not_by_allocation(restore_gc):
    lock, clock = RWLock(), Clock()
    c = Collector(lock, clock)
    c.start()

    class Node:
        pass

    a = Node()
    a.self = a
    gc.collect(1)  # young collections run as before: the cycle is promoted, not freed (it is still referenced)
    del a
    freed = []
    gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 2 and freed.append(info))
    try:
        clock.now += collector.MIN_GAP
        c.step()
    finally:
        gc.callbacks.pop()
    assert freed and freed[0]["collected"] >= 1
