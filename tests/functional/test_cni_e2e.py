"""The CNI plugin end to end: the installed binary, called exactly as a runtime calls it (CNI_* environment,
the network config on stdin), talking to a real agent that runs in a throwaway host namespace against a real
etcd. Containers are network namespaces; traffic goes only between namespaces made here.

One agent serves the whole module (starting one costs about a second); every test makes its own container
namespaces and DELs whatever it ADDed when it ends, so tests do not see each other's containers.
"""

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import time

import pytest

from netplugin.config import EtcdConfig
from netplugin.datastore import keys
from netplugin.datastore.client import Datastore
from netplugin.dataplane import host_ifname
from netplugin.ipam.allocator import IPAM
from netplugin.service.endpoints import endpoint_id
from netplugin.lab.agents import AgentProcess, CniBinary, rmtree, tempdir
from netplugin.lab.console import console_script
from netplugin.lab.netns import NamespaceSet, nsexec, run
from tests.waiting import wait_until

pytestmark = pytest.mark.functional

NETWORK = "cninet"
POOL = "10.70.0.0/24"  # the module's network allocates only from here (ipam.pools in the conflist)
TINY_POOL = "10.71.0.0/32"  # one address: the second ADD on the tiny network finds the pool exhausted
OTHER_POOL = "10.72.0.0/24"
HOST_ADDR = "10.254.70.1"  # the host namespace's own address
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
ROUTE_PROTO = "80"


class Host:
    """The module's host namespace: an agent, the datastore it uses, and the plugin installed for NETWORK."""

    def __init__(self, ns, agent, ds, workdir):
        self.ns, self.agent, self.ds, self.workdir = ns, agent, ds, workdir
        self.cni = CniBinary(os.path.join(workdir, "main"), agent.socket, network=NETWORK, pools=[POOL])

    def binary(self, name, network, pools):
        return CniBinary(os.path.join(self.workdir, name), self.agent.socket, network=network, pools=pools)

    # --- what the host looks like ---------------------------------------------------------------------------------

    def links(self):
        """Interface names in the host namespace."""
        return {
            line.split(":")[1].strip().split("@")[0] for line in nsexec(self.ns, "ip -o link show").stdout.splitlines()
        }

    def veths(self):
        return {name for name in self.links() if name.startswith("np")}

    def routes(self):
        """Routes of our protocol in the host namespace, both families (blackholes included)."""
        out = []
        for family in ("-4", "-6"):
            out += nsexec(self.ns, f"ip {family} route show proto {ROUTE_PROTO}").stdout.splitlines()
        return sorted(line.strip() for line in out)

    def container_routes(self):
        return [r for r in self.routes() if not r.startswith("blackhole")]

    def ifindex(self, name):
        return int(nsexec(self.ns, f"cat /sys/class/net/{name}/ifindex").stdout)

    def dump(self):
        """Every key under /netplugin/ with its value, less the two the agent's heartbeat keeps on leases
        on its own schedule (liveness, reclaimer leadership): the cluster state an ADD or DEL could change."""
        return {
            kv.key: kv.value
            for kv in self.ds.list("/netplugin/")
            if not kv.key.startswith((keys.LIVENESS, keys.LEADER))
        }

    def state(self):
        """Everything an ADD could leave behind: etcd, host links, host routes."""
        return {"etcd": self.dump(), "links": sorted(self.links()), "routes": self.routes()}

    def endpoint(self, ep_id):
        kv = self.ds.get(keys.endpoint(self.agent.hostname, ep_id))
        return kv.value if kv else None

    def handle(self, ep_id):
        kv = self.ds.get(keys.handle(ep_id))
        return kv.value if kv else None

    def allocated(self):
        """Every address allocated in any block, with its handle."""
        out = {}
        for kv in self.ds.list(keys.BLOCKS):
            net = ipaddress.ip_network(kv.value["cidr"])
            for ordinal, alloc in kv.value.get("allocations", {}).items():
                out[str(net[int(ordinal)])] = alloc["handle"]
        return out


