"""``netctl diags`` against a real agent with BGP (BIRD running) in a throwaway host, etcd with a password read
from a file and a BGP peer with a password: the tarball unpacks, holds every part, and neither secret appears
anywhere in it."""

import json
import os
import subprocess
import tarfile

import pytest

from netplugin.lab.agents import AgentProcess
from netplugin.lab.console import console_script
from netplugin.lab.netns import nsexec
from tests.functional.test_secrets import auth_etcd  # noqa: F401 (fixture)
from tests.waiting import poll

pytestmark = pytest.mark.functional

ETCD_PASSWORD = "pw-in-a-file"
BGP_PASSWORD = "bgp-Secret-42"
PARTS = (
    "agent.log",
    "etcd.json",
    "iptables-save.txt",
    "ip6tables-save.txt",
    "ipset-list.txt",
    "ip-addr.txt",
    "ip-route-4.txt",
    "ip-route-6.txt",
    "ip-rule-4.txt",
    "ip-rule-6.txt",
    "bird-protocols.txt",
    "bird.conf",
    "health.json",
    "versions.txt",
    "metrics.txt",
)


def test_diags_tarball_holds_every_part_and_no_secret(auth_etcd, namespaces, tmp_path):
    pw = tmp_path / "etcd-password"
    pw.write_text(ETCD_PASSWORD + "\n")
    pw.chmod(0o600)
    auth = ["--etcd-endpoints", auth_etcd.endpoint, "--etcd-user", "root", "--etcd-password-file", str(pw)]

    def netctl(*args):
        p = subprocess.run(
            [console_script("netctl"), *auth, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert p.returncode == 0, (args, p.stdout, p.stderr)
        return p

    netctl("pool", "add", "10.79.0.0/24")
    netctl("bgp", "peer", "add", "tor", "--address", "10.96.0.254", "--as-number", "65010", "--password", BGP_PASSWORD)
    ns = namespaces.add()
    auth_etcd.bridge_into(ns)
    nsexec(ns, "ip addr add 10.96.0.1/32 dev lo")
    nsexec(ns, "ipset create diag-probe hash:ip")  # no endpoint, so no set of the agent's: one of ours to list
    run_dir = str(tmp_path / "run")
    agent = AgentProcess(
        ns,
        ns,
        auth_etcd.endpoint,
        run_dir,
        extra_args=[
            "--etcd-user",
            "root",
            "--etcd-password-file",
            str(pw),
            "--routing",
            "bgp",
            "--node-address",
            "10.96.0.1",
            "--metrics-listen",
            "10.96.0.1:9469",
        ],
    )
    try:
        agent.start()
        conf = os.path.join(run_dir, "bird", "bird.conf")
        assert poll(lambda: os.path.exists(conf) and BGP_PASSWORD in open(conf).read(), timeout=20), agent.log()
        out = tmp_path / "diags.tar.gz"
        p = netctl("diags", "--netns", ns, "--run-dir", run_dir, "--log-file", agent.log_path, "-o", str(out))
    finally:
        agent.stop()
    assert "missing" not in p.stderr, p.stderr
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"
    unpacked = tmp_path / "unpacked"
    with tarfile.open(out) as tar:
        tar.extractall(unpacked, filter="data")
    [top] = os.listdir(unpacked)
    got = {name: (unpacked / top / name).read_text() for name in os.listdir(unpacked / top)}
    for part in PARTS:
        assert got.get(part, "").strip(), (part, sorted(got), got.get("errors.txt"))
    assert "errors.txt" not in got, got["errors.txt"]

    etcd = json.loads(got["etcd.json"])
    peers = [v for k, v in etcd.items() if "/bgp/" in k and isinstance(v, dict) and "password" in v]
    assert peers and all(v["password"] == "***" for v in peers), etcd
    assert 'password "***"' in got["bird.conf"] and "10.96.0.254" in got["bird.conf"], got["bird.conf"]
    assert "np-" in got["iptables-save.txt"] and "BGP" in got["bird-protocols.txt"]
    assert json.loads(got["health.json"]).get("host") == ns
    assert "netplugin_sync_seconds_count" in got["metrics.txt"], got["metrics.txt"][:500]
    assert got["versions.txt"].startswith("netplugin ") and "bird" in got["versions.txt"]
    assert "10.96.0.1" in got["ip-addr.txt"] and "Name: diag-probe" in got["ipset-list.txt"]
    for secret in (ETCD_PASSWORD, BGP_PASSWORD):
        hits = subprocess.run(["grep", "-rl", secret, str(unpacked)], capture_output=True, text=True)
        assert hits.returncode == 1, (secret, hits.stdout)
        assert secret.encode() not in out.read_bytes()
