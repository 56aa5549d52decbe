"""Pure logic of the benchmarks: statistics, tool-output parsing, report rendering, the bench_all index, cleanup."""

import json
import os
import signal

import pytest

from netplugin.benchlib import datapath_metrics as dm
from netplugin.benchlib import datapath_report as dr
from netplugin.benchlib import machine, parse, stats, suite
from netplugin.benchlib.cleanup import CleanupStack, Interrupted
from netplugin.benchlib.markdown import demote_headings, fmt_num, fmt_range, table

# --- stats -------------------------------------------------------------------------------------------------------


def test_summarize_ignores_missing_and_non_finite():
    s = stats.summarize([3.0, None, 1.0, float("nan"), 2.0, float("inf")])
    assert (s.median, s.lo, s.hi, s.n) == (2.0, 1.0, 3.0, 3)
    assert stats.summarize([None, None]) is None
    assert stats.summarize([]) is None


def test_paired_ratios_pair_by_round_and_skip_gaps_and_zero_baseline():
    values = [10.0, None, 9.0, 8.0, 6.0]
    base = [10.0, 10.0, None, 0.0, 12.0]
    assert stats.paired_ratios(values, base) == [1.0, 0.5]
    r = stats.ratio_summary(values, base)
    assert (r.median, r.lo, r.hi, r.n) == (0.75, 0.5, 1.0, 2)


def test_paired_ratio_is_not_the_ratio_of_medians():
    # Drift: the baseline and the path both slow down in round 2; paired ratios stay at 0.9.
    base, path = [10.0, 5.0, 10.0], [9.0, 4.5, 9.0]
    assert stats.ratio_summary(path, base).median == pytest.approx(0.9)
    assert stats.ratio_summary(path, base).hi == pytest.approx(0.9)


def test_counter_deltas_subtract_per_end_and_never_invent_a_zero():
    before = {"bpf": {"sender": {"allowed": 10, "to_stack": 5}, "receiver": None}}
    after = {
        "bpf": {"sender": {"allowed": 110, "to_stack": 5}, "receiver": {"allowed": 7, "to_stack": 0}},
        "new": {"sender": {"allowed": 1, "to_stack": 1}},
    }
    assert stats.counter_deltas(before, after) == {
        "bpf": {"sender": {"allowed": 100, "to_stack": 0}, "receiver": None},
        "new": {"sender": None},
    }


def test_paired_ratios_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="cannot pair"):
        stats.paired_ratios([1.0], [1.0, 2.0])


def test_rotated_gives_every_item_each_position():
    items = ["a", "b", "c"]
    firsts = {stats.rotated(items, k)[0] for k in range(3)}
    assert firsts == set(items)
    assert stats.rotated(items, 4) == ["b", "c", "a"]
    assert stats.rotated([], 2) == []


def test_seconds_per_gb():
    assert stats.seconds_per_gb(2.0, 4_000_000_000) == pytest.approx(0.5)
    assert stats.seconds_per_gb(1.0, 0) is None
    assert stats.seconds_per_gb(None, 10) is None


# --- parsing ------------------------------------------------------------------------------------------------------

TCP_JSON = json.dumps(
    {
        "start": {},
        "intervals": [],
        "end": {
            "sum_sent": {"seconds": 2.0, "bytes": 4100980736, "bits_per_second": 16.4e9, "retransmits": 1615},
            "sum_received": {"seconds": 2.0, "bytes": 4000000000, "bits_per_second": 16.0e9},
            "cpu_utilization_percent": {"host_total": 86.1, "remote_total": 44.7},
        },
    }
)

UDP_JSON = json.dumps(
    {
        "end": {
            "sum": {
                "seconds": 2.0,
                "bytes": 250000000,
                "bits_per_second": 1.0e9,
                "lost_percent": 10.0,
                "packets": 244140,
                "lost_packets": 24414,
            },
            "cpu_utilization_percent": {"host_total": 94.9, "remote_total": 47.6},
        }
    }
)

SOCKPERF_OUT = """sockperf: \x1b[2;35m====> avg-latency=43.268 (std-dev=27.696)\x1b[0m
sockperf: \x1b[2;35mTotal 17901 observations\x1b[0m; each percentile contains 179.01 observations
sockperf: ---> <MAX> observation = 2598.159
sockperf: ---> percentile 99.999 = 2598.159
sockperf: ---> percentile 99.000 =   71.215
sockperf: ---> percentile 50.000 =   41.296
sockperf: ---> <MIN> observation =   10.139
"""