@contextlib.contextmanager
def agent_host(etcd_server, name, pools, host_addr=HOST_ADDR, workdir=None, extra_args=()):
    """A host namespace with an agent (``extra_args`` on its command line) and ``pools`` in a cleared etcd."""
    nss = NamespaceSet()
    workdir = workdir or tempdir()
    ds = Datastore(EtcdConfig(endpoints=[etcd_server.endpoint]))
    agent = None
    try:
        ds.delete_prefix("/netplugin/")
        ipam = IPAM(ds)
        for pool in pools:
            ipam.add_pool(pool)
        ns = nss.add()
        etcd_server.bridge_into(ns)
        # The host's own address sits on lo: this kernel has no dummy link type ("Unknown device type").
        nsexec(ns, f"ip addr add {host_addr}/32 dev lo")
        agent = AgentProcess(ns, name, etcd_server.endpoint, os.path.join(workdir, "run"), extra_args=extra_args)
        agent.start()
        yield Host(ns, agent, ds, workdir)
    finally:
        if agent:
            agent.stop()
        nss.close()
        ds.delete_prefix("/netplugin/")
        rmtree(workdir)


@pytest.fixture(scope="module")
def host(etcd_server):
    with agent_host(etcd_server, "cni-host", (POOL, TINY_POOL, OTHER_POOL)) as h:
        yield h


class Containers:
    """Container namespaces of one test. Every ADD is registered for a DEL before it runs; ``close`` DELs them
    all (DEL is idempotent) and removes the namespaces."""

    def __init__(self, host):
        self.host = host
        self.nss = NamespaceSet()
        self.added = []

    def new(self):
        return self.nss.add()

    def add(self, ns=None, cni=None, ifname="eth0", args="", config=None, check=True):
        """ADD ``ns`` (a new namespace if None); returns (namespace, result) or, with check=False,
        (namespace, rc, output)."""
        ns = ns or self.new()
        cni = cni or self.host.cni
        self.added.append((cni, ns, ifname, config))
        rc, out, err = cni.call("ADD", ns, f"/run/netns/{ns}", ifname, args=args, config=config)
        if check:
            assert rc == 0, f"ADD {ns} failed: {out} {err}\n{self.host.agent.log()[-3000:]}"
            return ns, out
        return ns, rc, out

    def delete(self, ns, cni=None, ifname="eth0", config=None):
        cni = cni or self.host.cni
        return cni.call("DEL", ns, f"/run/netns/{ns}", ifname, config=config)

    def close(self):
        for cni, ns, ifname, config in reversed(self.added):
            try:
                cni.call("DEL", ns, f"/run/netns/{ns}", ifname, config=config)
            except Exception:  # noqa: BLE001 - teardown goes on; the namespace goes anyway
                pass
        self.nss.close()


@pytest.fixture
def containers(host):
    c = Containers(host)
    try:
        yield c
    finally:
        c.close()


def address(result, index=0):
    return result["ips"][index]["address"].split("/")[0]


def pings(ns, dst, count=2):
    p = nsexec(ns, ["ping", "-c", str(count), "-i", "0.2", "-W", "1", "-q", dst], check=False)
    return p.returncode == 0


def pings_within(ns, dst, seconds):
    """Answered within ``seconds``, one probe at a time. For checks right after a burst of ADDs: the agent's
    policy sync admits a new veth some milliseconds after its ADD returned (reported; see test_agent.py)."""
    deadline = time.monotonic() + seconds
    while True:
        if pings(ns, dst, count=1):
            return True
        if time.monotonic() > deadline:
            return False


def container_addresses(ns, ifname="eth0"):
    out = nsexec(ns, f"ip -o -4 addr show dev {ifname}", check=False).stdout
    return [line.split()[3] for line in out.splitlines()]


def assert_cni_error(rc, out, code, *words):
    """The spec's error object (and nothing else) on stdout, exit status 1, a message saying what failed."""
    assert rc == 1, out
    assert set(out) <= {"cniVersion", "code", "msg", "details"} and out["code"] == code, out
    assert isinstance(out["msg"], str) and out["msg"] and out["cniVersion"] in VERSIONS, out
    for word in words:
        assert word in out["msg"], out


