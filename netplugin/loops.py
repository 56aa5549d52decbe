"""The one way a long-running thread runs: a loop body called forever that no exception can end.

``run_forever`` calls ``body()`` until ``stop`` is set. The body returns how long to wait before the next round
(None: ``interval``). Any exception is logged (a traceback the first time a given error appears, one line for
each repeat), counted, and followed by a jittered, doubling back-off, so a bug or a stray record costs one round,
never the thread. ``Progress`` keeps, per loop, when its last round succeeded and its run of failures: the
agent's health answer reads it, so a loop that stopped making progress is visible rather than silent.
"""

import logging
import random
import threading
import time

from netplugin.errors import NetpluginError

LOG = logging.getLogger(__name__)
BACKOFF = (0.5, 30.0)  # first delay after a failure, and the most it doubles to


class Progress:
    """Per loop: monotonic time of its last good round, consecutive failures and the last error."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._loops = {}  # name -> {"ok_at", "failures", "error"}

    def _entry(self, name):
        return self._loops.setdefault(name, {"ok_at": None, "failures": 0, "error": None, "started_at": self.clock()})

    def started(self, name):
        with self._lock:
            self._entry(name)

    def ok(self, name):
        with self._lock:
            e = self._entry(name)
            e["ok_at"], e["failures"], e["error"] = self.clock(), 0, None

    def failed(self, name, error):
        with self._lock:
            e = self._entry(name)
            e["failures"] += 1
            e["error"] = error

    def age(self, name):
        """Seconds since the loop's last good round (since it started if it never had one); None: unknown."""
        with self._lock:
            e = self._loops.get(name)
            if e is None:
                return None
            return self.clock() - (e["ok_at"] if e["ok_at"] is not None else e["started_at"])

    def failures(self, name):
        with self._lock:
            e = self._loops.get(name)
            return e["failures"] if e else 0

    def snapshot(self):
        """{name: {"age_s", "failures", "error"}} for the health answer."""
        now = self.clock()
        with self._lock:
            return {
                name: {
                    "age_s": round(now - (e["ok_at"] if e["ok_at"] is not None else e["started_at"]), 3),
                    "ever_ok": e["ok_at"] is not None,
                    "failures": e["failures"],
                    "error": e["error"],
                }
                for name, e in sorted(self._loops.items())
            }


def describe(exc):
    """One line naming an exception: our errors by their message, anything else by type and text."""
    if isinstance(exc, NetpluginError):
        return exc.msg
    return f"{type(exc).__name__}: {exc}"


def run_forever(name, body, stop, interval=1.0, progress=None, backoff=BACKOFF, log=LOG):
    """Call ``body()`` until ``stop`` (a threading.Event) is set; see the module docstring."""
    progress = progress if progress is not None else Progress()
    progress.started(name)
    delay, last_error = backoff[0], None
    while not stop.is_set():
        try:
            wait = body()
        except Exception as e:  # noqa: BLE001 - the point of this loop: nothing ends the thread
            why = describe(e)
            progress.failed(name, why)
            if isinstance(e, NetpluginError):
                log.warning("event=loop.failed loop=%s error=%s retry_in_s=%.1f", name, why, delay)
            elif why != last_error:
                log.exception("event=loop.crashed loop=%s error=%s retry_in_s=%.1f", name, why, delay)
            else:
                log.error("event=loop.crashed loop=%s error=%s again=true retry_in_s=%.1f", name, why, delay)
            last_error = why
            stop.wait(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, backoff[1])
            continue
        progress.ok(name)
        delay, last_error = backoff[0], None
        stop.wait(interval if wait is None else wait)


def spawn(name, body, stop, interval=1.0, progress=None, **kw):
    """``run_forever`` on a daemon thread named ``name``; returns the started thread."""
    t = threading.Thread(
        target=run_forever, args=(name, body, stop, interval, progress), kwargs=kw, name=name, daemon=True
    )
    t.start()
    return t
