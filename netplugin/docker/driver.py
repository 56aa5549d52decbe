"""The service layer behind the Docker front door: libnetwork's NetworkDriver and IpamDriver calls.

Life of a container on a netplugin network (``docker run --net N``)::

    IpamDriver.RequestAddress   one IPAM transaction: a /32 (and /128) from the network's pool
    NetworkDriver.CreateEndpoint  remember the endpoint's addresses and MAC (no kernel or etcd work)
    NetworkDriver.Join          veth pair in the host netns, host side wired as for CNI (it carries the gateway
                                addresses, so nothing is written into the sandbox); endpoint record put;
                                answer: move ``tmp…`` in as ``eth*``, routes via 169.254.1.1, no gateway service
    (background)                the container's Docker labels copied onto the endpoint record
    (background, every minute)  endpoints Docker no longer lists collected (their DeleteEndpoint was lost)
    NetworkDriver.Leave         nothing: libnetwork moves the interface back out
    NetworkDriver.DeleteEndpoint  record deleted, then the veth (idempotent)
    IpamDriver.ReleaseAddress   the address freed, if a Docker handle of this host holds it (idempotent)

Scope is "local": each dockerd keeps its own network objects, so plain Docker works without Swarm or a
cluster store (what Calico's old driver required). What spans hosts lives in etcd: pools, blocks, endpoint
records and the Network record shared by name; ConnectivityScope "global" says containers of one network on
different hosts reach each other.

The endpoint record and the veth are the service's (EndpointService.join_docker/leave_docker), as for CNI;
in the agent they run under the shared side of the host lock (agent/locked.py), so the dataplane reconciler
never sees a veth no record names.
"""

import logging

import netaddr

from netplugin.dataplane import GATEWAY_V4, GATEWAY_V6, EndpointSpec
from netplugin.docker.dockerapi import DockerApi
from netplugin.docker.gc import StaleEndpointCollector
from netplugin.docker.ipam_driver import DockerIpam
from netplugin.docker.labels import EndpointLabeler
from netplugin.docker.local import Created, LocalEndpoints
from netplugin.docker.networks import NetworkRegistry, parse_create
from netplugin.docker.pools import host_prefix_of
from netplugin.errors import InvalidInput, NetpluginError, NotFound
from netplugin.service.endpoints import NETWORK_LABEL

LOG = logging.getLogger(__name__)
DST_PREFIX = "eth"
ROUTE_NEXTHOP, ROUTE_CONNECTED = 0, 1
NETWORK_CAPABILITIES = {"Scope": "local", "ConnectivityScope": "global"}
IPAM_CAPABILITIES = {"RequiresMACAddress": True, "RequiresRequestReplay": False}


def static_routes(addresses, primary=True, subnets=()):
    """The routes Join asks libnetwork to add in the sandbox.

    The sandbox's first netplugin interface (``primary``) gets, per family, the gateway as a connected route
    and the default route via it, as CNI containers do. A second netplugin interface in the same sandbox
    cannot add those again (the kernel answers "file exists" for 169.254.1.1/32), so it gets its network's
    IPv4 subnets as connected routes instead: traffic to that network leaves through it with its address,
    and the host veth answers ARP for every peer by proxy-ARP. Everything else keeps using the primary's
    default route (so if the primary's network is disconnected first, the others keep only their subnet
    routes: libnetwork offers no way to add routes after Join).
    """
    routes = []
    if not primary:
        for subnet in subnets:
            if netaddr.IPNetwork(subnet).version == 4:
                routes.append({"Destination": str(netaddr.IPNetwork(subnet).cidr), "RouteType": ROUTE_CONNECTED})
        return routes
    for version in sorted({netaddr.IPNetwork(a).version for a in addresses}):
        gw, plen, default = (GATEWAY_V4, 32, "0.0.0.0/0") if version == 4 else (GATEWAY_V6, 128, "::/0")
        routes.append({"Destination": f"{gw}/{plen}", "RouteType": ROUTE_CONNECTED})
        routes.append({"Destination": default, "RouteType": ROUTE_NEXTHOP, "NextHop": gw})
    return routes