# --- the happy path ---------------------------------------------------------------------------------------------


def test_two_containers_reach_each_other_and_the_host(host, containers):
    a, ra = containers.add()
    b, rb = containers.add()
    ip_a, ip_b = address(ra), address(rb)
    assert ip_a != ip_b and ipaddress.ip_address(ip_a) in ipaddress.ip_network(POOL)
    for src, dst in ((a, ip_b), (b, ip_a), (a, HOST_ADDR), (b, HOST_ADDR)):
        assert pings(src, dst), f"{src} cannot reach {dst}"
    assert pings(host.ns, ip_a), "the host cannot reach its container"
    # What the runtime was told is what the kernel has.
    assert container_addresses(a) == [f"{ip_a}/32"]
    mac = nsexec(a, "cat /sys/class/net/eth0/address").stdout.strip()
    assert ra["interfaces"] == [{"name": "eth0", "mac": mac, "sandbox": f"/run/netns/{a}"}]
    assert ra["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    veth = host_ifname(endpoint_id(NETWORK, a, "eth0"))
    assert f"{ip_a} dev {veth} scope link" in host.routes()  # listed by "ip route show proto 80"


def test_check_passes_then_fails_once_the_host_veth_is_deleted(host, containers):
    a, result = containers.add()
    with_prev = dict(host.cni.config, prevResult=result)
    rc, out, err = host.cni.call("CHECK", a, f"/run/netns/{a}", config=with_prev)
    assert (rc, out) == (0, {}), (out, err)
    # prevResult of another container: CHECK compares with what the runtime was told.
    _, other = containers.add()
    rc, out, _ = host.cni.call("CHECK", a, f"/run/netns/{a}", config=dict(host.cni.config, prevResult=other))
    assert rc == 1 and address(other) in out["msg"], out
    # CHECK needs prevResult.
    rc, out, _ = host.cni.call("CHECK", a, f"/run/netns/{a}")
    assert_cni_error(rc, out, 7, "prevResult")

    veth = host_ifname(endpoint_id(NETWORK, a, "eth0"))
    nsexec(host.ns, f"ip link del {veth}")
    rc, out, _ = host.cni.call("CHECK", a, f"/run/netns/{a}", config=with_prev)
    assert rc == 1 and out["code"] != 0 and f"host veth {veth}" in out["msg"] and "missing" in out["msg"], out


def test_del_removes_everything_and_a_second_del_succeeds(host, containers):
    before = host.state()
    a, result = containers.add()
    ip = address(result)
    ep_id = endpoint_id(NETWORK, a, "eth0")
    veth = host_ifname(ep_id)
    assert veth in host.veths() and host.endpoint(ep_id) and host.handle(ep_id)
    assert host.allocated().get(ip) == ep_id
    assert any(r.startswith(f"{ip} dev {veth}") for r in host.routes())

    for _ in range(2):
        rc, out, err = containers.delete(a)
        assert (rc, out) == (0, {}), (out, err)
        # When DEL answers, nothing routes to the container and it holds no address; the agent deletes the veth
        # pair right after (netplugin/dataplane/reaper.py).
        assert not any(veth in r for r in host.routes())
        assert f"{ip}/" not in nsexec(a, "ip -o addr show").stdout
        assert host.endpoint(ep_id) is None and host.handle(ep_id) is None
        assert ip not in host.allocated()
        wait_until(f"{veth} deleted", lambda: veth not in host.veths(), timeout=5)
        assert "eth0" not in nsexec(a, "ip -o link show").stdout
    after = host.state()
    # The block stays claimed by this host (its blackhole too), with a higher sequence number: that is all.
    assert after["links"] == before["links"] and host.container_routes() == []
    assert {k for k in after["etcd"] if "/ipam/blocks/" not in k and "/ipam/affinity/" not in k} == {
        k for k in before["etcd"] if "/ipam/blocks/" not in k and "/ipam/affinity/" not in k
    }


def test_del_of_a_container_never_added_and_without_netns_succeeds(host, containers):
    ns = containers.new()
    rc, out, err = containers.delete(ns)
    assert (rc, out) == (0, {}), (out, err)
    # A runtime may DEL after the namespace is gone: CNI_NETNS empty.
    a, _ = containers.add()
    rc, out, err = host.cni.call("DEL", a, "", "eth0")
    assert (rc, out) == (0, {}), (out, err)
    assert host.endpoint(endpoint_id(NETWORK, a, "eth0")) is None
    veth = host_ifname(endpoint_id(NETWORK, a, "eth0"))
    wait_until(f"{veth} deleted", lambda: veth not in host.veths(), timeout=5)


def test_del_after_the_container_namespace_is_gone(host, containers):
    """Runtimes often remove the sandbox before DEL: the path is stale, the veth died with the namespace."""
    a, result = containers.add()
    ep_id = endpoint_id(NETWORK, a, "eth0")
    run(["ip", "netns", "del", a])
    rc, out, err = containers.delete(a)
    assert (rc, out) == (0, {}), (out, err)
    assert host.endpoint(ep_id) is None and host.handle(ep_id) is None
    assert address(result) not in host.allocated()
    assert not any(r.startswith(address(result) + " ") for r in host.routes())
    wait_until("the veth deleted", lambda: host_ifname(ep_id) not in host.veths(), timeout=5)


def test_static_address_from_cni_args_and_from_runtime_config(host, containers):
    a, ra = containers.add(args="IgnoreUnknown=1;IP=10.70.0.50")
    assert ra["ips"][0]["address"] == "10.70.0.50/32" and container_addresses(a) == ["10.70.0.50/32"]
    b, rb = containers.add(config=dict(host.cni.config, runtimeConfig={"ips": ["10.70.0.51/24"]}))
    assert rb["ips"][0]["address"] == "10.70.0.51/32" and container_addresses(b) == ["10.70.0.51/32"]
    assert pings(a, "10.70.0.51")
    allocated = host.allocated()
    assert allocated["10.70.0.50"] == endpoint_id(NETWORK, a, "eth0")
    assert allocated["10.70.0.51"] == endpoint_id(NETWORK, b, "eth0")


def test_labels_from_k8s_args_and_config_args_land_on_the_endpoint(host, containers):
    config = dict(host.cni.config, args={"labels": {"app": "web", "tier": "front"}})
    a, _ = containers.add(
        config=config, args="IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc"
    )
    record = host.endpoint(endpoint_id(NETWORK, a, "eth0"))
    assert record["labels"] == {
        "app": "web",
        "tier": "front",
        "netplugin.io/namespace": "team-a",
        "netplugin.io/pod": "web-0",
        "netplugin.io/network": NETWORK,
    }, record
    assert record["orchestrator"] == "cni" and record["container_id"] == a and record["netns"] == f"/run/netns/{a}"


def mesos_config(config, labels):
    """A network config as Mesos' network/cni isolator passes it: the task's NetworkInfo protobuf as JSON under
    args."org.apache.mesos".network_info, its labels as {"labels": [{"key": ..., "value": ...}]}."""
    info = {
        "name": config["name"],
        "labels": {"labels": labels},
        "port_mappings": [{"host_port": 8080, "container_port": 80, "protocol": "tcp"}],
    }
    return dict(config, args={"org.apache.mesos": {"network_info": info}})


def test_mesos_network_labels_land_on_the_endpoint(host, containers):
    config = mesos_config(
        host.cni.config,
        [{"key": "app", "value": "myapp"}, {"key": "env", "value": "prod"}, {"key": "example.com/canary"}],
    )
    a, _ = containers.add(config=config)
    record = host.endpoint(endpoint_id(NETWORK, a, "eth0"))
    assert record["labels"] == {
        "app": "myapp",
        "env": "prod",
        "example.com/canary": "",
        "netplugin.io/network": NETWORK,
    }, record


BAD_LABELS = {
    # The binary refuses shapes that are not Mesos' (or the convention's) label list.
    "mesos-not-a-list": (lambda c: mesos_config(c, {"key": "app", "value": "x"}), ["org.apache.mesos"]),
    "mesos-int-value": (lambda c: mesos_config(c, [{"key": "app", "value": 3}]), ["org.apache.mesos", "'app'"]),
    "mesos-no-key": (lambda c: mesos_config(c, [{"value": "x"}]), ["org.apache.mesos"]),
    "mesos-junk": (lambda c: dict(c, args={"org.apache.mesos": {"network_info": "x"}}), ["network_info"]),
    "args-int-key-list": (lambda c: dict(c, args={"labels": [{"key": 1, "value": "x"}]}), ["args.labels"]),
    # The agent refuses keys and values no policy selector could name, by the selectors' own rules.
    "mesos-bad-key": (lambda c: mesos_config(c, [{"key": "my app", "value": "x"}]), ["'my app'", "bad key"]),
    "mesos-bad-prefix": (lambda c: mesos_config(c, [{"key": "Ex_ample/app", "value": "x"}]), ["bad key"]),
    "mesos-long-value": (lambda c: mesos_config(c, [{"key": "app", "value": "v" * 64}]), ["bad value"]),
    "args-bad-value": (lambda c: dict(c, args={"labels": {"app": "-web"}}), ["'-web'", "bad value"]),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_labels_are_refused_with_nothing_created(host, containers, case):
    make, words = BAD_LABELS[case]
    config = make(host.cni.config)
    out = _fails_cleanly(host, containers, 7, words, config=config)
    assert "\n" not in out["msg"]
    # The runtime's DEL after the refused ADD, with the same config, succeeds.
    ns = containers.new()
    rc, out, err = host.cni.call("DEL", ns, f"/run/netns/{ns}", config=config)
    assert (rc, out) == (0, {}), (out, err)


def test_mtu_from_the_network_config_is_recorded_and_kept(host, containers):
    config = dict(host.cni.config, mtu=1400)
    a, result = containers.add(config=config)
    veth = host_ifname(endpoint_id(NETWORK, a, "eth0"))
    assert json.loads(nsexec(a, "ip -j link show eth0").stdout)[0]["mtu"] == 1400
    assert json.loads(nsexec(host.ns, f"ip -j link show {veth}").stdout)[0]["mtu"] == 1400
    assert host.endpoint(endpoint_id(NETWORK, a, "eth0"))["mtu"] == 1400
    # CHECK compares the kernel with the record's MTU, not the agent's default (1500 here).
    rc, out, err = host.cni.call("CHECK", a, f"/run/netns/{a}", config=dict(config, prevResult=result))
    assert (rc, out) == (0, {}), (out, err)


@pytest.mark.parametrize("version", VERSIONS)
def test_each_cni_version_gets_its_own_result_shape(host, containers, version):
    config = dict(host.cni.config, cniVersion=version)
    a, result = containers.add(config=config)
    ip = address(result)
    mac = nsexec(a, "cat /sys/class/net/eth0/address").stdout.strip()
    entry = {"address": f"{ip}/32", "gateway": "169.254.1.1", "interface": 0}
    if version < "1.0.0":
        entry = {"version": "4", **entry}  # 0.x results name the family; 1.x derive it from the address
    assert result == {
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "mac": mac, "sandbox": f"/run/netns/{a}"}],
        "ips": [entry],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {},
    }
    # CHECK exists from 0.4.0 on; before that it is refused as the spec says (code 1).
    rc, out, _ = host.cni.call("CHECK", a, f"/run/netns/{a}", config=dict(config, prevResult=result))
    if version < "0.4.0":
        assert_cni_error(rc, out, 1, "CHECK")
        assert out["cniVersion"] == version
    else:
        assert (rc, out) == (0, {})
    rc, out, _ = containers.delete(a, config=config)
    assert (rc, out) == (0, {})
    assert host.endpoint(endpoint_id(NETWORK, a, "eth0")) is None


