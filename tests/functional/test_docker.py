"""The Docker front door: the plugin protocol against a real etcd, then real dockerd (Debian's docker.io) driving
real agents in throwaway host namespaces.

Each host is a namespace with an agent serving the plugin and a dockerd that finds it as driver ``netplugin``
(tests/dockerd.py). Most hosts reach the outside through an "uplink" namespace (their default route, as a real
host's would); ``test_docker_on_hosts_without_a_default_route`` has none, only lo and the containers' veths.
Traffic goes only between the test's own namespaces and containers.
"""

import json
import subprocess
import sys

import netaddr
import pytest

from netplugin.config import AgentConfig, EtcdConfig
from netplugin.dataplane import Dataplane
from netplugin.datastore import keys
from netplugin.datastore.models import Endpoint, Network
from netplugin.docker.app import MEDIA_TYPE, create_docker_app
from netplugin.docker.driver import build_driver
from netplugin.ipam.allocator import IPAM
from netplugin.lab.console import console_script
from netplugin.lab.dockerd import DockerHost, IMAGE
from netplugin.lab.netns import nsexec
from netplugin.service.endpoints import NETWORK_LABEL, EndpointService
from tests.hostview import host_veths
from tests.waiting import poll

pytestmark = pytest.mark.functional

HOST_V4, HOST_V6 = "10.99.0.1", "fd99::1"


# --- helpers -------------------------------------------------------------------------------------------------------


def attachment(host, container, network):
    nets = json.loads(host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout)
    return nets[network]


def container_pings(host, container, address, attempts=3):
    cmd = "ping6" if ":" in address else "ping"
    for _ in range(attempts):
        if host.docker("exec", container, cmd, "-c1", "-W1", address, check=False, timeout=20).returncode == 0:
            return True
    return False


def ns_pings(ns, address, attempts=3):
    for _ in range(attempts):
        if nsexec(ns, ["ping", "-c1", "-W1", address], check=False).returncode == 0:
            return True
    return False


def our_links(ns):
    links = json.loads(nsexec(ns, "ip -j link show").stdout or "[]")
    return sorted(link["ifname"] for link in links if link["ifname"].startswith(("np", "tmp")))


def endpoint_record(ds, host, endpoint_id):
    kv = ds.get(keys.endpoint(host, endpoint_id))
    return Endpoint.from_dict(kv.value) if kv else None


def ipam_check(etcd_server):
    return subprocess.run(
        [console_script("netctl"), "--etcd-endpoints", etcd_server.endpoint, "ipam", "check"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def uplinked(namespaces, address=HOST_V4, address6=HOST_V6):
    """A host namespace whose default routes lead to an 'uplink' namespace (as a real host's would)."""
    host, uplink = namespaces.add(), namespaces.add()
    namespaces.link(host, uplink, f"{address}/24", "10.99.0.254/24")
    nsexec(host, f"ip -6 addr add {address6}/64 dev eth0 nodad")
    nsexec(uplink, "ip -6 addr add fd99::fe/64 dev eth0 nodad")
    nsexec(host, "ip route add default via 10.99.0.254")
    nsexec(host, "ip -6 route add default via fd99::fe")
    return host


@pytest.fixture
def docker_hosts(etcd, etcd_server, namespaces):
    """Factory of started DockerHosts; every one is closed (containers, dockerd, agent) even on failure, and
    before the namespaces go (``namespaces`` is a dependency so it is torn down after this)."""
    made = []

    def make(ns, agent_args=(), bridge=False):
        etcd_server.bridge_into(ns)
        host = DockerHost(ns, etcd_server.endpoint, agent_args=agent_args, bridge=bridge)
        made.append(host)
        return host.start()

    try:
        yield make
    finally:
        for host in reversed(made):
            host.close()


# --- the protocol, without dockerd ----------------------------------------------------------------------------------


@pytest.fixture
def plugin(etcd, etcd_server, namespaces):
    """The Flask app over a real DockerDriver (real etcd, real kernel in a test host namespace)."""
    ns = namespaces.add()
    config = AgentConfig(hostname="h1", etcd=EtcdConfig(endpoints=[etcd_server.endpoint]))
    ipam = IPAM(etcd)
    dataplane = Dataplane(host_netns=f"/run/netns/{ns}")
    service = EndpointService(etcd, ipam, dataplane, "h1")
    driver = build_driver(etcd, ipam, service, "h1", config)
    client = create_docker_app(driver).test_client()

    def call(method, body=None, raw=None, status=200):
        resp = client.post(f"/{method}", data=raw if raw is not None else json.dumps(body or {}))
        assert resp.status_code == status, (method, resp.status_code, resp.data)
        assert resp.content_type == MEDIA_TYPE
        return resp.get_json()

    call.ns, call.ipam, call.driver, call.client = ns, ipam, driver, client
    return call


def test_protocol_handshake_and_bad_requests(plugin):
    assert plugin("Plugin.Activate", raw=b"") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert plugin("NetworkDriver.GetCapabilities", raw=b"null") == {"Scope": "local", "ConnectivityScope": "global"}
    assert plugin("IpamDriver.GetCapabilities")["RequiresMACAddress"] is True
    assert plugin("IpamDriver.GetDefaultAddressSpaces") == {
        "LocalDefaultAddressSpace": "netplugin",
        "GlobalDefaultAddressSpace": "netplugin",
    }
    assert "does not implement" in plugin("NetworkDriver.Teleport", status=404)["Err"]
    assert "does not implement" in plugin("nothing/here", status=404)["Err"]
    assert "POST" in plugin.client.get("/Plugin.Activate").get_json()["Err"]
    assert "not valid JSON" in plugin("IpamDriver.RequestPool", raw=b"{nope", status=400)["Err"]
    assert "JSON object" in plugin("NetworkDriver.Join", raw=b"[1]", status=400)["Err"]
    assert plugin("NetworkDriver.Join", {"NetworkID": "n"})["Err"] == "EndpointID is missing"
    assert plugin("NetworkDriver.Join", {"NetworkID": 5, "EndpointID": "e"})["Err"] == "NetworkID must be a string"
    bad = plugin("IpamDriver.RequestPool", {"AddressSpace": "LocalDefault"})
    assert "not netplugin's" in bad["Err"] and bad["Error"] == bad["Err"]  # IPAM answers are read from "Error"
    assert "not issued by netplugin" in plugin("IpamDriver.RequestAddress", {"PoolID": "garbage"})["Err"]
    created = plugin(
        "NetworkDriver.CreateNetwork",
        {"NetworkID": "n0", "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.18.0.0/16"}]},
    )
    assert "--ipam-driver netplugin" in created["Err"]
    for method in ("DiscoverNew", "DiscoverDelete", "ProgramExternalConnectivity", "RevokeExternalConnectivity"):
        assert plugin(f"NetworkDriver.{method}", {"NetworkID": "n0", "EndpointID": "e0"}) == {}


