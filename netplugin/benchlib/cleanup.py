"""Undo steps that run exactly once: on normal exit, on an exception, on SIGINT, SIGTERM or SIGHUP.

A benchmark registers the undo step *before* it creates the thing (a namespace, a process, a directory), so an
interruption at any point removes whatever exists. While the steps run, further signals are ignored: a second
Ctrl-C must not leave half the namespaces behind.
"""

import signal
import sys

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """A signal asked the benchmark to stop; raised in the main thread so ``finally`` blocks run."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class CleanupStack:
    """LIFO undo steps. Use as a context manager in the main thread; ``push`` before creating."""

    def __init__(self, log=None):
        self._steps = []
        self._previous = {}
        self._closing = False
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def push(self, what, fn, *args, **kwargs):
        """Register ``fn(*args, **kwargs)``; ``what`` names it in the log when it fails."""
        self._steps.append((what, fn, args, kwargs))

    def __len__(self):
        return len(self._steps)

    def _on_signal(self, signum, frame):
        if not self._closing:
            raise Interrupted(signum)

    def __enter__(self):
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def close(self):
        """Run every step, newest first; a failing step is logged and the others still run."""
        self._closing = True
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        failures = 0
        try:
            while self._steps:
                what, fn, args, kwargs = self._steps.pop()
                try:
                    fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - one failed undo must not stop the others
                    failures += 1
                    self._log(f"cleanup: {what} failed: {e}")
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            self._previous.clear()
            self._closing = False
        return failures

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False
