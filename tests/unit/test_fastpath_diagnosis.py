"""The fast-path diagnosis: its host states, the flowtable it tries, and what the report says about them."""

import importlib.util
import os

import pytest

from netplugin.benchlib import datapath_diagnosis as dd
from netplugin.benchlib import datapath_states
from netplugin.benchlib import datapath_report as dr

ROUNDS = 4
PATHS = ("host", "netplugin-2h", "ptp")
STATES = ("as-built", "ct-first", "notrack", "ct-only", "empty-chain", "no-rules", "bare")
# p50 latency ratios to host per state (netplugin, ptp); host is 10 µs with drift.
LAT = {
    "ct-mark": 1.37,
    "as-built": 1.44,
    "ct-first": 1.38,
    "notrack": 1.55,
    "ct-only": 1.32,
    "empty-chain": 1.25,
    "no-rules": 1.22,
    "bare": 1.21,
    "flowtable": 1.24,
}


def _load_bench():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_datapath.py")
    spec = importlib.util.spec_from_file_location("bench_datapath", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _samples(lat_ratio, tcp_ratio=0.9):
    out = {}
    for p in PATHS:
        lat = 1.0 if p == "host" else lat_ratio if p == "netplugin-2h" else 1.2
        tcp = 1.0 if p == "host" else tcp_ratio if p == "netplugin-2h" else 0.9
        drift = [1.0 + 0.1 * r for r in range(ROUNDS)]
        out[p] = {
            "lat_p50": [10.0 * lat * d for d in drift],
            "lat_avg": [10.0 * lat * d for d in drift],
            "tcp_131072": [15.0 * tcp / d for d in drift],
        }
    return out


def _diag(states=STATES, flowtable=None):
    doc = {
        "date": "d",
        "machine": {"nproc": 2},
        "settings": {"rounds": ROUNDS, "duration_s": 2},
        "baseline": "host",
        "paths": [{"id": p, "label": p.upper(), "description": p} for p in PATHS],
        "states": [{"id": s, "label": s, "description": s} for s in states],
        "samples": {s: _samples(LAT[s]) for s in states},
    }
    if flowtable is not None:
        doc["flowtable"] = flowtable
    return doc


def _report_doc():
    samples = _samples(1.45, 0.8)
    samples["netplugin-iptables"] = samples["netplugin-2h"]  # the same path with a policy: the aims' path
    return {
        "baseline": "host",
        "paths": [{"id": p, "label": p, "description": p} for p in PATHS + ("netplugin-iptables",)],
        "samples": samples,
        "settings": {"rounds": ROUNDS},
    }


def test_decomposition_walks_from_no_netfilter_to_as_built_and_names_the_largest_step():
    lines = dd.decomposition_lines(_diag())
    text = lines[0]
    assert "against no netfilter at all" in text and "1.22× host" in text
    order = [
        text.index(w)
        for w in (
            "one empty forward chain",
            "conntrack with no filter chain",
            "conntrack and one established-accept rule",
            "as built (FORWARD",
        )
    ]
    assert order == sorted(order)
    # steps over no netfilter: empty chain +0.03, conntrack +0.07, one rule +0.06, layout +0.06 (× host).
    assert "The largest single step is to conntrack with no filter chain" in text
    assert "Keeping traffic out of conntrack with today's chains is slower: 1.55× host" in lines[1]


def test_decomposition_needs_every_step():
    partial = _diag(states=("as-built", "ct-first", "no-rules", "bare"))
    assert dd.decomposition_lines(partial) == []
    lines = dr.diagnosis_lines(partial)
    assert lines[0].startswith("- Latency (p50): netplugin 1.44× host as built, 1.21×")
    assert not any("Where the as-built latency goes" in line for line in lines)


def test_flowtable_unsupported_is_stated_with_the_kernels_answer():
    diag = _diag(flowtable={"supported": False, "reason": "the kernel is built without CONFIG_NF_FLOW_TABLE"})
    line = dd.flowtable_line(diag)
    assert line.startswith("- The flowtable fast path") and "could not be measured" in line
    assert "CONFIG_NF_FLOW_TABLE" in line
    closing = "\n".join(dr.analysis_lines(_report_doc(), diag))
    assert "cannot be built here (the kernel is built without CONFIG_NF_FLOW_TABLE)" in closing
    assert "the least a conntrack-based policy costs on this machine is 1.38× host latency" in closing
    assert "Keeping flows out of conntrack does not help" in closing
    assert "Even with no netfilter at all netplugin stays at 1.21× (ptp 1.20×)" in closing


def test_flowtable_measured_reports_its_ratios():
    diag = _diag(states=("as-built", "flowtable") + STATES[1:], flowtable={"supported": True, "reason": "ok"})
    assert dd.flowtable_line(diag) == (
        "- With a flowtable for established, policy-accepted flows: netplugin "
        "1.24× host latency (p50), 0.900× host throughput."
    )
    closing = "\n".join(dr.analysis_lines(_report_doc(), diag))
    assert "the diagnosis measured 1.24× host latency (p50) and 0.900× host throughput" in closing


def test_without_a_diagnosis_the_report_lists_candidates_not_measurements():
    text = "\n".join(dr.analysis_lines(_report_doc()))
    assert "candidates, not measured here" in text
    assert "least a conntrack-based policy" not in text


def test_flowtable_ruleset_offloads_only_after_iptables_filter():
    text = datapath_states.flowtable_nft(["np0123456789a", "eth0"])
    assert 'devices = { "eth0", "np0123456789a" }' in text  # sorted, quoted
    assert "hook forward priority filter + 10" in text  # after iptables' FORWARD (priority filter)
    assert "ct state established flow add @ft" in text


def test_diagnose_states_are_validated():
    bench = _load_bench()
    args = bench.parse_args(["--diagnose", "--states", "as-built,bare"])
    assert args.states == ["as-built", "bare"] and args.rounds == 6
    assert bench.DIAG_STATE_IDS[0] == "as-built" and bench.DIAG_STATE_IDS[-1] == "bare"
    with pytest.raises(SystemExit):
        bench.parse_args(["--diagnose", "--states", "as-built,turbo"])


def test_report_says_by_how_much_the_aims_are_missed():
    line = dr.shortfall_line(_report_doc())
    assert line == (
        "- Reached across hosts: `netplugin-iptables` throughput 0.800× host, the aim ≥ 0.970× is missed by 18%, "
        "latency 1.45× host, the aim ≤ 1.10× is missed by 32%."
    )
    met = _report_doc()
    met["samples"]["netplugin-iptables"] = _samples(1.05, 0.99)["netplugin-2h"]
    assert dr.shortfall_line(met) is None


def test_fast_accept_layout_is_compared_with_as_built_and_shows_its_rule_was_hit():
    diag = _diag(states=("as-built", "ct-mark") + STATES[1:])
    diag["ct_mark_hits"] = {"h1": 1200, "h2": 1180}
    line = dd.fast_accept_line(diag)
    assert "netplugin 1.37× host latency (p50) against 1.44× as built (0.805 µs less per one-way trip)" in line
    assert "took 1200, 1180 packets" in line
    assert dd.fast_accept_line(_diag()) is None  # not measured: nothing claimed
    assert any(line == x for x in dr.diagnosis_lines(diag))
    closing = "\n".join(dr.analysis_lines(_report_doc(), diag))
    assert "the same rule at the top of FORWARD itself, one jump earlier, measured 1.37×." in closing


def test_what_the_bare_state_says_follows_its_numbers():
    diag = _diag()
    closing = "\n".join(dr.analysis_lines(_report_doc(), diag))
    assert (
        "netplugin stays at 1.21× (ptp 1.20×), above the 1.10 aim by 10%: with the rules gone netplugin is "
        "level with ptp"
    ) in closing
    assert dr.diagnosis_lines(diag)[-1].startswith(
        "- With no netfilter at all netplugin (1.21× host latency, p50) is level with ptp (1.20×)"
    )
    LAT_FAST = dict(LAT, bare=1.05)
    fast = _diag()
    fast["samples"]["bare"] = _samples(LAT_FAST["bare"])
    closing = "\n".join(dr.analysis_lines(_report_doc(), fast))
    assert "stays at 1.05× (ptp 1.20×), within the 1.10 aim." in closing
    assert "routed-veth shape both share" not in closing
    assert "is still 0.150 below ptp (1.20×)" in dr.diagnosis_lines(fast)[-1]


def test_notrack_explanation_only_when_it_does_not_help_and_rp_filter_is_measured():
    slow = "\n".join(dd.decomposition_lines(_diag()))
    assert "slower: 1.55× host with NOTRACK against 1.44× as built, because every packet" in slow
    quick = _diag()
    quick["samples"]["notrack"] = _samples(1.30)
    text = "\n".join(dd.decomposition_lines(quick))
    assert "is faster: 1.30× host with NOTRACK against 1.44× as built." in text and "because" not in text
    rpf = dd.rp_filter_line(_diag())
    assert rpf.startswith("- Strict rp_filter on the host veths: 14.0 µs p50 with it, 13.9 µs without")
    assert dd.rp_filter_line(_diag(states=("as-built", "bare"))) is None


def test_diagnosis_names_the_steadiest_figure_from_the_spread():
    diag = _diag()
    diag["samples"]["as-built"]["netplugin-2h"]["lat_p50"] = [14.0, 14.0, 14.1, 14.0]
    md = dr.render_diagnosis(diag)
    assert "TCP ping-pong p50 varied least across rounds here (netplugin as built, max / min 1.01×)" in md
    diag["samples"]["as-built"]["netplugin-2h"]["lat_p50"] = [14.0, 20.0, 30.0, 40.0]
    assert "TCP ping-pong avg varied least" in dr.render_diagnosis(diag)
