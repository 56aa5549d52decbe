"""The veth of a Docker endpoint: both ends made in the host namespace; libnetwork moves one into the sandbox.

The CNI path (endpoint.py) creates the container end directly inside the container's namespace and addresses
it. Docker works the other way round: at Join the driver names an interface in the host namespace
(``SrcName``), and libnetwork moves it into the sandbox, renames it (``eth0``, ``eth1``, ...), sets the address
the IPAM driver gave, brings it up and adds the routes of the Join answer. So here only the host side is
configured, and it is configured exactly as for CNI, by the same function (``host.converge_endpoint``): the
name ``host_ifname(endpoint)``, the fixed MAC ee:ee:ee:ee:ee:ee, proxy-ARP with proxy_delay 0, strict
rp_filter, forwarding, both gateway addresses, and a ROUTE_PROTO host route per address. The reconciler
therefore treats Docker veths like any other endpoint's (and removes them as strays when no endpoint record
names them). The gateway addresses on the host end are what let a Docker container resolve 169.254.1.1 on a
host without a default route: we never write into the sandbox, which libnetwork configures only after our
answer (host.py).

The container end gets a temporary name that is not ours by ``is_host_ifname`` (``tmp`` + 11 hex digits of the
same hash), the MAC Docker chose (its IPAM asked for one), and the endpoint's MTU. It stays down: libnetwork
brings it up inside the sandbox. Creation is idempotent (a repeated Join converges the pair it finds) and
all-or-nothing (a failure deletes the pair, which takes the routes with it).
"""

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass

from netplugin.dataplane import host, veth
from netplugin.dataplane.model import host_ifname, validate_spec
from netplugin.kernel.netlink import netlink
from netplugin.kernel.netns import open_netns
from netplugin.kernel.rtnl import Batch
from netplugin.errors import AlreadyExists, DataplaneError

log = logging.getLogger(__name__)

CONTAINER_END_PREFIX = "tmp"


@dataclass
class DockerLink:
    endpoint_id: str
    host_ifname: str
    container_ifname: str  # the name libnetwork moves into the sandbox (SrcName)
    mac: str  # the container end's MAC
    addresses: list


def container_ifname(endpoint_id: str) -> str:
    """``tmp`` + the 11 hex digits of ``host_ifname``: unique per endpoint, never mistaken for a host veth."""
    return CONTAINER_END_PREFIX + host_ifname(endpoint_id)[2:]


def _own_netns_fd(host_netns):
    # The peer is created in the host namespace too. With no path that is this process's namespace; no thread
    # of ours ever changes namespace (netlink.py), so /proc/self/ns/net names it.
    return open_netns(host_netns or "/proc/self/ns/net")


def _find_or_create(hnl, name, peer, mtu, mac, host_fd, what, undo):
    """(host link message, fresh). An existing pair of exactly these two names is converged, not recreated."""
    msg = veth.create(hnl, name, peer, host_fd, mtu, mac, what, undo)
    if msg is not None:
        return msg, True
    host_msg, peer_msg = hnl.link(name=name), hnl.link(name=peer)
    if host_msg is not None and peer_msg is not None and veth.is_pair(host_msg, peer_msg):
        if mac and (peer_msg.get("address") or "").lower() != mac.lower():
            batch = Batch()
            batch.link_set(peer_msg["index"], f"set MAC {mac} on {peer} for {what}", address=mac.lower())
            hnl.run(batch)
        return host_msg, False
    if peer_msg is not None and peer_msg.get(("linkinfo", "kind")) != "veth":
        raise AlreadyExists(f"failed to create veth {name} for {what}: {peer} exists and is not a veth")
    stale = [n for n, m in ((name, host_msg), (peer, peer_msg)) if m is not None]
    return veth.replace(hnl, stale, name, peer, host_fd, mtu, mac, what, undo), True


def create(host_netns, spec) -> DockerLink:
    """Make (or converge) the pair for ``spec`` (an EndpointSpec; its ``netns`` is the sandbox, not entered)."""
    started = time.monotonic()
    addrs = validate_spec(spec)
    name, peer = host_ifname(spec.endpoint_id), container_ifname(spec.endpoint_id)
    what = f"endpoint {spec.endpoint_id}"
    host_fd = _own_netns_fd(host_netns)
    try:
        with netlink(host_netns) as hnl, ExitStack() as undo:
            host_msg, fresh = _find_or_create(hnl, name, peer, spec.mtu, spec.mac, host_fd, what, undo)
            host.converge_endpoint(hnl, host_netns, host_msg, fresh, spec.mtu, addrs, what, undo)
            peer_msg = hnl.link(name=peer)
            if peer_msg is None:
                raise DataplaneError(f"failed to create veth {name} for {what}: its peer {peer} vanished")
            link = DockerLink(
                spec.endpoint_id, name, peer, (peer_msg.get("address") or "").lower(), [str(a) for a in addrs]
            )
            undo.pop_all()
    finally:
        os.close(host_fd)
    log.info(
        "docker endpoint %s %s as %s/%s (%s) in %.1f ms",
        spec.endpoint_id,
        "wired" if fresh else "converged",
        name,
        peer,
        ", ".join(link.addresses),
        (time.monotonic() - started) * 1000,
    )
    return link


def remove(host_netns, endpoint_id) -> bool:
    """Delete the pair wherever its container end is (the host end takes it along); gone already is success.

    Also deletes a container end left alone in the host namespace (its host end deleted by hand), so nothing
    of ours outlives the endpoint. Returns True if anything was deleted.
    """
    deleted = False
    with netlink(host_netns) as hnl:
        for name in (host_ifname(endpoint_id), container_ifname(endpoint_id)):
            msg = hnl.link(name=name)
            if msg is None or msg.get(("linkinfo", "kind")) != "veth":
                continue
            batch = Batch()
            batch.link_del(f"delete {name} of endpoint {endpoint_id}", index=msg["index"])
            hnl.run(batch)
            deleted = True
    if deleted:
        log.info("docker endpoint %s unwired", endpoint_id)
    return deleted