def test_status_and_gc(host, containers):
    config = dict(host.cni.config, cniVersion="1.1.0")
    rc, out, err = host.cni.call("STATUS", config=config)
    assert (rc, out) == (0, {}), (out, err)
    rc, out, _ = host.cni.call("STATUS", config=dict(config, cniVersion="1.0.0"))
    assert_cni_error(rc, out, 1, "STATUS")

    keep, _ = containers.add()
    stale, rs = containers.add()
    other_net = host.binary("other", "othernet", [OTHER_POOL])
    foreign, _ = containers.add(cni=other_net)  # another network's endpoint: not this GC's business
    keep_veth = host_ifname(endpoint_id(NETWORK, keep, "eth0"))
    keep_index = host.ifindex(keep_veth)

    gc = dict(config, **{"cni.dev/valid-attachments": [{"containerID": keep, "ifname": "eth0"}]})
    rc, out, err = host.cni.call("GC", config=gc)
    assert (rc, out) == (0, {}), (out, err)
    stale_id = endpoint_id(NETWORK, stale, "eth0")
    assert host.endpoint(stale_id) is None and host.handle(stale_id) is None
    assert address(rs) not in host.allocated()
    wait_until("the stale veth deleted", lambda: host_ifname(stale_id) not in host.veths(), timeout=5)
    assert host.endpoint(endpoint_id(NETWORK, keep, "eth0")) and host.ifindex(keep_veth) == keep_index
    assert host.endpoint(endpoint_id("othernet", foreign, "eth0"))
    # GC without the list of valid attachments would mean "everything is stale": refused.
    rc, out, _ = host.cni.call("GC", config=config)
    assert_cni_error(rc, out, 7, "valid-attachments")
    assert host.endpoint(endpoint_id(NETWORK, keep, "eth0"))


