"""podman drives the installed plugin end to end: Debian's podman 4.3 with its CNI backend, run inside a test host
namespace with ``nsenter --net=``, its own root, runroot, tmpdir and network config dir, and our agent's socket.

How podman is pointed at our files (podman 4.3 has no --cni-plugin-dir flag): CONTAINERS_CONF names a
containers.conf whose ``[network]`` section sets ``network_backend = "cni"`` and ``cni_plugin_dirs`` (the
installed binary's directory, then /usr/lib/cni); ``--cni-config-dir`` and ``--network-backend cni`` are given
too. The conflist is what ``netctl install-cni`` writes by default (cniVersion 1.0.0: podman 4.3's libcni, 1.1.2,
cannot read 1.1.0 results, as a test shows). The image is made offline:
``podman import`` of a tar holding Debian's static busybox. ``--ulimit nofile/nproc=1024`` because the runtime
refuses the machine's own (much higher) limits inside this sandbox.

What stays outside the test's directories: libcni's result cache (/var/lib/cni/results, emptied again by
DEL) and containers/image's blob-info cache (/var/lib/containers/cache) — podman 4.3 has no option to move them.
"""

import os
import shutil
import subprocess
import tarfile
import time

import pytest

from netplugin.dataplane import host_ifname
from netplugin.datastore import keys
from netplugin.ipam.allocator import IPAM
from netplugin.lab.agents import rmtree, tempdir
from netplugin.lab.netns import nsexec, run
from netplugin.service.endpoints import endpoint_id
from tests.agents import netctl_install_cni
from tests.waiting import wait_until

pytestmark = pytest.mark.functional

BUSYBOX = "/bin/busybox"  # Debian's busybox-static (scripts/setup.sh installs it)
POOL = "10.74.0.0/24"
NETWORK = "podnet"
HOST_ADDR = "10.254.74.1"
IMAGE = "localhost/np-busybox:latest"
APPLETS = ("sh", "sleep", "ip", "ping", "cat")


def _missing():
    if not shutil.which("podman"):
        return "podman is not installed (Debian package podman; scripts/setup.sh installs it)"
    status = run(["dpkg-query", "-W", "-f=${Status}", "busybox-static"], check=False).stdout
    if "install ok installed" not in status or not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} from Debian's busybox-static is missing (scripts/setup.sh installs it)"
    return None


