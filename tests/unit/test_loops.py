"""netplugin.loops: no exception ends a loop; a repeated error logs its traceback once; progress is kept."""

import logging
import threading

from netplugin import loops
from netplugin.errors import DatastoreUnavailable


def test_a_loop_survives_any_exception_logs_a_traceback_once_and_records_progress(caplog):
    stop = threading.Event()
    progress = loops.Progress()
    calls = []

    def body():
        calls.append(1)
        if len(calls) <= 3:
            raise ValueError("a bug")
        if len(calls) == 4:
            raise DatastoreUnavailable("etcd unreachable")
        if len(calls) == 6:
            stop.set()
        return 0

    with caplog.at_level(logging.WARNING, logger="t"):
        loops.run_forever("t", body, stop, progress=progress, backoff=(0.001, 0.004), log=logging.getLogger("t"))
    assert len(calls) == 6
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "ValueError: a bug" in tracebacks[0].getMessage()
    assert sum("again=true" in r.getMessage() for r in caplog.records) == 2
    assert any("etcd unreachable" in r.getMessage() and not r.exc_info for r in caplog.records)
    snap = progress.snapshot()["t"]
    assert snap["ever_ok"] and snap["failures"] == 0 and snap["error"] is None


def test_progress_counts_failures_in_a_row_until_a_good_round():
    now = [100.0]
    p = loops.Progress(clock=lambda: now[0])
    p.started("x")
    now[0] += 5
    assert p.age("x") == 5 and p.age("nothing") is None
    p.failed("x", "boom")
    p.failed("x", "boom")
    assert p.failures("x") == 2 and p.snapshot()["x"]["error"] == "boom"
    p.ok("x")
    now[0] += 1
    assert p.failures("x") == 0 and p.age("x") == 1