# --- errors: the spec's JSON, a clear message, nothing left behind ----------------------------------------------


def _fails_cleanly(host, containers, code, words, args="", config=None, cni=None, stdin=None):
    """One failing ADD in a fresh container: its error, and the host, etcd and the container unchanged."""
    ns = containers.new()
    before = host.state()
    if stdin is not None:  # a config that is not even JSON: call the binary by hand
        env = {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": ns,
            "CNI_NETNS": f"/run/netns/{ns}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": host.cni.bin_dir,
        }
        p = subprocess.run([host.cni.bin_path], input=stdin, env=env, capture_output=True, text=True, timeout=30)
        rc, out = p.returncode, json.loads(p.stdout)
    else:
        _, rc, out = containers.add(ns, cni=cni, args=args, config=config, check=False)
    assert_cni_error(rc, out, code, *words)
    assert host.state() == before
    assert nsexec(ns, "ip -o link show").stdout.count("\n") == 1, "the container got an interface"
    return out


def test_pool_exhausted(host, containers):
    tiny = host.binary("tiny", "tinynet", [TINY_POOL])
    containers.add(cni=tiny)  # takes the only address
    _fails_cleanly(host, containers, 100, ["no free IPv4 address", TINY_POOL], cni=tiny)


def test_address_in_use(host, containers):
    owner, _ = containers.add(args="IP=10.70.0.60")
    out = _fails_cleanly(host, containers, 101, ["10.70.0.60", "already in use"], args="IP=10.70.0.60")
    assert endpoint_id(NETWORK, owner, "eth0") in out["msg"]


