"""Debian's libcni itself runs the conflist ``netctl install-cni`` writes: the library (1.1.2) its podman,
containerd and cri-o build on, not only our own calls of the binary.

``cnitool`` (tests/libcni/cnitool.go) is a minimal runtime on that library, built once per session from the
sources Debian ships (golang-github-appc-cni-dev under /usr/share/gocode, golang-go; no network). Each test runs a
real agent in a host namespace and ADD / CHECK / DEL against a container namespace made here; libcni's result
cache goes to the test's own directory.
"""

import json
import os
import shutil
import subprocess

import pytest

from netplugin.datastore import keys
from netplugin.ipam.allocator import IPAM
from netplugin.lab.agents import rmtree, tempdir
from netplugin.lab.netns import nsexec, run
from tests.agents import netctl_install_cni
from tests.waiting import wait_until

pytestmark = pytest.mark.functional

GOPATH = "/usr/share/gocode"  # where golang-github-appc-cni-dev puts libcni's sources
LIBCNI = os.path.join(GOPATH, "src", "github.com", "containernetworking", "cni", "libcni")
SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "libcni", "cnitool.go")
NETWORK = "libcninet"
POOL4, POOL6 = "10.75.0.0/24", "fd00:75::/112"
HOST4, HOST6 = "10.254.75.1", "fd00:fe75::1"


@pytest.fixture(scope="session")
def cnitool():
    """The path of cnitool, built from Debian's libcni sources into a directory removed after the session."""
    if not shutil.which("go") or not os.path.isdir(LIBCNI):
        pytest.fail("cnitool needs Debian's golang-go and golang-github-appc-cni-dev: run scripts/setup.sh")
    workdir = tempdir("npt-cnitool-")
    try:
        env = dict(
            os.environ, GO111MODULE="off", GOPATH=GOPATH, GOCACHE=os.path.join(workdir, "cache"), CGO_ENABLED="0"
        )
        tool = os.path.join(workdir, "cnitool")
        run(["go", "build", "-o", tool, SOURCE], env=env, timeout=300)
        yield tool
    finally:
        rmtree(workdir)


@pytest.fixture
def libcni_host(etcd, host_factory, namespaces, cnitool):
    """An agent with a dual-stack pool pair, a container namespace, and ``install(*args)``: ``netctl install-cni``
    into the test's directories, returning (conflist, call) where ``call(command)`` runs cnitool on it."""
    ipam = IPAM(etcd)
    ipam.add_pool(POOL4)
    ipam.add_pool(POOL6)
    agent = host_factory()
    nsexec(agent.netns, f"ip addr add {HOST4}/32 dev lo")
    nsexec(agent.netns, f"ip addr add {HOST6}/128 dev lo nodad")
    container = namespaces.add()
    workdir = tempdir("npt-libcni-")
    bin_dir, conf_dir = os.path.join(workdir, "bin"), os.path.join(workdir, "net.d")

    def install(*options):
        conflist = netctl_install_cni(bin_dir, conf_dir, NETWORK, agent.socket, *options)

        def call(command):
            env = dict(
                os.environ,
                NETCONFPATH=conf_dir,
                CNI_PATH=f"{bin_dir}:/usr/lib/cni",
                CNI_CACHE_DIR=os.path.join(workdir, "cache"),
            )
            return subprocess.run(
                [cnitool, command, NETWORK, f"/run/netns/{container}"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        return conflist, call

    try:
        yield agent, container, install
    finally:
        rmtree(workdir)


def _pings(ns, dst):
    return nsexec(ns, ["ping", "-c", "1", "-W", "2", dst], check=False).returncode == 0


def test_libcni_adds_checks_and_deletes_a_dual_stack_container_with_the_default_conflist(libcni_host, etcd):
    agent, container, install = libcni_host
    conflist, call = install("--ipv6", "--pool", POOL4)
    assert conflist["cniVersion"] == "1.0.0"

    added = call("add")
    assert added.returncode == 0, added.stderr
    result = json.loads(added.stdout)
    assert result["cniVersion"] == "1.0.0"
    addresses = sorted(ip["address"] for ip in result["ips"])
    assert len(addresses) == 2 and addresses[0].startswith("10.75.0.") and addresses[1].startswith("fd00:75::")
    inside = nsexec(container, "ip -o addr show dev eth0").stdout
    assert all(a in inside for a in addresses), inside
    for address in addresses:
        assert _pings(agent.netns, address.split("/")[0]), f"host cannot reach the container at {address}"
    assert _pings(container, HOST4) and _pings(container, HOST6)

    checked = call("check")
    assert checked.returncode == 0, checked.stderr

    deleted = call("del")
    assert deleted.returncode == 0, deleted.stderr
    assert etcd.list(keys.ENDPOINTS) == [] and etcd.list(keys.HANDLES) == []
    # The agent deletes the veth pair right after DEL answers (netplugin/dataplane/reaper.py).
    wait_until("eth0 deleted", lambda: "eth0" not in nsexec(container, "ip -o link show").stdout, timeout=5)
    assert call("del").returncode == 0  # DEL is idempotent through libcni too


def test_libcni_refuses_a_1_1_0_conflist_which_is_why_it_is_not_the_default(libcni_host, etcd):
    """Debian 12's libcni cannot read a 1.1.0 result: ``--cni-version 1.1.0`` is for runtimes on libcni >= 1.2."""
    _, _, install = libcni_host
    conflist, call = install("--cni-version", "1.1.0")
    assert conflist["cniVersion"] == "1.1.0"
    added = call("add")
    assert added.returncode == 1
    assert 'unsupported CNI result version "1.1.0"' in added.stderr, added.stderr
    # the runtime's answer to a failed ADD is DEL: it leaves nothing behind
    assert call("del").returncode == 0
    assert etcd.list(keys.ENDPOINTS) == [] and etcd.list(keys.HANDLES) == []
