"""Undo steps of a half-done dataplane change (pushed on an ``ExitStack`` before the step they undo)."""

import logging

log = logging.getLogger(__name__)


def quietly(fn, *args):
    """Run an undo step; its failure is logged, never raised, so the error that made us undo propagates."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure of an undo step must not mask the original error
        log.warning("undo step %s failed: %s", getattr(fn, "__name__", fn), e)