def test_address_outside_every_pool(host, containers):
    _fails_cleanly(host, containers, 102, ["192.0.2.10", "not in any pool"], args="IP=192.0.2.10")
    # Inside another pool, but not one this network may use.
    _fails_cleanly(
        host,
        containers,
        102,
        ["10.72.0.9", "not in any pool"],
        config=dict(host.cni.config, runtimeConfig={"ips": ["10.72.0.9"]}),
    )


@pytest.mark.parametrize(
    "case", ["not-json", "no-version", "old-version", "no-name", "bad-pools", "bad-mtu", "bad-ip", "other-ipam"]
)
def test_malformed_config(host, containers, case):
    base = host.cni.config
    cases = {
        "not-json": dict(code=6, words=["decode"], stdin="{not json"),
        "no-version": dict(
            code=1, words=["no cniVersion"], config={k: v for k, v in base.items() if k != "cniVersion"}
        ),
        "old-version": dict(code=1, words=["0.2.0"], config=dict(base, cniVersion="0.2.0")),
        "no-name": dict(code=7, words=["network name"], config={k: v for k, v in base.items() if k != "name"}),
        "bad-pools": dict(code=7, words=["ipam.pools"], config=dict(base, ipam={"pools": "10.70.0.0/24"})),
        "bad-mtu": dict(code=7, words=["mtu"], config=dict(base, mtu="jumbo")),
        "bad-ip": dict(code=4, words=["10.70.0.999"], args="IP=10.70.0.999"),
        "other-ipam": dict(code=2, words=["ipam.type"], config=dict(base, ipam={"type": "host-local"})),
    }
    c = cases[case]
    _fails_cleanly(
        host, containers, c["code"], c["words"], args=c.get("args", ""), config=c.get("config"), stdin=c.get("stdin")
    )


