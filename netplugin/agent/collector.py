"""Full garbage collections off the request path.

A full (generation 2) collection of the agent's heap took 11 to 37 ms here (timed with ``gc.callbacks`` during
bench_cni), and Python starts one when allocations pile up, that is in the middle of an ADD, which then took that
much longer: it was bench_cni's ADD p99. Netlink decoding leaves cyclic garbage (pyroute2's messages), so full
collections are needed, just not there. So what is alive once the agent has started is frozen (``gc.freeze``:
never scanned again), automatic full collections are turned off, and the agent's ``gc`` loop runs them: once the
host lock is free (no ADD or DEL in flight) and ``MIN_GAP`` s have passed, or after ``MAX_GAP`` s whatever
happens. Young collections (generations 0 and 1, about a millisecond) stay automatic.
"""

import gc
import logging
import time

LOG = logging.getLogger(__name__)
MIN_GAP = 10.0
MAX_GAP = 60.0
NEVER = 2**31 - 1  # a generation-2 threshold the count of generation-1 collections never reaches


class Collector:
    def __init__(self, host_lock, clock=time.monotonic):
        self.host_lock = host_lock  # netplugin.agent.rwlock.RWLock: busy() while an ADD or DEL holds it
        self.clock = clock
        self._last = clock()
        self._threshold = None  # Python's thresholds before start(), put back by stop()
        self.stats = {"collections": 0, "forced": 0, "last_ms": 0.0}

    def start(self):
        """Freeze what start-up left alive and take full collections over; call once, after start-up."""
        gc.collect()
        gc.freeze()
        self._threshold = gc.get_threshold()
        gc.set_threshold(self._threshold[0], self._threshold[1], NEVER)
        self._last = self.clock()
        LOG.info("event=gc.frozen objects=%d", gc.get_freeze_count())

    def stop(self):
        """Give full collections back to Python (an agent run inside another process, as some tests do)."""
        if self._threshold is not None:
            gc.set_threshold(*self._threshold)
            gc.unfreeze()
            self._threshold = None

    def step(self):
        """One round of the loop: a full collection when one is due and the host is quiet (or long overdue)."""
        since = self.clock() - self._last
        if since < MIN_GAP:
            return
        forced = self.host_lock.busy()
        if forced and since < MAX_GAP:
            return
        started = self.clock()
        collected = gc.collect()
        self._last = self.clock()
        took = (self._last - started) * 1000
        self.stats["collections"] += 1
        self.stats["forced"] += forced
        self.stats["last_ms"] = round(took, 1)
        LOG.debug("event=gc.collected objects=%d ms=%.1f forced=%s", collected, took, forced)