def test_parse_iperf3_tcp_uses_the_receivers_count():
    r = parse.parse_iperf3_tcp(TCP_JSON)
    assert r["bps"] == 16.0e9 and r["bytes"] == 4000000000 and r["retransmits"] == 1615
    assert (r["cpu_host_pct"], r["cpu_remote_pct"]) == (86.1, 44.7)


def test_parse_iperf3_udp_derives_the_received_rate():
    r = parse.parse_iperf3_udp(UDP_JSON)
    assert r["sent_bps"] == 1.0e9 and r["loss_percent"] == 10.0
    assert r["recv_bps"] == pytest.approx(0.9e9)


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "no JSON"),
        (
            json.dumps({"start": {}, "end": {}, "error": "the server is busy running a test. try again later"}),
            "server is busy",
        ),
        (json.dumps({"start": {}, "end": {}}), "did not finish"),
    ],
)
def test_parse_iperf3_failures_are_errors_not_zeros(text, message):
    with pytest.raises(ValueError, match=message):
        parse.parse_iperf3_tcp(text)


def test_parse_iperf3_wrong_kind_is_rejected():
    with pytest.raises(ValueError, match="not a TCP test"):
        parse.parse_iperf3_tcp(UDP_JSON)
    with pytest.raises(ValueError, match="not a UDP test"):
        parse.parse_iperf3_udp(TCP_JSON)


def test_parse_sockperf_reads_avg_and_percentiles_through_colour_codes():
    r = parse.parse_sockperf(SOCKPERF_OUT)
    assert r == {"avg_us": 43.268, "p50_us": 41.296, "p99_us": 71.215, "observations": 17901}


def test_parse_snmp_reads_one_counter_of_a_group():
    text = (
        "Ip: Forwarding DefaultTTL InReceives ForwDatagrams\nIp: 1 64 912 455\n"
        "Icmp: InMsgs ForwDatagrams\nIcmp: 3 999\n"
    )
    assert parse.parse_snmp(text, "Ip", "ForwDatagrams") == 455
    with pytest.raises(ValueError, match="no Udp InDatagrams"):
        parse.parse_snmp(text, "Udp", "InDatagrams")


def test_parse_sockperf_without_summary_fails():
    with pytest.raises(ValueError, match="no latency summary"):
        parse.parse_sockperf("sockperf: ERROR: connect() failed\n")


def test_cpu_busy_seconds_counts_user_nice_system_irq_softirq_only():
    hz = os.sysconf("SC_CLK_TCK")
    text = f"cpu  {hz} {hz} {hz} 9999 9999 {hz} {hz} 9999 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n"
    assert machine.cpu_busy_seconds(text) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no aggregate"):
        machine.cpu_busy_seconds("cpu0 1 2 3\n")


# --- markdown -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,text",
    [
        (None, "—"),
        (0, "0"),
        (16.43, "16.4"),
        (0.98123, "0.981"),
        (1234.5, "1234"),
        (1.0, "1.00"),
        (0.00012345, "0.000123"),
    ],
)
def test_fmt_num_three_significant_digits(value, text):
    assert fmt_num(value) == text


def test_fmt_range():
    assert fmt_range(stats.Summary(2.0, 1.0, 3.0, 3)) == "2.00 (1.00–3.00)"
    assert fmt_range(stats.Summary(2.0, 2.0, 2.0, 1)) == "2.00"
    assert fmt_range(None) == "—"


def test_table_escapes_pipes_and_checks_width():
    out = table(["a", "b"], [["x|y", 1]])
    assert out.splitlines() == ["| a | b |", "| :--- | ---: |", "| x\\|y | 1 |"]
    with pytest.raises(ValueError, match="2 cells"):
        table(["a"], [["x", "y"]])


def test_demote_headings_leaves_code_blocks_and_hashtags_alone():
    text = "# Title\n## Sub\n```\n# not a heading\n```\n#hashtag\n###### deep\n"
    assert demote_headings(text, 2) == "### Title\n#### Sub\n```\n# not a heading\n```\n#hashtag\n###### deep\n"


# --- the data path report -----------------------------------------------------------------------------------------


