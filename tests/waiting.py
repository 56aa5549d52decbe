"""Bounded polling for functional tests: every wait has a deadline, and a timeout says what did not happen."""

import time


def poll(fn, timeout=10.0, step=0.05):
    """``fn()``'s first truthy value within ``timeout`` seconds, else its last (falsy) value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def wait_until(what, fn, timeout=10.0, step=0.05):
    """Like ``poll``, but a timeout fails the test with ``what`` and the last value seen."""
    value = poll(fn, timeout, step)
    if not value:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
    return value