def free_subnets(subnets, taken):
    """``subnets`` that overlap none of ``taken`` (a connected route for an overlapping one would collide)."""
    taken = [netaddr.IPNetwork(t) for t in taken]
    return [
        s
        for s in subnets
        if not any(
            t.version == netaddr.IPNetwork(s).version
            and t.first <= netaddr.IPNetwork(s).last
            and netaddr.IPNetwork(s).first <= t.last
            for t in taken
        )
    ]


class DockerDriver:
    """libnetwork's calls on this host's endpoint service, which keeps the records and wires the veths through
    the dataplane backend. Built with its collaborators by ``build_driver``; ``start`` starts its one thread
    (the stale-endpoint collector), ``stop`` ends it."""

    def __init__(self, service, host, mtu, ipam, networks, labeler, local, api=None, gc_interval=60.0, progress=None):
        self.service = service  # an EndpointService (the agent's LockedService)
        self.host = host
        self.mtu = mtu
        self.ipam = ipam  # DockerIpam
        self.networks = networks  # NetworkRegistry
        self.labeler = labeler  # EndpointLabeler
        self.local = local  # LocalEndpoints
        self.api = api  # DockerApi or None
        self.gc_interval = gc_interval  # 0: no background collection (tests run the collector by hand)
        self.collector = (
            None
            if api is None
            else StaleEndpointCollector(
                api, lambda: service.list(host), self.collect, interval=gc_interval or 60.0, progress=progress
            )
        )

    def start(self):
        if self.collector is not None and self.gc_interval:
            self.collector.start()

    def stop(self):
        if self.collector is not None:
            self.collector.stop()

    # --- capabilities ---------------------------------------------------------------------------------------------

    @staticmethod
    def capabilities():
        return dict(NETWORK_CAPABILITIES)

    @staticmethod
    def ipam_capabilities():
        return dict(IPAM_CAPABILITIES)

    # --- IPAM (delegated) -----------------------------------------------------------------------------------------

    def address_spaces(self):
        return self.ipam.address_spaces()

    def request_pool(self, address_space, pool, sub_pool, options, v6):
        return self.ipam.request_pool(address_space, pool, sub_pool, options, v6)

    def release_pool(self, pool_id):
        self.ipam.release_pool(pool_id)

    def request_address(self, pool_id, address, options):
        return self.ipam.request_address(pool_id, address, options)

    def release_address(self, pool_id, address):
        self.ipam.release_address(pool_id, address)

    # --- networks -------------------------------------------------------------------------------------------------

    def create_network(self, network_id, options, ipv4_data, ipv6_data):
        net = parse_create(network_id, options, ipv4_data, ipv6_data)
        self.networks.add(net)
        LOG.info("event=docker.network.created id=%s subnets=%s", network_id[:12], ",".join(net.subnets))

    def delete_network(self, network_id):
        try:
            self.networks.remove(network_id)
        except NetpluginError as e:  # the record is metadata: never keep Docker from removing its network
            LOG.warning("event=docker.network.record_kept id=%s error=%s", network_id[:12], e.msg)
        LOG.info("event=docker.network.deleted id=%s", network_id[:12])

    # --- endpoints ------------------------------------------------------------------------------------------------

    def create_endpoint(self, network_id, endpoint_id, interface, options):
        """Remember addresses and MAC for Join; answer an empty Interface (libnetwork gave us one)."""
        interface = interface or {}
        addresses = [
            host_prefix_of(interface[k], "endpoint address") for k in ("Address", "AddressIPv6") if interface.get(k)
        ]
        if not addresses:
            raise InvalidInput(
                f"endpoint {endpoint_id[:12]} has no address: netplugin networks need netplugin IPAM "
                "(docker network create -d netplugin --ipam-driver netplugin ...)"
            )
        net = self.networks.get(network_id)  # name and record now, so Join does not wait on dockerd
        self.local.created(endpoint_id, network_id, addresses, interface.get("MacAddress") or None)
        LOG.info(
            "event=docker.endpoint.created id=%s network=%s addresses=%s",
            endpoint_id[:12],
            net.name,
            ",".join(addresses),
        )
        return {}

    def _pending(self, endpoint_id):
        pending = self.local.pending(endpoint_id)
        if pending is not None:
            return pending
        ep = self.service.get(endpoint_id)
        if ep is not None:  # joined before (a repeated Join): the record has it all
            return Created(None, list(ep.addresses), ep.mac)
        raise NotFound(
            f"endpoint {endpoint_id[:12]} is unknown to this agent (was it created before the agent "
            "restarted?); start the container again"
        )

    def join(self, network_id, endpoint_id, sandbox_key, options):
        pending = self._pending(endpoint_id)
        if pending.network_id not in (None, network_id):
            raise InvalidInput(
                f"endpoint {endpoint_id[:12]} was created on network {pending.network_id[:12]}, not {network_id[:12]}"
            )
        net = self.networks.get(network_id)
        if not sandbox_key or not sandbox_key.startswith("/"):
            raise InvalidInput(f"sandbox key {sandbox_key!r} of endpoint {endpoint_id[:12]} is not a path")
        # libnetwork names the interface in the sandbox (eth0, eth1, ...); the record says eth0, which only the
        # reconciler's "recreate a lost veth" path would use.
        spec = EndpointSpec(
            endpoint_id=endpoint_id,
            netns=sandbox_key,
            ifname="eth0",
            addresses=tuple(pending.addresses),
            mtu=net.mtu or self.mtu,
            mac=pending.mac,
        )
        base_labels = {**net.labels, NETWORK_LABEL: net.name}
        others = self.local.peers(sandbox_key, endpoint_id)
        routes = static_routes(
            pending.addresses,
            primary=not others,
            subnets=free_subnets(net.subnets, [s for name in others for s in self.networks.subnets_of(name)]),
        )
        _, link = self.service.join_docker(spec, net.name, base_labels, net.mtu)
        self.local.joined(endpoint_id, sandbox_key, net.name, link.host_ifname, pending.addresses)
        self.labeler.submit(network_id, endpoint_id, base_labels)
        self.service.policy_ready(endpoint_id)
        LOG.info(
            "event=docker.endpoint.joined id=%s network=%s host_if=%s primary=%s",
            endpoint_id[:12],
            net.name,
            link.host_ifname,
            not others,
        )
        return {
            "InterfaceName": {"SrcName": link.container_ifname, "DstPrefix": DST_PREFIX},
            "StaticRoutes": routes,
            "DisableGatewayService": True,
        }

    def leave(self, network_id, endpoint_id):
        """libnetwork moves the interface back to the host netns itself; DeleteEndpoint removes it."""
        LOG.info("event=docker.endpoint.left id=%s", endpoint_id[:12])

    def delete_endpoint(self, network_id, endpoint_id):
        """Record first, then the veth: a reconcile in between deletes a veth no record names, never the reverse."""
        self.labeler.cancel(endpoint_id)
        self.local.forget(endpoint_id)
        ep = self.service.get(endpoint_id)
        self.service.leave_docker(endpoint_id)
        try:
            if ep is not None:
                self.networks.endpoint_gone(ep.network)
        except NetpluginError as e:  # metadata again: the endpoint is gone either way
            LOG.warning("event=docker.network.record_kept name=%s error=%s", ep.network, e.msg)
        LOG.info("event=docker.endpoint.deleted id=%s", endpoint_id[:12])

    def collect(self, ep):
        """Forget an endpoint Docker no longer has: record, veth and its addresses (Docker handles of ours)."""
        self.delete_endpoint(None, ep.id)
        for address in ep.addresses:
            self.ipam.release_host_address(address)

    def endpoint_info(self, network_id, endpoint_id):
        """Informational (``docker network inspect`` does not show it); from memory, else the record."""
        info = self.local.info(endpoint_id)
        if info is None:
            ep = self.service.get(endpoint_id)
            info = {"host_ifname": ep.host_ifname, "addresses": ",".join(ep.addresses)} if ep else {}
        return info


def build_driver(ds, ipam, service, host, config, progress=None) -> DockerDriver:
    """The driver and its collaborators for ``config`` (an AgentConfig: mtu, docker_api, docker_gc_interval)."""
    api = DockerApi(config.docker_api) if config.docker_api else None
    if api is None:
        LOG.warning(
            "event=docker.no_api: networks are named by their Docker id and container labels are not "
            "copied to endpoints (give the agent --docker-api)"
        )
    return DockerDriver(
        service,
        host,
        config.mtu,
        DockerIpam(ipam, host),
        NetworkRegistry(ds, ipam, api),
        EndpointLabeler(ds, api, host, progress=progress),
        LocalEndpoints(lambda: service.list(host)),
        api,
        config.docker_gc_interval,
        progress,
    )
