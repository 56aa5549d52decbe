"""``netctl install`` then ``netctl uninstall`` on a throwaway host (a namespace and its own root directory), with
a real agent in between making chains, ipsets, routes and a veth: afterwards the files, every iptables table of
both families and the routes are exactly as before, and what others had there is untouched."""

import hashlib
import os
import re
import subprocess

import pytest

from netplugin.ipam.allocator import IPAM
from netplugin.lab.agents import AgentProcess, CniBinary
from netplugin.lab.console import console_script
from netplugin.lab.netns import nsexec
from tests.waiting import poll

pytestmark = pytest.mark.functional

POOL = "10.77.0.0/24"
POLICY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-doc-net, namespace: default}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 192.0.2.0/24}}]}]
"""


def netctl(endpoint, *args):
    p = subprocess.run(
        [console_script("netctl"), "--etcd-endpoints", endpoint, *args], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p.stdout


def tree(root):
    """Every path under ``root`` with its type, mode and (for files) SHA-256."""
    out = []
    for d, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(d, name)
            st = os.lstat(path)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else "-"
            out.append(f"{os.path.relpath(path, root)} {oct(st.st_mode)} {digest}")
    return sorted(out)


def kernel(ns):
    """Both families' iptables tables without counters, ipset names, routes of every table, link names."""
    out = {}
    for prog in ("iptables-save", "ip6tables-save"):
        text = nsexec(ns, [prog]).stdout
        out[prog] = [re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines() if not line.startswith("#")]
    out["ipsets"] = sorted(nsexec(ns, "ipset list -n").stdout.split())
    for fam in ("-4", "-6"):
        out[f"routes{fam}"] = sorted(nsexec(ns, f"ip {fam} route show table all").stdout.splitlines())
    out["links"] = sorted(
        line.split(":")[1].strip().split("@")[0] for line in nsexec(ns, "ip -o link").stdout.splitlines()
    )
    return out


def foreign_state(ns, root):
    """Things of others our install and uninstall must leave alone."""
    for path, text in (
        ("opt/cni/bin/bridge", "#!/bin/sh\n"),
        ("etc/cni/net.d/99-other.conflist", "{}\n"),
        ("etc/hostname", "box\n"),
    ):
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(root, path), "w") as f:
            f.write(text)
    nsexec(ns, "iptables -N OTHER")
    nsexec(ns, "iptables -A FORWARD -j OTHER")
    nsexec(ns, "ip6tables -t nat -N OTHER6")
    nsexec(ns, "ipset create other-set hash:ip")
    nsexec(ns, "ip route add blackhole 198.51.100.0/24 proto static")