def _doc(np_tcp, np_lat, rounds=5, paths=("host", "netplugin-2h", "netplugin-bpf", "ptp")):
    """netplugin-2h and netplugin-bpf at ``np_tcp``/``np_lat`` of host, ptp at 0.95/1.05, with drift."""
    samples = {p: {m.id: [None] * rounds for m in dm.METRICS} for p in paths}
    for r in range(rounds):
        drift = 1.0 + 0.1 * r  # the whole machine slows down round by round
        for p, (tcp, lat) in {"host": (1.0, 1.0), "ptp": (0.95, 1.05)}.items():
            samples[p]["tcp_131072"][r] = 15.0 * tcp / drift
            samples[p]["lat_avg"][r] = 10.0 * lat * drift
        for p in paths:
            if p.startswith("netplugin"):
                samples[p]["tcp_131072"][r] = 15.0 * np_tcp / drift
                samples[p]["lat_avg"][r] = 10.0 * np_lat * drift
    return {
        "date": "2026-01-01 00:00 UTC",
        "elapsed_s": 500.0,
        "baseline": "host",
        "complete": True,
        "machine": {
            "nproc": 2,
            "cpu_model": "Test CPU",
            "kernel": "6.1.0",
            "memory_gib": 24.0,
            "loadavg": (1.0, 1.0, 1.0),
        },
        "settings": {"rounds": rounds, "rounds_done": rounds, "duration_s": 2, "udp_bandwidth": "1G"},
        "paths": [{"id": p, "label": p.upper(), "description": f"the {p} path"} for p in paths],
        "samples": samples,
        "errors": [],
    }


def test_aims_met_and_not_met_from_paired_ratios():
    ok = {v["metric"]: v for v in dr.aims(_doc(0.98, 1.05)) if v["path"] == "netplugin-bpf"}
    assert ok["tcp_131072"]["met"] is True and ok["lat_avg"]["met"] is True
    assert ok["tcp_131072"]["ratio"].median == pytest.approx(0.98)
    assert ok["lat_p50"]["met"] is None  # never measured: not claimed either way
    bad = {v["metric"]: v for v in dr.aims(_doc(0.90, 1.30)) if v["path"] == "netplugin-bpf"}
    assert bad["tcp_131072"]["met"] is False and bad["lat_avg"]["met"] is False


def test_render_markdown_states_verdicts_ratios_and_machine():
    md = dr.render_markdown(_doc(0.90, 1.30), chart_file="datapath.png")
    assert (
        "**NOT met**: netplugin-bpf: cross-host TCP throughput (131072 B writes) at least 0.97 of host: median "
        "ratio 0.900 (rounds 0.900–0.900, n=5), missed by 7.2%." in md
    )
    assert "**NOT met**: netplugin-bpf: cross-host TCP ping-pong latency (average) at most 1.10 of host: median" in md
    assert "**not measured**: (also read) netplugin-bpf: cross-host TCP ping-pong latency (p50)" in md
    assert "**not measured**: netplugin-iptables: cross-host TCP throughput" in md
    assert "2 CPUs (Test CPU)" in md and "Linux 6.1.0" in md
    assert "![data path chart](datapath.png)" in md
    assert "| NETPLUGIN-2H |" in md and "| HOST | 1 (baseline)" in md
    # ptp comparison in the analysis uses the paired ratios too.
    assert "reaches 0.950 of host throughput and 1.05 of host latency" in md


def test_report_sentences_come_from_the_numbers():
    doc = _doc(0.98, 1.05)
    doc["samples"]["host"]["udp_1024_loss"] = [0.0, 0.0, 0.0]
    md = dr.render_markdown(doc)
    assert "the baseline lost nothing at that rate, so the received rate is capped by the offered rate" in md
    assert "candidates, not measured here" not in md  # every aim met: nothing to close
    assert "this machine's 2 CPUs" in md
    assert "Spread of `host` across rounds (max / min): TCP 131072 B writes 1.40×" in md
    assert " µs host↔host" not in md  # no figure of some other run
    doc["samples"]["host"]["udp_1024_loss"] = [3.0, 2.0, 4.0]
    lossy = dr.render_markdown(_doc(0.90, 1.30) | {"samples": doc["samples"]})
    assert "the baseline itself lost up to 3.00% at that rate, so the received rate shows each path's capacity" in lossy


def test_render_markdown_marks_an_incomplete_run_and_lists_failures():
    doc = _doc(1.0, 1.0)
    doc.update(
        complete=False,
        note="stopped at the 20-minute budget during round 4",
        errors=[f"round 1, tcp 1024, ptp: boom {i}" for i in range(25)],
    )
    md = dr.render_markdown(doc)
    assert "**Incomplete run:** stopped at the 20-minute budget during round 4." in md
    assert "## Failed samples (25)" in md and "… and 5 more" in md
    assert "![data path chart]" not in md