def test_protocol_pools_and_addresses(plugin):
    ipam = plugin.ipam
    assert "no IPv4 netplugin pool" in plugin("IpamDriver.RequestPool", {"AddressSpace": "netplugin"})["Err"]
    whole = plugin("IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "10.30.0.0/16"})
    assert whole["Pool"] == "10.30.0.0/16" and whole["Data"] == {"com.docker.network.gateway": "169.254.1.1/32"}
    assert "10.30.0.0/16" in {p.cidr for p in ipam.list_pools()}  # --subnet created the pool
    again = plugin("IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "10.30.0.0/16"})
    assert again["PoolID"] == whole["PoolID"]
    part = plugin(
        "IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "10.30.1.0/24", "SubPool": "10.30.1.128/25"}
    )
    assert [p.cidr for p in ipam.list_pools()] == ["10.30.0.0/16"]  # a subnet inside a pool uses that pool
    assert "overlaps" in plugin("IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "10.30.0.0/15"})["Err"]
    assert "host bits" in plugin("IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "10.31.0.5/16"})["Err"]
    assert (
        "not inside"
        in plugin(
            "IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "10.30.2.0/24", "SubPool": "10.30.3.0/25"}
        )["Err"]
    )

    # The gateway (given or not) is answered, never allocated.
    gw = plugin(
        "IpamDriver.RequestAddress",
        {
            "PoolID": part["PoolID"],
            "Address": "10.30.1.1",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )
    assert gw["Address"] == "10.30.1.1/24" and plugin.driver.ipam.holder("10.30.1.1") is None
    mac = {"com.docker.network.endpoint.macaddress": "02:42:0a:00:00:01"}
    auto = plugin("IpamDriver.RequestAddress", {"PoolID": part["PoolID"], "Options": mac})
    assert auto["Address"].endswith("/32")
    assert netaddr.IPNetwork(auto["Address"]).ip in netaddr.IPNetwork("10.30.1.128/25")  # --ip-range honoured
    static = plugin("IpamDriver.RequestAddress", {"PoolID": part["PoolID"], "Address": "10.30.1.20"})
    assert static["Address"] == "10.30.1.20/32"
    taken = plugin("IpamDriver.RequestAddress", {"PoolID": part["PoolID"], "Address": "10.30.1.20"})
    assert "10.30.1.20 is already in use" in taken["Err"]
    outside = plugin("IpamDriver.RequestAddress", {"PoolID": part["PoolID"], "Address": "10.30.2.1"})
    assert "not in the network's subnet 10.30.1.0/24" in outside["Err"]

    # ReleaseAddress: idempotent, and never frees what a non-Docker owner holds.
    ipam.assign_ip("cni-owner", "h1", "10.30.0.50")
    for _ in range(2):
        assert plugin("IpamDriver.ReleaseAddress", {"PoolID": part["PoolID"], "Address": "10.30.1.20"}) == {}
        assert plugin("IpamDriver.ReleaseAddress", {"PoolID": whole["PoolID"], "Address": "10.30.0.50"}) == {}
        assert plugin("IpamDriver.ReleaseAddress", {"PoolID": whole["PoolID"], "Address": "169.254.1.1"}) == {}
    assert plugin.driver.ipam.holder("10.30.1.20") is None
    assert plugin.driver.ipam.holder("10.30.0.50")[0] == "cni-owner"
    assert plugin("IpamDriver.RequestAddress", {"PoolID": part["PoolID"], "Address": "10.30.1.20"})["Address"]
    assert plugin("IpamDriver.ReleasePool", {"PoolID": part["PoolID"]}) == {}
    assert "10.30.0.0/16" in {p.cidr for p in ipam.list_pools()}  # pools are shared cluster configuration: kept


def test_protocol_endpoint_lifecycle(plugin, etcd, namespaces):
    ns, sandbox = plugin.ns, namespaces.add()
    pool = plugin("IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "10.40.0.0/24"})
    v6 = plugin("IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "fd40::/64", "V6": True})
    v4data = [{"AddressSpace": "netplugin", "Pool": "10.40.0.0/24", "Gateway": "169.254.1.1/32"}]
    for bad, why in (
        ("jumbo", "whole number from 68 to 65535"),
        ("70000", "whole number from 68 to 65535"),
        ("1200", "below IPv6's minimum of 1280"),
    ):
        refused = plugin(
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": "net1",
                "IPv4Data": v4data,
                "IPv6Data": [{"AddressSpace": "netplugin", "Pool": "fd40::/64"}],
                "Options": {"com.docker.network.generic": {"com.docker.network.driver.mtu": bad}},
            },
        )
        assert why in refused["Err"]
    assert (
        plugin(
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": "net1",
                "Options": {"com.docker.network.generic": {"color": "green"}},
                "IPv4Data": v4data,
                "IPv6Data": [{"AddressSpace": "netplugin", "Pool": "fd40::/64"}],
            },
        )
        == {}
    )
    a4 = plugin("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
    a6 = plugin("IpamDriver.RequestAddress", {"PoolID": v6["PoolID"]})["Address"]
    ep = {"NetworkID": "net1", "EndpointID": "ep1"}
    assert "no address" in plugin("NetworkDriver.CreateEndpoint", {**ep, "Interface": {}})["Err"]
    mac = "02:42:0a:28:00:07"
    assert (
        plugin(
            "NetworkDriver.CreateEndpoint", {**ep, "Interface": {"Address": a4, "AddressIPv6": a6, "MacAddress": mac}}
        )
        == {}
    )
    assert "not a path" in plugin("NetworkDriver.Join", {**ep, "SandboxKey": "relative"})["Err"]
    joined = plugin("NetworkDriver.Join", {**ep, "SandboxKey": f"/run/netns/{sandbox}"})
    src = joined["InterfaceName"]["SrcName"]
    assert joined["InterfaceName"]["DstPrefix"] == "eth" and joined["DisableGatewayService"] is True
    assert joined["StaticRoutes"] == [
        {"Destination": "169.254.1.1/32", "RouteType": 1},
        {"Destination": "0.0.0.0/0", "RouteType": 0, "NextHop": "169.254.1.1"},
        {"Destination": "fe80::ecee:eeff:feee:eeee/128", "RouteType": 1},
        {"Destination": "::/0", "RouteType": 0, "NextHop": "fe80::ecee:eeff:feee:eeee"},
    ]
    # Both ends are in the host namespace until libnetwork moves one; the host end is wired as for CNI.
    peer = json.loads(nsexec(ns, f"ip -j link show {src}").stdout)[0]
    assert peer["address"] == mac and peer["mtu"] == 1500 and "UP" not in peer["flags"]
    ((name, info),) = host_veths(f"/run/netns/{plugin.ns}").items()
    assert info["mac"] == "ee:ee:ee:ee:ee:ee" and info["mtu"] == 1500 and info["up"]
    assert info["routes"] == sorted([a4, a6])
    assert info["sysctls"]["net.ipv4.conf.%s.proxy_arp" % name] == 1
    record = endpoint_record(etcd, "h1", "ep1")
    assert record.orchestrator == "docker" and record.netns == f"/run/netns/{sandbox}"
    assert record.labels == {NETWORK_LABEL: "net1"} and sorted(record.addresses) == sorted([a4, a6])
    assert Network.from_dict(etcd.get(keys.network("net1")).value).pools == ["10.40.0.0/24", "fd40::/64"]
    assert plugin("NetworkDriver.EndpointOperInfo", ep)["Value"]["host_ifname"] == name
    # Join again (a retry) converges the same pair.
    again = plugin("NetworkDriver.Join", {**ep, "SandboxKey": f"/run/netns/{sandbox}"})
    assert again["InterfaceName"]["SrcName"] == src and host_veths(f"/run/netns/{plugin.ns}")[name] == info

    # A second netplugin network in the same sandbox: only its subnet as a connected route.
    pool2 = plugin("IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "10.41.0.0/24"})
    assert (
        plugin(
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": "net2",
                "IPv4Data": [{"AddressSpace": "netplugin", "Pool": "10.41.0.0/24"}],
                "Options": {"com.docker.network.generic": {"com.docker.network.driver.mtu": "1400"}},
            },
        )
        == {}
    )
    b4 = plugin("IpamDriver.RequestAddress", {"PoolID": pool2["PoolID"]})["Address"]
    ep2 = {"NetworkID": "net2", "EndpointID": "ep2"}
    plugin("NetworkDriver.CreateEndpoint", {**ep2, "Interface": {"Address": b4}})
    second = plugin("NetworkDriver.Join", {**ep2, "SandboxKey": f"/run/netns/{sandbox}"})
    assert second["StaticRoutes"] == [{"Destination": "10.41.0.0/24", "RouteType": 1}]
    # -o com.docker.network.driver.mtu: both ends of the veth, kept in the record so resyncs keep it too.
    assert json.loads(nsexec(ns, f"ip -j link show {second['InterfaceName']['SrcName']}").stdout)[0]["mtu"] == 1400
    record2 = endpoint_record(etcd, "h1", "ep2")
    assert record2.mtu == 1400 and endpoint_record(etcd, "h1", "ep1").mtu is None
    assert host_veths(f"/run/netns/{plugin.ns}")[record2.host_ifname]["mtu"] == 1400
    assert plugin.driver.service.spec_of(record2).mtu == 1400  # what the agent's reconciler holds it to

    for e in (ep, ep2):
        for _ in range(2):  # idempotent
            assert plugin("NetworkDriver.Leave", e) == {}
            assert plugin("NetworkDriver.DeleteEndpoint", e) == {}
    assert our_links(ns) == [] and etcd.list(keys.endpoint_prefix("h1")) == []
    for net in ("net1", "net2"):
        assert plugin("NetworkDriver.DeleteNetwork", {"NetworkID": net}) == {}
    assert etcd.list(keys.NETWORKS) == []


# --- real dockerd ---------------------------------------------------------------------------------------------------


def test_docker_network_lifecycle(docker_hosts, namespaces, etcd, etcd_server):
    ns = uplinked(namespaces)
    h = docker_hosts(ns)
    h.docker(
        "network",
        "create",
        "-d",
        "netplugin",
        "--ipam-driver",
        "netplugin",
        "--subnet",
        "10.1.0.0/16",
        "--label",
        "team=blue",
        "-o",
        "color=green",
        "n1",
    )
    record = poll(lambda: etcd.get(keys.network("n1")))
    net = Network.from_dict(record.value)
    docker_id = h.docker("network", "inspect", "-f", "{{.Id}}", "n1").stdout.strip()
    assert (net.pools, net.labels, net.docker_id) == (["10.1.0.0/16"], {"team": "blue"}, docker_id)
    assert net.options["color"] == "green"

    h.docker(
        "run",
        "-d",
        "--name",
        "ca",
        "--net",
        "n1",
        "-l",
        "app=web",
        "-l",
        f"{NETWORK_LABEL}=spoof",
        IMAGE,
        "sleep",
        "600",
    )
    h.docker("run", "-d", "--name", "cb", "--net", "n1", "--ip", "10.1.7.7", IMAGE, "sleep", "600")
    a, b = attachment(h, "ca", "n1"), attachment(h, "cb", "n1")
    assert b["IPAddress"] == "10.1.7.7" and a["IPAddress"] and a["IPAddress"] != b["IPAddress"]
    assert a["IPPrefixLen"] == 32
    inspect = json.loads(h.docker("network", "inspect", "n1").stdout)[0]
    assert sorted(c["IPv4Address"] for c in inspect["Containers"].values()) == sorted(
        [f"{a['IPAddress']}/32", "10.1.7.7/32"]
    )

    # Routed /32s through 169.254.1.1, exactly like CNI containers.
    routes = h.docker("exec", "ca", "ip", "route").stdout
    assert "default via 169.254.1.1 dev eth0" in routes and "169.254.1.1 dev eth0" in routes
    assert container_pings(h, "ca", "10.1.7.7") and container_pings(h, "cb", a["IPAddress"])
    assert container_pings(h, "ca", HOST_V4) and ns_pings(ns, a["IPAddress"])

    # Endpoint records: orchestrator docker; labels of the network and (soon after Join) of the container.
    ep = poll(lambda: (r := endpoint_record(etcd, ns, a["EndpointID"])) and r.container_id and r)
    assert ep, "container labels never reached the endpoint record"
    assert ep.orchestrator == "docker" and ep.addresses == [f"{a['IPAddress']}/32"]
    assert ep.labels == {"app": "web", "team": "blue", NETWORK_LABEL: "n1"}  # the network label cannot be spoofed
    assert ep.container_id == h.docker("inspect", "-f", "{{.Id}}", "ca").stdout.strip()

    # A taken --ip fails with a clear message and leaves nothing behind.
    dup = h.docker("run", "-d", "--name", "cc", "--net", "n1", "--ip", "10.1.7.7", IMAGE, "sleep", "600", check=False)
    assert dup.returncode != 0 and "address 10.1.7.7 is already in use" in dup.stderr
    h.docker("rm", "-f", "cc")

    # connect / disconnect a second network: its subnet is routed through the new interface.
    h.docker("network", "create", "-d", "netplugin", "--ipam-driver", "netplugin", "--subnet", "10.2.0.0/24", "n2")
    h.docker("run", "-d", "--name", "cd", "--net", "n2", IMAGE, "sleep", "600")
    d = attachment(h, "cd", "n2")
    h.docker("network", "connect", "n2", "ca")
    a2 = attachment(h, "ca", "n2")
    assert a2["IPAddress"] in netaddr.IPNetwork("10.2.0.0/24")
    assert "10.2.0.0/24 dev eth1" in h.docker("exec", "ca", "ip", "route").stdout
    assert container_pings(h, "ca", d["IPAddress"]) and container_pings(h, "cd", a2["IPAddress"])
    h.docker("network", "disconnect", "n2", "ca")
    assert "eth1" not in h.docker("exec", "ca", "ip", "link").stdout
    assert endpoint_record(etcd, ns, a2["EndpointID"]) is None
    assert plugin_holder(h, etcd, a2["IPAddress"]) is None
    assert container_pings(h, "ca", "10.1.7.7")  # the first network is untouched

    # rm -f frees the address (a new container may take it) and leaves no leak, veth or record.
    h.docker("rm", "-f", "cb")
    assert plugin_holder(h, etcd, "10.1.7.7") is None
    h.docker("run", "-d", "--name", "ce", "--net", "n1", "--ip", "10.1.7.7", IMAGE, "sleep", "600")
    h.docker("rm", "-f", "ca", "cd", "ce")
    check = ipam_check(etcd_server)
    assert check.returncode == 0 and "clean" in check.stdout, check.stdout + check.stderr
    assert our_links(ns) == [] and etcd.list(keys.endpoint_prefix(ns)) == []
    h.docker("network", "rm", "n1", "n2")
    assert etcd.list(keys.NETWORKS) == []


def plugin_holder(host, etcd, address):
    """Who holds ``address`` in IPAM (None: free), as the Docker IPAM driver sees it."""
    from netplugin.docker.ipam_driver import DockerIpam

    return DockerIpam(IPAM(etcd), host.name).holder(address)


def test_docker_ip_range_gateway_and_ipv6(docker_hosts, namespaces, etcd):
    ns = uplinked(namespaces)
    IPAM(etcd).add_pool("10.5.0.0/16")  # the --subnet below lies inside this pool: the pool is reused
    h = docker_hosts(ns)
    h.docker(
        "network",
        "create",
        "-d",
        "netplugin",
        "--ipam-driver",
        "netplugin",
        "--subnet",
        "10.5.3.0/24",
        "--ip-range",
        "10.5.3.64/26",
        "--gateway",
        "10.5.3.1",
        "--ipv6",
        "--subnet",
        "fd05::/64",
        "n6",
    )
    config = json.loads(h.docker("network", "inspect", "-f", "{{json .IPAM.Config}}", "n6").stdout)
    assert {"Subnet": "10.5.3.0/24", "IPRange": "10.5.3.64/26", "Gateway": "10.5.3.1"} in config
    h.docker("run", "-d", "--name", "c6", "--net", "n6", IMAGE, "sleep", "600")
    a = attachment(h, "c6", "n6")
    assert netaddr.IPAddress(a["IPAddress"]) in netaddr.IPNetwork("10.5.3.64/26")
    assert netaddr.IPAddress(a["GlobalIPv6Address"]) in netaddr.IPNetwork("fd05::/64")
    assert a["GlobalIPv6PrefixLen"] == 128
    assert "default via fe80::ecee:eeff:feee:eeee dev eth0" in h.docker("exec", "c6", "ip", "-6", "route").stdout
    assert container_pings(h, "c6", HOST_V4) and container_pings(h, "c6", HOST_V6)
    assert ns_pings(ns, a["GlobalIPv6Address"])
    net = Network.from_dict(poll(lambda: etcd.get(keys.network("n6"))).value)
    assert net.pools == ["10.5.0.0/16", "fd05::/64"] and net.ip_range == "10.5.3.64/26"
    assert net.options["netplugin.io/gateways"] == "10.5.3.1"
    assert [p.cidr for p in IPAM(etcd).list_pools()] == ["10.5.0.0/16", "fd05::/64"]


def test_docker_and_agent_restarts_keep_containers(docker_hosts, namespaces, etcd, etcd_server):
    ns = uplinked(namespaces)
    h = docker_hosts(ns)
    h.docker("network", "create", "-d", "netplugin", "--ipam-driver", "netplugin", "--subnet", "10.6.0.0/24", "n")
    h.docker("run", "-d", "--name", "ra", "--net", "n", IMAGE, "sleep", "600")
    h.docker("run", "-d", "--name", "rb", "--net", "n", IMAGE, "sleep", "600")
    a, b = attachment(h, "ra", "n")["IPAddress"], attachment(h, "rb", "n")["IPAddress"]
    assert container_pings(h, "ra", b)

    h.dockerd.restart()  # --live-restore: the containers keep running, and keep their network
    assert container_pings(h, "ra", b) and ns_pings(ns, a)
    h.docker("run", "-d", "--name", "rc", "--net", "n", IMAGE, "sleep", "600")
    assert container_pings(h, "rc", a)

    h.restart_agent()  # the agent's reconcile keeps the Docker veths it finds records for
    assert container_pings(h, "ra", b) and ns_pings(ns, attachment(h, "rc", "n")["IPAddress"])
    h.docker("run", "-d", "--name", "rd", "--net", "n", IMAGE, "sleep", "600")  # unknown network after restart
    assert container_pings(h, "rd", a)
    assert len(our_links(ns)) == 4

    h.docker("rm", "-f", "ra", "rb", "rc", "rd")
    assert our_links(ns) == [] and etcd.list(keys.endpoint_prefix(ns)) == []
    check = ipam_check(etcd_server)
    assert check.returncode == 0, check.stdout + check.stderr


def test_stale_docker_endpoints_are_collected(docker_hosts, namespaces, etcd, etcd_server):
    """A record, veth and address whose DeleteEndpoint never came (agent down) go; live endpoints stay."""
    ns = uplinked(namespaces)
    h = docker_hosts(ns)
    h.docker("network", "create", "-d", "netplugin", "--ipam-driver", "netplugin", "--subnet", "10.8.0.0/24", "n")
    h.docker("run", "-d", "--name", "live", "--net", "n", IMAGE, "sleep", "600")
    live = attachment(h, "live", "n")
    # The stale endpoint, made through the driver's own calls as Docker would, then forgotten by Docker.
    ipam = IPAM(etcd)
    config = AgentConfig(hostname=ns, docker_api=h.dockerd.socket, docker_gc_interval=0)
    driver = build_driver(
        etcd, ipam, EndpointService(etcd, ipam, Dataplane(host_netns=f"/run/netns/{ns}"), ns), ns, config
    )
    net_id = h.docker("network", "inspect", "-f", "{{.Id}}", "n").stdout.strip()
    pool_id, _, _ = driver.request_pool("netplugin", "10.8.0.0/24", "", {}, False)
    address, _ = driver.request_address(pool_id, "", {})
    stale = "f" * 64
    driver.create_endpoint(net_id, stale, {"Address": address}, {})
    driver.join(net_id, stale, f"/run/netns/{namespaces.add()}", {})
    assert len(our_links(ns)) == 3 and plugin_holder(h, etcd, address) is not None  # live: host end only

    assert driver.collector.run_once(now=1000.0) == []  # first seen missing: not yet
    assert driver.collector.run_once(now=1000.0 + driver.collector.interval) == [stale]
    assert endpoint_record(etcd, ns, stale) is None and plugin_holder(h, etcd, address) is None
    assert len(our_links(ns)) == 1  # the live container's host end
    assert endpoint_record(etcd, ns, live["EndpointID"]) is not None and container_pings(h, "live", HOST_V4)
    assert driver.collector.run_once(now=5000.0) == []
    h.docker("rm", "-f", "live")
    check = ipam_check(etcd_server)
    assert check.returncode == 0, check.stdout + check.stderr


def test_two_hosts_share_one_etcd(docker_hosts, namespaces, etcd):
    # Two hosts on one segment, each the other's default route; direct routing programs each other's blocks.
    ha, hb = namespaces.add(), namespaces.add()
    namespaces.link(ha, hb, "10.98.0.1/24", "10.98.0.2/24")
    nsexec(ha, "ip route add default via 10.98.0.2")
    nsexec(hb, "ip route add default via 10.98.0.1")
    a = docker_hosts(ha, agent_args=["--routing", "direct", "--node-address", "10.98.0.1"])
    b = docker_hosts(hb, agent_args=["--routing", "direct", "--node-address", "10.98.0.2"])
    for h in (a, b):  # the same network, created by each host's own dockerd
        h.docker(
            "network", "create", "-d", "netplugin", "--ipam-driver", "netplugin", "--subnet", "10.7.0.0/24", "shared"
        )
    for i in range(2):
        a.docker("run", "-d", "--name", f"a{i}", "--net", "shared", IMAGE, "sleep", "600")
        b.docker("run", "-d", "--name", f"b{i}", "--net", "shared", IMAGE, "sleep", "600")
    addrs = [attachment(h, f"{p}{i}", "shared")["IPAddress"] for h, p in ((a, "a"), (b, "b")) for i in range(2)]
    assert len(set(addrs)) == 4 and all(netaddr.IPAddress(x) in netaddr.IPNetwork("10.7.0.0/24") for x in addrs)
    net = Network.from_dict(etcd.get(keys.network("shared")).value)
    assert net.docker_id == a.docker("network", "inspect", "-f", "{{.Id}}", "shared").stdout.strip()
    # Each host claimed its own block of the shared pool, and the containers reach each other across hosts.
    hosts = {e.host for e in (Endpoint.from_dict(kv.value) for kv in etcd.list(keys.ENDPOINTS))}
    assert hosts == {ha, hb}
    assert poll(lambda: container_pings(a, "a0", addrs[2], attempts=1), timeout=15)
    assert container_pings(b, "b1", addrs[1])


def host_links(ns):
    return sorted(link["ifname"] for link in json.loads(nsexec(ns, "ip -j link show").stdout))


def default_routes(ns):
    return [r for v in ("-4", "-6") for r in nsexec(ns, f"ip {v} route show default").stdout.splitlines()]


def create_dual_stack_network(host):
    """The dual-stack netplugin network ``dc`` both hosts of the no-default-route test create."""
    host.docker(
        "network",
        "create",
        "-d",
        "netplugin",
        "--ipam-driver",
        "netplugin",
        "--ipv6",
        "--subnet",
        "10.11.0.0/16",
        "--subnet",
        "fd11::/64",
        "dc",
    )


def test_docker_on_hosts_without_a_default_route(docker_hosts, namespaces):
    """Data-centre hosts carrying only specific routes. First one host with nothing but lo (its own address
    there) and the containers' veths: two containers of a dual-stack network reach each other and the host.
    Their ARP for 169.254.1.1 is answered by the host veth's own gateway address, not by proxy-ARP (which
    needs a route the host does not have). Then a second such host over a fabric link, BGP between them:
    containers reach each other across hosts, both families."""
    ha, hb = namespaces.add(), namespaces.add()
    hosts = {}
    for ns, (v4, v6), fabric in (
        (ha, ("10.99.0.1", "fd99::1"), ("10.96.0.1", "fd96::1")),
        (hb, ("10.99.0.2", "fd99::2"), ("10.96.0.2", "fd96::2")),
    ):
        nsexec(ns, f"ip addr add {v4}/32 dev lo")
        nsexec(ns, f"ip -6 addr add {v6}/128 dev lo")
        hosts[ns] = ["--routing", "bgp", "--node-address", fabric[0], "--node-address6", fabric[1]]
    a = docker_hosts(ha, agent_args=hosts[ha])
    create_dual_stack_network(a)
    for name in ("a0", "a1"):
        a.docker("run", "-d", "--name", name, "--net", "dc", IMAGE, "sleep", "600")
    a0, a1 = attachment(a, "a0", "dc"), attachment(a, "a1", "dc")
    assert a0["GlobalIPv6Address"] and a1["GlobalIPv6Address"]
    assert default_routes(ha) == [] and [n for n in host_links(ha) if n != "lo" and not n.startswith("np")] == []
    assert len(host_links(ha)) == 3
    for src, dst in (
        ("a0", a1["IPAddress"]),
        ("a1", a0["IPAddress"]),
        ("a0", a1["GlobalIPv6Address"]),
        ("a1", a0["GlobalIPv6Address"]),
        ("a0", "10.99.0.1"),
        ("a1", "fd99::1"),
    ):
        assert container_pings(a, src, dst), f"{src} cannot reach {dst}"
    assert ns_pings(ha, a0["IPAddress"]) and ns_pings(ha, a1["GlobalIPv6Address"])
    neigh = a.docker("exec", "a0", "ip", "neigh", "show", "169.254.1.1").stdout
    assert "ee:ee:ee:ee:ee:ee" in neigh and "PERMANENT" not in neigh, neigh  # learned by ARP

    # A second host, joined to the first by a fabric link only: still no default route on either.
    namespaces.link(ha, hb, "10.96.0.1/30", "10.96.0.2/30")
    nsexec(ha, "ip -6 addr add fd96::1/64 dev eth0 nodad")
    nsexec(hb, "ip -6 addr add fd96::2/64 dev eth0 nodad")
    b = docker_hosts(hb, agent_args=hosts[hb])
    create_dual_stack_network(b)
    b.docker("run", "-d", "--name", "b0", "--net", "dc", IMAGE, "sleep", "600")
    b0 = attachment(b, "b0", "dc")
    assert default_routes(ha) == [] and default_routes(hb) == []
    assert poll(lambda: container_pings(a, "a0", b0["IPAddress"], attempts=1), timeout=60), (
        f"no route across hosts:\n{nsexec(ha, 'ip route').stdout}\n{a.agent.log()[-3000:]}"
    )
    for host, src, dst in (
        (b, "b0", a1["IPAddress"]),
        (a, "a1", b0["GlobalIPv6Address"]),
        (b, "b0", a0["GlobalIPv6Address"]),
    ):
        assert poll(lambda: container_pings(host, src, dst, attempts=1), timeout=30), f"{src} cannot reach {dst}"


# --- the BPF dataplane ----------------------------------------------------------------------------------------------


def test_docker_endpoints_get_the_bpf_program_and_entries(bpffs, docker_hosts, namespaces):
    """With --dataplane bpf a Docker container's host veth runs from_container, its addresses are in
    np_endpoints (netctl bpf endpoints shows them), a forged source is dropped by the program, a flushed entry
    comes back at the next resync, and leaving removes it."""
    from netplugin.dataplane import host_ifname
    from netplugin.kernel.bpf import loader, records
    from tests.functional.test_bpf_agent import SPOOF, counter, netctl_bpf

    ns = uplinked(namespaces)
    h = docker_hosts(ns, agent_args=["--dataplane", "bpf", "--bpffs", str(bpffs / "np"), "--resync-interval", "1"])
    h.pins = loader.Pins(bpffs / "np")
    assert "event=dataplane.selected dataplane=bpf" in h.agent.log_text()
    h.docker("network", "create", "-d", "netplugin", "--ipam-driver", "netplugin", "--subnet", "10.1.0.0/16", "n1")
    h.docker("run", "-d", "--name", "ca", "--net", "n1", IMAGE, "sleep", "600")
    h.docker("run", "-d", "--name", "cb", "--net", "n1", IMAGE, "sleep", "600")
    a, b = attachment(h, "ca", "n1"), attachment(h, "cb", "n1")
    veth = host_ifname(a["EndpointID"])
    where = f"/run/netns/{ns}"
    idx = int(nsexec(ns, f"cat /sys/class/net/{veth}/ifindex").stdout)
    assert loader.attached(veth, netns=where) == ["from_container"]
    rows = {r["interface"]: r for r in netctl_bpf(h, "endpoints")}
    assert rows[veth]["addresses"] == a["IPAddress"] and rows[veth]["ifindex"] == idx, rows
    with h.pins.map("np_locals") as m:
        _, _, mac, _ = records.LOCAL.unpack(m.lookup(records.addr16(a["IPAddress"])))
    assert mac.hex(":") == a["MacAddress"].lower()  # the container end's MAC, learnt without opening the sandbox
    assert container_pings(h, "ca", b["IPAddress"])

    # a forged source from inside the container (its network namespace, entered through its pid)
    pid = h.docker("inspect", "-f", "{{.State.Pid}}", "ca").stdout.strip()
    gw_mac = nsexec(ns, f"cat /sys/class/net/{veth}/address").stdout.strip()
    before = counter(h, idx)
    subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", SPOOF, gw_mac, "10.1.250.250", b["IPAddress"]],
        check=True,
        timeout=60,
    )
    assert counter(h, idx) - before == 5

    # flushed: the next resync writes it again from the endpoint record (the MAC included)
    with h.pins.map("np_endpoints") as m, h.pins.map("np_locals") as loc:
        m.delete(records.ifindex_key(idx))
        loc.delete(records.addr16(a["IPAddress"]))
    assert poll(lambda: veth in {r["interface"] for r in netctl_bpf(h, "endpoints")}, timeout=10, step=0.5)

    h.docker("rm", "-f", "ca")
    assert poll(lambda: veth not in {r["interface"] for r in netctl_bpf(h, "endpoints")}, timeout=10, step=0.5)