def test_install_agent_uninstall_leaves_files_tables_and_routes_as_they_were(etcd, etcd_server, namespaces, tmp_path):
    ns = namespaces.add()
    etcd_server.bridge_into(ns)
    root = str(tmp_path / "root")
    run_dir = str(tmp_path / "run")
    foreign_state(ns, root)
    files_before, kernel_before = tree(root), kernel(ns)

    out = netctl(
        etcd_server.endpoint,
        "install",
        "--root",
        root,
        "--hostname",
        ns,
        "--run-dir",
        run_dir,
        "--docker-socket",
        "",
        "--no-systemctl",
    )
    unit = open(os.path.join(root, "etc/systemd/system/netplugin.service")).read()
    assert "Before=docker.service" in unit and "Restart=on-failure" in unit, unit
    assert re.search(r"^ExecStart=/\S+/netplugin agent --config /etc/netplugin/agent.toml$", unit, re.M), unit
    for path in ("opt/cni/bin/netplugin", "etc/cni/net.d/10-netplugin.conflist", "etc/netplugin/agent.toml"):
        assert f"installed {os.path.join(root, path)}" in out, out
    assert "systemctl" not in out

    IPAM(etcd).add_pool(POOL)
    (tmp_path / "policy.yaml").write_text(POLICY)
    netctl(etcd_server.endpoint, "policy", "apply", "-f", str(tmp_path / "policy.yaml"))
    agent = AgentProcess(
        ns, ns, etcd_server.endpoint, run_dir, extra_args=["--config", os.path.join(root, "etc/netplugin/agent.toml")]
    )
    try:
        agent.start()
        cni = CniBinary(str(tmp_path / "cni"), agent.socket, pools=[POOL])
        container = namespaces.add()
        rc, result, err = cni.call("ADD", container, f"/run/netns/{container}")
        assert rc == 0, (result, err, agent.log())
        made = poll(
            lambda: next((k for k in [kernel(ns)] if any(s.startswith("np-") for s in k["ipsets"])), None), timeout=20
        )
        assert made, agent.log()
    finally:
        agent.stop()
    # The agent leaves its state when it stops (containers keep working): uninstall is what removes it.
    assert any(":np-" in line for line in made["iptables-save"]), made["iptables-save"]
    assert any("proto 80" in r for r in made["routes-4"]), made["routes-4"]
    assert any(link.startswith("np") for link in made["links"]), made["links"]
    assert made != kernel_before

    bpffs = tmp_path / "bpf"  # a stand-in for the agent's bpffs directory (a plain one: pins are files in it)
    (bpffs / "maps").mkdir(parents=True)
    (bpffs / "maps" / "np_flows").write_text("")
    out = netctl(
        etcd_server.endpoint,
        "uninstall",
        "--root",
        root,
        "--netns",
        ns,
        "--remove-endpoints",
        "--bpffs-dir",
        str(bpffs),
        "--no-systemctl",
    )
    assert tree(root) == files_before, out
    after = kernel(ns)
    for part in kernel_before:
        assert after[part] == kernel_before[part], (part, out)
    assert not bpffs.exists()
    assert "OTHER" in " ".join(after["iptables-save"]) and "other-set" in after["ipsets"]

    # A second uninstall finds nothing to do and fails on nothing.
    out = netctl(etcd_server.endpoint, "uninstall", "--root", root, "--netns", ns, "--no-systemctl")
    assert out == "", out


def test_uninstall_keeps_an_installed_file_the_operator_changed_and_a_config_it_did_not_write(tmp_path):
    root = str(tmp_path / "root")
    conf = os.path.join(root, "etc/netplugin/agent.toml")
    os.makedirs(os.path.dirname(conf))
    with open(conf, "w") as f:
        f.write('hostname = "mine"\n')
    out = netctl("http://127.0.0.1:1", "install", "--root", root, "--no-systemctl")
    assert f"kept the existing {conf}" in out, out
    assert netctl("http://127.0.0.1:1", "install", "--root", root, "--no-systemctl") == out  # idempotent
    conflist = os.path.join(root, "etc/cni/net.d/10-netplugin.conflist")
    with open(conflist, "a") as f:
        f.write("\n")
    out = netctl("http://127.0.0.1:1", "uninstall", "--root", root, "--keep-kernel-state", "--no-systemctl")
    assert f"kept {conflist} (changed since install; --force removes it)" in out, out
    assert open(conf).read() == 'hostname = "mine"\n'
    assert not os.path.exists(os.path.join(root, "etc/systemd/system/netplugin.service"))
    out = netctl("http://127.0.0.1:1", "uninstall", "--root", root, "--keep-kernel-state", "--force", "--no-systemctl")
    assert not os.path.exists(conflist) and os.path.exists(conf), out


def test_reinstall_keeps_the_operators_edits_of_the_installed_config(tmp_path):
    root = str(tmp_path / "root")
    os.mkdir(root)
    conf = os.path.join(root, "etc/netplugin/agent.toml")
    netctl("http://127.0.0.1:1", "install", "--root", root, "--no-systemctl")
    with open(conf, "a") as f:
        f.write("mtu = 1400\n")
    netctl("http://127.0.0.1:1", "install", "--root", root, "--no-systemctl")
    assert open(conf).read().endswith("mtu = 1400\n")
    out = netctl("http://127.0.0.1:1", "uninstall", "--root", root, "--keep-kernel-state", "--no-systemctl")
    assert f"kept {conf} (changed since install" in out and os.listdir(root) == ["etc", "var"], out