def test_agent_down_answers_try_again_quickly(host, containers, tmp_path):
    ns = containers.new()
    missing = str(tmp_path / "missing.sock")
    stale = str(tmp_path / "stale.sock")  # a socket file nobody listens on: a crashed agent
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    hung = str(tmp_path / "hung.sock")  # listening, never answering: an agent stuck or stopped
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(hung)
        listener.listen(16)
        for path in (missing, stale, hung):
            config = dict(host.cni.config, agent_socket=path)
            started = time.monotonic()
            rc, out, _ = host.cni.call("ADD", ns, f"/run/netns/{ns}", config=config, timeout=10)
            took = time.monotonic() - started
            assert_cni_error(rc, out, 11, "not reachable", path)
            assert took < 2.0, f"{path}: answered after {took:.2f} s"
            rc, out, _ = host.cni.call("STATUS", config=dict(config, cniVersion="1.1.0"), timeout=10)
            assert_cni_error(rc, out, 50, "not reachable")
    finally:
        listener.close()
    assert nsexec(ns, "ip -o link show").stdout.count("\n") == 1


# --- scale ------------------------------------------------------------------------------------------------------


def test_200_adds_20_at_a_time_then_200_dels_leave_nothing(host, containers):
    n, parallel = 200, 20
    before_links = host.links()
    nss = [containers.new() for _ in range(n)]
    for ns in nss:
        containers.added.append((host.cni, ns, "eth0", None))  # teardown DELs them all if we fail half-way

    def call(command, ns):
        started = time.monotonic()
        rc, out, err = host.cni.call(command, ns, f"/run/netns/{ns}", timeout=60)
        return ns, rc, out, err, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        added = list(pool.map(lambda ns: call("ADD", ns), nss))
    failed = [(ns, out, err) for ns, rc, out, err, _ in added if rc != 0]
    assert not failed, failed[:3]
    ips = [address(out) for _, _, out, _, _ in added]
    assert len(set(ips)) == n
    assert len(host.veths()) == n and len(host.container_routes()) == n
    assert len(host.ds.list(keys.endpoint_prefix(host.agent.hostname))) == n
    # Spot-check the dataplane of a few: first with last, and with the host.
    assert pings_within(nss[0], ips[-1], 5) and pings_within(nss[n // 2], HOST_ADDR, 5)

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        deleted = list(pool.map(lambda ns: call("DEL", ns), nss))
    failed = [(ns, out, err) for ns, rc, out, err, _ in deleted if rc != 0]
    assert not failed, failed[:3]
    done = set(nss)
    containers.added = [entry for entry in containers.added if entry[1] not in done]  # no second DEL needed

    check = subprocess.run(
        [console_script("netctl"), "--etcd-endpoints", host.ds.config.endpoints[0], "ipam", "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and "clean" in check.stdout, check.stdout + check.stderr
    wait_until("every veth deleted", lambda: host.links() == before_links, timeout=10)
    assert host.container_routes() == []
    assert host.ds.list(keys.ENDPOINTS) == [] and host.ds.list(keys.HANDLES) == []
    assert not any(ip in host.allocated() for ip in ips)
    add_ms = sorted(t * 1000 for *_, t in added)
    del_ms = sorted(t * 1000 for *_, t in deleted)
    print(
        f"\n200 ADDs x{parallel}: p50 {add_ms[n // 2]:.0f} ms, max {add_ms[-1]:.0f} ms; "
        f"DELs: p50 {del_ms[n // 2]:.0f} ms, max {del_ms[-1]:.0f} ms"
    )


def test_policy_covers_a_container_when_add_returns(host, containers):
    """ADD installs the new veth's policy before it returns (or waits, up to --policy-setup-timeout, for a sync
    pass that knows it), so the very first packet passes: right after ADD, the host veth is already in our dispatch set and one ping answers at once."""
    a, ra = containers.add()
    b, rb = containers.add()
    veth = host.endpoint(f"{host.cni.config['name']}.{b}.eth0")["host_ifname"]
    sets = nsexec(host.ns, "ipset save").stdout  # the dispatch set of b's shape (policy/compiler.py)
    assert f"{address(rb)},{veth}" in sets, f"{veth} not in our dispatch set right after ADD"
    assert pings(a, address(rb), count=1), "the first ping after ADD was lost"


def _netctl(host, *args, stdin=None):
    return subprocess.run(
        [console_script("netctl"), "--etcd-endpoints", host.agent.etcd_endpoint, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _policy_stats(host):
    from netplugin.diags.health import agent_health

    report = agent_health(host.agent.run_dir)["reports"]["PolicyReconciler"]
    return {**report["stats"], "revision": report["revision"]}


def test_20_concurrent_adds_first_packet_passes_and_the_watch_sync_then_changes_nothing(host, containers):
    """A policy selects the new containers (egress allowed only to the peer): each ADD installs its endpoint's
    policy on the ADD path, so each container's first ping right after its ADD returns is answered; and once the
    watch has brought every record back, the reconciler's passes found nothing to apply (no iptables-restore,
    no ipset change)."""
    peer, rpeer = containers.add(config=dict(host.cni.config, args={"labels": {"app": "peer"}}))
    text = (
        "apiVersion: netplugin/v1\nkind: Policy\nmetadata: {name: burst-out}\nspec:\n"
        "  selector: {matchLabels: {app: burst}}\n  types: [Egress]\n"
        "  egress: [{action: allow, to: [{selector: {matchLabels: {app: peer}}}]}]\n"
    )
    p = _netctl(host, "policy", "apply", "-f", "-", stdin=text)
    assert p.returncode == 0, p.stderr
    try:
        rev = host.ds.revision()
        deadline = time.monotonic() + 10
        while _policy_stats(host)["revision"] < rev:
            assert time.monotonic() < deadline, "the agent did not sync the policy"
            time.sleep(0.05)
        config = dict(host.cni.config, args={"labels": {"app": "burst"}})
        nss = [containers.new() for _ in range(20)]
        before = _policy_stats(host)

        def add_then_ping(ns):
            _, result = containers.add(ns, config=config)
            return address(result), pings(ns, address(rpeer), count=1)

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            outcomes = list(pool.map(add_then_ping, nss))
        lost = [addr for addr, ok in outcomes if not ok]
        assert not lost, f"first packet lost from {lost}\n{host.agent.log()[-3000:]}"
        installed = _policy_stats(host)
        assert (
            installed["installs"] + installed["installed_by_other"] - before["installs"] - before["installed_by_other"]
            == 20
        ), (before, installed)
        # One more pass that must compile (a policy selecting nothing here), after the watch brought every record.
        nothing = text.replace("burst-out", "selects-nothing").replace("app: burst", "app: nobody")
        p = _netctl(host, "policy", "apply", "-f", "-", stdin=nothing)
        assert p.returncode == 0, p.stderr
        rev = host.ds.revision()
        deadline = time.monotonic() + 10
        while (after := _policy_stats(host))["revision"] < rev:
            assert time.monotonic() < deadline, "the agent did not sync the new records"
            time.sleep(0.05)
        assert after["applies"] == installed["applies"], (installed, after)
        assert after["unchanged"] > installed["unchanged"], (installed, after)
    finally:
        for name in ("burst-out", "selects-nothing"):
            _netctl(host, "policy", "delete", name)
