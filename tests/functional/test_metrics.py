"""A real Prometheus (Debian's package) scrapes the metrics listeners of two agents of a 3-host lab mesh.

Prometheus runs inside the first host's namespace and scrapes both agents over the lab's segment addresses,
every second; the test asks its HTTP API from inside that namespace too (tests/nshttp.py).
"""

import os
import shutil
import subprocess
import uuid

import pytest

from netplugin.errors import NetpluginError
from netplugin.lab import Lab, LabSpec
from netplugin.lab.netns import stop_process
from netplugin.lab.agents import rmtree, tempdir
from tests.nshttp import get, promql
from tests.waiting import wait_until

pytestmark = pytest.mark.functional

METRICS_PORT = 9469
PROM_PORT = 9090
POLICY = """apiVersion: netplugin/v1
kind: Policy
metadata: {name: metrics-test}
spec:
  order: 10
  selector: {}
  ingress: [{action: deny, from: [{cidr: 198.51.100.0/24}]}]
"""


@pytest.fixture(scope="module")
def lab():
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (scripts/setup.sh installs it)")
    lab = Lab.up(LabSpec(name=f"mx{uuid.uuid4().hex[:6]}", hosts=3))
    try:
        for h in lab.plan.hosts[:2]:
            lab.restart_agent(h.name, ["--metrics-listen", f"{h.address}:{METRICS_PORT}"])
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def prometheus(lab):
    """Prometheus in h1's namespace scraping h1's and h2's agents; yields the namespace to query from."""
    ns = lab.plan.hosts[0].namespace
    targets = ", ".join(f"'{h.address}:{METRICS_PORT}'" for h in lab.plan.hosts[:2])
    workdir = tempdir("npt-prom-")
    config = os.path.join(workdir, "prometheus.yml")
    with open(config, "w") as f:
        f.write(
            f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
            f"scrape_configs:\n- job_name: netplugin\n  static_configs:\n  - targets: [{targets}]\n"
        )
    log = open(os.path.join(workdir, "prometheus.log"), "w")
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={os.path.join(workdir, 'data')}",
            f"--web.listen-address=127.0.0.1:{PROM_PORT}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until("Prometheus ready", lambda: _ready(ns), timeout=30, step=0.2)
        wait_until("both agents scraped", lambda: len(promql(ns, PROM_PORT, "up == 1")) == 2, timeout=20, step=0.5)
        yield ns
    finally:
        stop_process(proc, timeout=10)
        log.close()
        rmtree(workdir)


def _ready(ns):
    try:
        return get(ns, "127.0.0.1", PROM_PORT, "/-/ready")[0] == 200
    except (OSError, NetpluginError):  # connection refused while it starts
        return False


def value(ns, query):
    """{instance: float} of an instant query."""
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in promql(ns, PROM_PORT, query)}


def test_add_histogram_after_containers_are_added(lab, prometheus):
    for h in lab.plan.hosts[:2]:
        for i in range(2):
            lab.run_container(h.name, f"{h.name}m{i}")
    counts = wait_until(
        "ADDs counted on both agents",
        lambda: (lambda v: len(v) == 2 and all(n >= 2 for n in v.values()) and v)(
            value(prometheus, "netplugin_cni_add_seconds_count")
        ),
        timeout=20,
        step=0.5,
    )
    p90 = value(prometheus, "histogram_quantile(0.9, sum by (instance, le) (netplugin_cni_add_seconds_bucket))")
    phases = value(prometheus, 'sum by (instance) (netplugin_cni_add_phase_seconds_count{phase="ipam"})')
    assert len(p90) == 2 and all(0 < s < 30 for s in p90.values()), p90
    assert phases == counts, (phases, counts)
    local = wait_until(
        "2 local endpoints per agent",
        lambda: (lambda v: set(v.values()) == {2.0} and v)(value(prometheus, 'netplugin_endpoints{scope="local"}')),
        timeout=10,
        step=0.5,
    )
    blocks = value(prometheus, "sum by (instance) (netplugin_ipam_blocks)")
    print(f"\nlocal endpoints {local}, IPAM blocks {blocks}")
    assert len(blocks) == 2 and all(n >= 2 for n in blocks.values()), blocks  # h1's and h2's blocks at least
    print(f"\nADD count per agent {counts}; p90 {p90}")


def test_policy_sync_histogram_after_a_policy_apply(lab, prometheus):
    query = "netplugin_policy_sync_seconds_count"
    before = value(prometheus, query)
    lab.netctl("policy", "apply", "-f", "-", input=POLICY)
    after = wait_until(
        "a policy sync observed on both agents",
        lambda: (lambda v: len(v) == 2 and all(v[i] > before.get(i, 0) for i in v) and v)(value(prometheus, query)),
        timeout=20,
        step=0.5,
    )
    restore = value(
        prometheus, 'sum by (instance) (netplugin_policy_sync_phase_seconds_count{phase="iptables_restore_ipv4"})'
    )
    assert len(restore) == 2 and all(n > 0 for n in restore.values()), restore
    revoke = value(prometheus, 'sum by (instance) (netplugin_policy_sync_phase_seconds_count{phase="revoke"})')
    assert len(revoke) == 2 and all(n > 0 for n in revoke.values()), revoke  # the conntrack sweep ran
    revoked = value(prometheus, "netplugin_flows_revoked_total")
    assert len(revoked) == 2, revoked
    print(f"\npolicy syncs {before} -> {after}; connections revoked {revoked}")


def test_bgp_sessions_established_on_a_3_host_mesh(lab, prometheus):
    established = wait_until(
        "2 Established sessions per agent",
        lambda: (lambda v: len(v) == 2 and set(v.values()) == {2.0} and v)(
            value(prometheus, 'netplugin_bgp_sessions{state="Established"}')
        ),
        timeout=30,
        step=0.5,
    )
    assert established
    took = value(prometheus, "scrape_duration_seconds")
    print(f"\nEstablished sessions {established}; scrape took {took} s (a birdc and a blocks read each)")


def test_readyz_and_livez_answer_on_the_metrics_listener(lab):
    h = lab.plan.hosts[1]
    for path in ("/readyz", "/livez"):
        status, body = get(lab.plan.hosts[0].namespace, h.address, METRICS_PORT, path)
        assert status == 200 and '"probe_ok": true' in body, (path, status, body)
