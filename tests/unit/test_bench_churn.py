"""The churn benchmark's pure parts: the limits it accepts, what it reads of a process, the report it prints."""

import os

import pytest

from netplugin.benchlib.churn import ChurnResult, check_limits, clean, proc_usage, render
from netplugin.errors import InvalidInput


def test_the_defaults_and_a_small_run_are_accepted():
    check_limits(10, 1000, 4, 900)
    check_limits(2, 1, 1, 0.5)


@pytest.mark.parametrize(
    "hosts, containers, per_host, timeout, word",
    [
        (1, 10, 4, 60, "--hosts"),  # nobody on another host to ping from
        (51, 10, 4, 60, "--hosts"),
        (3, 0, 4, 60, "--containers"),
        (3, 5001, 4, 60, "--containers"),
        (3, 10, 0, 60, "--per-host-concurrency"),
        (3, 10, 33, 60, "--per-host-concurrency"),
        (3, 10, 4, 0, "--timeout"),
        (3, 10, 4, 3601, "--timeout"),
    ],
)
def test_limits_name_the_option_that_is_out_of_range(hosts, containers, per_host, timeout, word):
    with pytest.raises(InvalidInput, match=word):
        check_limits(hosts, containers, per_host, timeout)


def test_proc_usage_of_this_process_and_of_one_that_is_gone():
    cpu, peak_kib = proc_usage(os.getpid())
    assert cpu > 0 and peak_kib > 1024
    assert proc_usage(2**22 + 1) is None  # above pid_max's largest value


def _result(**kw):
    r = ChurnResult(
        hosts=3,
        containers=4,
        per_host=2,
        total_s=5.25,
        delete_s=2.0,
        add_s=[0.1, 0.2, 0.3, 0.4],
        del_s=[0.05] * 4,
        reach_s=[0.5, 0.6, 0.7, 1.0],
        agent_cpu_s={"h1": 1.0, "h2": 3.0},
        agent_peak_kib={"h1": 51200, "h2": 61440},
        etcd_db_bytes={"before": 1048576, "full": 3 * 1048576, "after": None},
        leaks={"veths": [], "routes": [], "ipset members": []},
        ipam_check="ipam check: clean",
    )
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_report_renders_every_figure():
    text = "\n".join(render(_result()))
    assert "| end to end: first ADD to last reachable (s) | 5.2 |" in text
    assert "| ADD p50 / p99 / max under load (ms) | 250 / 397 / 400 |" in text
    assert "| time to reachable p50 / p99 / max (ms) | 650 / 991 / 1000 |" in text
    assert "| agent CPU s per host, mean / max | 2.0 / 3.0 |" in text
    assert "| agent peak RSS per host MiB, mean / max | 55.0 / 60.0 |" in text
    assert "| etcd DB size before / full / after (MiB) | 1.0 / 3.0 / - |" in text
    assert "leftover veths: 0" in text and "netctl ipam check: ipam check: clean" in text


def test_report_of_a_run_with_no_samples_still_renders():
    r = ChurnResult(hosts=2, containers=1, per_host=1)
    assert any("| - / - / - |" in line for line in render(r))
    assert not clean(r)  # no ipam check ran: not proven clean


@pytest.mark.parametrize(
    "change",
    [
        {"failed": [("c1", "boom")]},
        {"unreachable": ["10.0.0.1"]},
        {"leaks": {"veths": ["h1:np0123456789a"]}},
        {"ipam_check": "leaked 10.0.0.1"},
    ],
)
def test_anything_failed_unreachable_or_left_behind_is_not_clean(change):
    assert clean(_result())
    r = _result(**change)
    assert not clean(r)
    assert any(
        ("failed" in line or "unreachable" in line or "leftover veths: 1" in line or "leaked" in line)
        for line in render(r)
    )