class Podman:
    """podman confined to one work directory and run inside the host namespace ``netns``."""

    def __init__(self, netns, workdir, bin_dir, conf_dir):
        self.netns = netns
        self.bin_dir, self.conf_dir = bin_dir, conf_dir
        self.workdir = workdir
        self.conf = os.path.join(workdir, "containers.conf")
        with open(self.conf, "w") as f:
            f.write(
                "[network]\n"
                'network_backend = "cni"\n'
                f'cni_plugin_dirs = ["{bin_dir}", "/usr/lib/cni"]\n'
                f'network_config_dir = "{conf_dir}"\n'
            )
        self.base = [
            "nsenter",
            f"--net=/run/netns/{netns}",
            "podman",
            "--root",
            os.path.join(workdir, "root"),
            "--runroot",
            os.path.join(workdir, "runroot"),
            "--tmpdir",
            os.path.join(workdir, "tmp"),
            "--cni-config-dir",
            conf_dir,
            "--network-backend",
            "cni",
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
        ]
        self.env = dict(os.environ, CONTAINERS_CONF=self.conf)

    def __call__(self, *args, check=True, timeout=60):
        p = subprocess.run(self.base + list(args), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def make_image(self):
        """A busybox image from a tar made here: nothing is pulled."""
        tar = os.path.join(self.workdir, "busybox.tar")
        with tarfile.open(tar, "w") as t:
            t.add(BUSYBOX, arcname="bin/busybox")
            for applet in APPLETS:
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                t.addfile(info)
        self("import", tar, IMAGE)

    def close(self):
        """Remove every container (their CNI DELs run now), then unmount whatever podman left mounted."""
        try:
            self("rm", "--all", "--force", "--time", "0", check=False, timeout=60)
        finally:
            with open("/proc/self/mounts") as f:
                mounts = [line.split()[1] for line in f]
            for mount in sorted((m for m in mounts if m.startswith(self.workdir + "/")), key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True)


@pytest.fixture
def podman_host(etcd, host_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    IPAM(etcd).add_pool(POOL)
    agent = host_factory()
    nsexec(agent.netns, f"ip addr add {HOST_ADDR}/32 dev lo")  # the host's own address
    workdir = tempdir("npt-podman-")
    podman = None
    try:
        bin_dir, conf_dir = os.path.join(workdir, "bin"), os.path.join(workdir, "net.d")
        assert netctl_install_cni(bin_dir, conf_dir, NETWORK, agent.socket, "--pool", POOL)["cniVersion"] == "1.0.0"
        podman = Podman(agent.netns, workdir, bin_dir, conf_dir)
        podman.make_image()
        yield agent, podman
    finally:
        if podman:
            podman.close()
        rmtree(workdir)


def _run(podman, name, *extra):
    p = podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        NETWORK,
        *extra,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        IMAGE,
        "/bin/sleep",
        "120",
    )
    return p.stdout.strip()


def _reaches(netns_cmd, dst, seconds=5.0):
    """One echo at a time until answered or ``seconds`` pass (the policy sync admits a new veth a few ms after
    its ADD returned)."""
    deadline = time.monotonic() + seconds
    while True:
        if subprocess.run(netns_cmd + ["ping", "-c", "1", "-W", "1", dst], capture_output=True).returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False


def test_podman_runs_a_container_on_a_netplugin_network_with_the_address_it_asked_for(podman_host, etcd):
    agent, podman = podman_host
    listed = podman("network", "ls", "--format", "{{.Name}} {{.Driver}}").stdout.split("\n")
    assert f"{NETWORK} netplugin" in listed

    cid = _run(podman, "web", "--ip", "10.74.0.77")
    _run(podman, "db")
    inet = podman("exec", "web", "/bin/ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
    assert "inet 10.74.0.77/32" in inet, inet
    route = podman("exec", "web", "/bin/ip", "route").stdout
    assert "default via 169.254.1.1 dev eth0" in route, route

    # Reachable from the host namespace podman runs in, and the two containers reach each other and the host.
    assert _reaches(["ip", "netns", "exec", agent.netns], "10.74.0.77")
    other_ip = podman(
        "inspect", "--format", f"{{{{.NetworkSettings.Networks.{NETWORK}.IPAddress}}}}", "db"
    ).stdout.strip()
    assert other_ip.startswith("10.74.0.") and other_ip != "10.74.0.77"
    for name, dst in (("web", other_ip), ("db", "10.74.0.77"), ("web", HOST_ADDR)):
        p = podman("exec", name, "/bin/ping", "-c", "2", "-W", "1", dst, check=False)
        assert p.returncode == 0, f"{name} cannot reach {dst}: {p.stdout}{p.stderr}"

    # podman's container id and netns went to the agent; the endpoint record is in etcd.
    ep_id = endpoint_id(NETWORK, cid, "eth0")
    kv = etcd.get(keys.endpoint(agent.hostname, ep_id))
    assert kv and kv.value["addresses"] == ["10.74.0.77/32"] and kv.value["container_id"] == cid
    assert kv.value["netns"].startswith("/run/netns/")
    assert host_ifname(ep_id) in nsexec(agent.netns, "ip -o link show").stdout

    # Removing the containers is CNI DEL: veths, routes, records and addresses go.
    podman("rm", "--force", "--time", "0", "web", "db")
    assert etcd.list(keys.ENDPOINTS) == [] and etcd.list(keys.HANDLES) == []
    no_veths(agent)
    assert nsexec(agent.netns, "ip -4 route show proto 80").stdout.strip().startswith("blackhole")


def no_veths(agent):
    """No veth of ours left: the agent deletes them right after DEL answers (netplugin/dataplane/reaper.py)."""
    wait_until(
        "the veths deleted",
        lambda: not [line for line in nsexec(agent.netns, "ip -o link show").stdout.splitlines() if ": np" in line],
        timeout=5,
    )


def test_podman_refuses_a_1_1_0_conflist_which_is_why_it_is_not_the_default(podman_host, etcd):
    agent, podman = podman_host
    netctl_install_cni(
        podman.bin_dir, podman.conf_dir, "podnet11", agent.socket, "--pool", POOL, "--cni-version", "1.1.0"
    )
    p = podman(
        "run",
        "--rm",
        "--network",
        "podnet11",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        IMAGE,
        "/bin/true",
        check=False,
    )
    assert p.returncode != 0
    assert 'unsupported CNI result version "1.1.0"' in p.stderr, p.stderr
    # podman answers the failed ADD with DEL: nothing is left behind
    assert etcd.list(keys.ENDPOINTS) == [] and etcd.list(keys.HANDLES) == []
    no_veths(agent)