def test_summary_lines_give_each_path_and_each_aim():
    doc = _doc(0.98, 1.05)
    lines = dr.summary_lines(doc)
    assert len(lines) == len(doc["paths"]) + len(dr.AIMS)
    assert any(line.startswith("NETPLUGIN-2H") and "x0.980" in line for line in lines)


def test_render_chart_writes_a_png_or_names_the_missing_package(tmp_path):
    png = tmp_path / "c.png"
    problem = dr.render_chart(_doc(0.9, 1.2), str(png))
    if problem is None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib" in problem and not png.exists()


# --- bench_all ----------------------------------------------------------------------------------------------------


def test_discover_orders_known_benchmarks_first_and_skips_bench_all(tmp_path):
    for name in (
        "bench_datapath.py",
        "bench_all.py",
        "bench_zeta.py",
        "bench_ipam.py",
        "bench_cni.py",
        "lab.py",
        "bench_x.sh",
    ):
        (tmp_path / name).write_text("")
    assert [n for n, _ in suite.discover(str(tmp_path))] == ["ipam", "cni", "datapath", "zeta"]


def test_accepts_quick_reads_the_option_from_source():
    assert suite.accepts_quick('ap.add_argument("--quick", action="store_true")')
    assert suite.accepts_quick("p.add_argument('--quick')")
    assert not suite.accepts_quick('ap.add_argument("--quickly")\n# mentions quick')


def test_section_body_prefers_own_report_then_markdown_stdout_then_text_block():
    assert suite.section_body("# Own\ntext", "ignored") == "### Own\ntext"
    md_out = "progress\n| a | b |\n|---|---|\n| 1 | 2 |"
    assert suite.section_body(None, md_out) == md_out
    assert suite.section_body(None, "name   n  median\nfoo    3  12") == "```text\nname   n  median\nfoo    3  12\n```"
    assert suite.section_body(None, "") == "_(no output)_"
    long_body = suite.section_body(None, "\n".join(f"line {i}" for i in range(300)), limit_lines=10)
    assert "290 earlier lines left out" in long_body and "line 299" in long_body and "line 289" not in long_body


def test_render_index_lists_every_run_with_status_and_sections():
    runs = [
        {"name": "cni", "status": "ok", "seconds": 75, "quick": False, "report": None, "body": "tbl"},
        {
            "name": "datapath",
            "status": "failed (rc=1)",
            "seconds": 5,
            "quick": True,
            "report": "datapath.md",
            "body": "x",
        },
    ]
    md = suite.render_index(runs, "2026-01-01 00:00 UTC", "2 CPUs (X)", quick=True, notes=["note one"])
    assert "with --quick" in md and "Machine: 2 CPUs (X)." in md and "note one" in md
    assert "| [cni](#cni) | ok | 1:15 | no | below |" in md
    assert "| [datapath](#datapath) | failed (rc=1) | 0:05 | yes | [datapath.md](datapath.md) |" in md
    assert "## datapath" in md and "`scripts/bench_datapath.py --quick`: failed (rc=1) in 0:05." in md


# --- cleanup ------------------------------------------------------------------------------------------------------


def test_cleanup_runs_lifo_once_and_survives_a_failing_step():
    order, logged = [], []
    with CleanupStack(log=logged.append) as c:
        c.push("first", order.append, 1)
        c.push("broken", lambda: 1 / 0)
        c.push("last", order.append, 3)
    assert order == [3, 1]
    assert logged and "broken failed" in logged[0]
    assert len(c) == 0


