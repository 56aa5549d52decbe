"""The agent's metrics instruments and listener options (pure: no etcd, no namespaces)."""

import subprocess

import pytest
from prometheus_client import generate_latest

from netplugin.agent.config_file import default_map
from netplugin.agent.main import agent as agent_command
from netplugin.agent.metrics import Metrics, WatchLag, _phase_label
from netplugin.agent.ops_http import create_ops_app, parse_listen
from netplugin.errors import InvalidInput
from netplugin.lab.console import console_script


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels or None)


def test_two_agents_in_one_process_have_their_own_registries():
    a, b = Metrics(), Metrics()
    clock = a.clock("add")
    clock.mark("ipam")
    clock.mark("dataplane")
    clock.done()
    assert sample(a, "netplugin_cni_add_seconds_count") == 1
    assert sample(a, "netplugin_cni_add_phase_seconds_count", phase="ipam") == 1
    assert sample(b, "netplugin_cni_add_seconds_count") == 0
    assert "ipam_ms=" in str(clock) and "dataplane_ms=" in str(clock)  # the log line bench_cni reads


def test_policy_phases_get_prometheus_label_values():
    m = Metrics()
    m.policy_applied(
        {"compile": 0.001, "read": 0.002, "ipset": 0.003, "IPv4": 0.004, "IPv6": 0.005, "ipset-destroy": 0.001}
    )
    for phase in ("compile", "read", "ipset", "iptables_restore_ipv4", "iptables_restore_ipv6", "ipset_destroy"):
        assert sample(m, "netplugin_policy_sync_phase_seconds_count", phase=phase) == 1, phase
    assert sample(m, "netplugin_policy_sync_seconds_sum") == pytest.approx(0.016)
    assert _phase_label("IPv4 nat") == "iptables_restore_ipv4_nat"


def test_watch_lag_is_observed_once_per_event_when_a_sync_covers_its_revision():
    m = Metrics()
    lag = WatchLag(m.watch_lag_seconds)
    lag.received(10)
    lag.received(12)
    lag.applied(11)
    assert sample(m, "netplugin_watch_lag_seconds_count") == 1
    lag.applied(11)
    assert sample(m, "netplugin_watch_lag_seconds_count") == 1
    lag.applied(12)
    assert sample(m, "netplugin_watch_lag_seconds_count") == 2


@pytest.mark.parametrize(
    "value,want", [("127.0.0.1:9469", ("127.0.0.1", 9469)), ("[::1]:9469", ("::1", 9469)), (":9469", ("0.0.0.0", 9469))]
)
def test_parse_listen(value, want):
    assert parse_listen(value) == want


@pytest.mark.parametrize("value", ["9469", "host:", "host:0", "host:70000", "host:port"])
def test_parse_listen_refuses(value):
    with pytest.raises(InvalidInput, match="must be ADDR:PORT"):
        parse_listen(value)


def test_probes_answer_from_the_one_health_answer():
    answers = {"ok": False, "threads_dead": [], "problems": ["BIRD is not running"]}
    app = create_ops_app(Metrics().registry, lambda: answers)
    seen = []

    def call(path):
        body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda s, h: seen.append(s)))
        return seen[-1], body

    assert call("/readyz")[0].startswith("503") and b"BIRD is not running" in call("/readyz")[1]
    assert call("/livez")[0].startswith("200")
    answers.update(ok=True, threads_dead=["sync"])
    assert call("/readyz")[0].startswith("200") and call("/livez")[0].startswith("503")
    status, body = call("/metrics")
    assert status.startswith("200") and b"netplugin_cni_add_seconds" in body


def test_metrics_listen_is_a_config_file_key():
    assert (
        default_map(agent_command, {"hostname": "h", "metrics_listen": "127.0.0.1:9469"}, "a.toml")["metrics_listen"]
        == "127.0.0.1:9469"
    )


def test_a_bad_metrics_listen_is_one_line_and_exit_1(tmp_path):
    p = subprocess.run(
        [
            console_script("netplugin"),
            "agent",
            "--hostname",
            "h",
            "--run-dir",
            str(tmp_path / "run"),
            "--metrics-listen",
            "nowhere",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 1 and p.stderr.startswith("netplugin: error: --metrics-listen 'nowhere'"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_exposition_names_follow_the_conventions():
    text = generate_latest(Metrics().registry).decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    for name in names:
        assert name.startswith("netplugin_"), name
    assert {"netplugin_errors_total", "netplugin_fallbacks_total", "netplugin_reclaimed_addresses_total"} <= {
        n + "_total" for n in names
    } | names