def test_cleanup_turns_sigterm_into_interrupted_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    ran = []
    with pytest.raises(Interrupted, match="SIGTERM"):
        with CleanupStack() as c:
            c.push("step", ran.append, "done")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
            pytest.fail("SIGTERM did not interrupt")
    assert ran == ["done"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_analysis_attributes_the_gap_to_ptp_only_when_netplugin_trails_it():
    behind = "\n".join(dr.analysis_lines(_doc(0.90, 1.30)))
    assert "The difference between the two is netplugin's own per-packet work" in behind
    level = "\n".join(dr.analysis_lines(_doc(0.96, 1.05)))
    assert "netplugin is level with ptp" in level


def test_analysis_flags_rounds_that_straddle_an_aim():
    doc = _doc(0.97, 1.0)
    doc["samples"]["netplugin-bpf"]["tcp_131072"][0] *= 0.9  # one round below the 0.97 bound, one above
    doc["samples"]["netplugin-bpf"]["tcp_131072"][1] *= 1.05
    text = "\n".join(dr.analysis_lines(doc))
    assert "The rounds straddle the bound for netplugin-bpf: cross-host TCP throughput (131072 B writes)" in text


def test_render_diagnosis_compares_states_per_round():
    states = ["as-built", "no-iptables", "bare"]
    base = _doc(0.80, 1.45)
    diag = {
        "date": "d",
        "machine": base["machine"],
        "settings": {"rounds": 5, "duration_s": 2},
        "baseline": "host",
        "paths": base["paths"],
        "states": [{"id": s, "label": s.upper(), "description": s} for s in states],
        "samples": {
            "as-built": base["samples"],
            "no-iptables": _doc(0.9, 1.25)["samples"],
            "bare": _doc(0.92, 1.22)["samples"],
        },
    }
    for per_path in diag["samples"].values():
        for metrics in per_path.values():
            metrics["lat_p50"] = list(metrics["lat_avg"])
    md = dr.render_diagnosis(diag)
    assert "| AS-BUILT | NETPLUGIN-2H |" in md and "| BARE | PTP |" in md
    lines = dr.diagnosis_lines(diag)
    assert lines[0].startswith("- Latency (p50): netplugin 1.45× host as built, 1.22× with its iptables rules")
    assert "Throughput (TCP, 131072 B writes): netplugin 0.800× host as built, 0.920×" in lines[1]
    report = dr.render_markdown(base, diagnosis=diag)
    assert "[datapath-diagnosis.md](datapath-diagnosis.md)" in report


# --- the two dataplanes in the data path report ------------------------------------------------------------------


def _dataplane_doc(bpf_allowed, bpf_to_stack, cidr_tcp=0.99, rounds=5):
    """host, ptp, both dataplanes' policy, no-policy and 10,000-CIDR paths, and the bpf paths' counters."""
    paths = (
        "host",
        "ptp",
        "netplugin-iptables",
        "netplugin-2h",
        "netplugin-iptables-10k",
        "netplugin-bpf",
        "netplugin-bpf-nopolicy",
        "netplugin-bpf-10k",
    )
    doc = _doc(0.87, 1.45, rounds, paths)
    for r in range(rounds):
        for p in ("netplugin-bpf", "netplugin-bpf-nopolicy"):
            doc["samples"][p]["tcp_131072"][r] = doc["samples"]["host"]["tcp_131072"][r] * 0.94
            doc["samples"][p]["lat_avg"][r] = doc["samples"]["host"]["lat_avg"][r] * 1.27
        nopol = doc["samples"]["netplugin-bpf-nopolicy"]
        doc["samples"]["netplugin-bpf-10k"]["tcp_131072"][r] = nopol["tcp_131072"][r] * cidr_tcp
        doc["samples"]["netplugin-bpf-10k"]["lat_avg"][r] = nopol["lat_avg"][r] * 1.02
    ends = {"allowed": bpf_allowed, "to_stack": bpf_to_stack, "denied": 0, "spoofed": 0, "logged": 0}
    doc["counters"] = {p: {"sender": dict(ends), "receiver": dict(ends)} for p in paths if "bpf" in p}
    return doc


def test_the_report_says_the_redirects_carried_the_bpf_traffic_from_its_counters():
    doc = _dataplane_doc(bpf_allowed=500_000, bpf_to_stack=20)
    text = "\n".join(dr.analysis_lines(doc))
    assert "`netplugin-bpf` reaches 0.940× host throughput and 1.27× host latency" in text
    assert "`netplugin-iptables`, the same policy in iptables, 0.870× and 1.45×" in text
    assert "level with ptp" not in text  # 1.27× against ptp's 1.05×
    for r in range(5):
        doc["samples"]["ptp"]["lat_avg"][r] = doc["samples"]["host"]["lat_avg"][r] * 1.26
    assert "1.27× host latency; `netplugin-iptables`" in "\n".join(dr.analysis_lines(doc))
    assert ": level with ptp in latency, so policy in BPF costs no more" in "\n".join(dr.analysis_lines(doc))
    assert "the programs carried 100% of its packets (np_counters of its two endpoints: allowed 1,000,000, " in text
    assert "what remains to host latency (1.27×) is the two veth crossings" in text
    assert "its ratios are the iptables path's" not in text
    assert "ForwDatagrams" not in text  # not recorded in this document: not claimed
    doc["forwarded"] = {"bpf": {"h1": 3, "h2": 2}, "iptables": {"h1": 600_000, "h2": 590_000}}
    assert (
        "passed on 5 packets on the bpf lab's two hosts during the rounds, 1,190,000 on the iptables lab's (all of "
        "each lab's paths): on the bpf lab the redirects bypassed the kernel's forwarding"
    ) in "\n".join(dr.analysis_lines(doc))
    assert "- Reached across hosts: `netplugin-bpf` throughput 0.940× host, the aim ≥ 0.970× is missed by 3.1%" in text
    md = dr.render_markdown(doc)
    assert "## BPF program counters" in md
    assert "| NETPLUGIN-BPF | sender | 500,000 | 20 | 0 | 0 | 100% |" in md


def test_the_report_says_when_the_programs_handed_everything_to_the_stack():
    text = "\n".join(dr.analysis_lines(_dataplane_doc(bpf_allowed=0, bpf_to_stack=300_000)))
    assert "the programs handed 100% of its packets to the kernel's stack" in text
    assert "its ratios are the iptables path's (0.180 apart in latency)" in text
    assert "Its programs handed every packet to the stack, so the ipset enforced the CIDRs" in text
    assert "two veth crossings" not in text
    doc = _dataplane_doc(bpf_allowed=0, bpf_to_stack=300_000)
    doc["forwarded"] = {"bpf": {"h1": 500_000, "h2": 490_000}, "iptables": {"h1": 600_000, "h2": 590_000}}
    assert "the bpf lab's traffic took the kernel's forwarding path" in "\n".join(dr.analysis_lines(doc))


def test_the_cidr_aims_compare_with_the_same_dataplane_without_policy():
    doc = _dataplane_doc(bpf_allowed=10, bpf_to_stack=0, cidr_tcp=0.90)
    got = {(v["path"], v["metric"]): v for v in dr.aims(doc)}
    v = got[("netplugin-bpf-10k", "tcp_131072")]
    assert v["base"] == "netplugin-bpf-nopolicy" and v["ratio"].median == pytest.approx(0.90) and v["met"] is False
    lat = got[("netplugin-bpf-10k", "lat_avg")]
    assert lat["ratio"].median == pytest.approx(1.02) and lat["met"] is True
    text = "\n".join(dr.analysis_lines(doc))
    assert (
        "`netplugin-bpf-10k`: with 10,000 CIDRs in the receiver's allow rule, 0.900× the throughput and 1.02× the "
        "latency of `netplugin-bpf-nopolicy` (aims: throughput missed by 5.3%, latency met by 3.1%)" in text
    )
    assert "The CIDRs are LPM entries in np_pol_peers" in text
    assert "`netplugin-iptables-10k`: with 10,000 CIDRs in the receiver's allow rule, 1.00× the throughput" in text


def test_counters_missing_for_an_end_are_shown_as_unknown_not_zero():
    doc = _dataplane_doc(bpf_allowed=10, bpf_to_stack=0)
    doc["counters"]["netplugin-bpf"]["receiver"] = None
    assert "programs carried" not in "\n".join(line for line in dr.analysis_lines(doc) if "`netplugin-bpf`:" in line)
    assert "| NETPLUGIN-BPF | receiver | — | — | — | — | — |" in dr.render_markdown(doc)


def test_the_benchmark_policies_pass_the_policy_loader_and_list_the_sender_among_10000_cidrs():
    from netplugin.benchlib.datapath_paths import CIDR_LABELS, PAIR_LABELS, cidr_policy, pair_policy
    from policy.loader import load_text

    [pair] = load_text(json.dumps(pair_policy()))
    assert pair.types == ("Ingress", "Egress") and pair.selector.to_dict() == {"matchLabels": PAIR_LABELS}
    doc = cidr_policy("10.20.7.9")
    [big] = load_text(json.dumps(doc))
    assert big.selector.to_dict() == {"matchLabels": CIDR_LABELS} and big.types == ("Ingress",)
    cidrs = [peer["cidr"] for peer in doc["spec"]["ingress"][0]["from"]]
    assert len(cidrs) == len(set(cidrs)) == 10_000
    assert "10.20.7.9/32" in cidrs[1:-1]
