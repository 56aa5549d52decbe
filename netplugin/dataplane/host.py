"""The host side of endpoints: what the kernel has (one snapshot) and the requests that converge it.

We own exactly: links whose name ``host_ifname`` could produce (``np`` + 11 hex) and that are veths, unicast
routes with protocol ROUTE_PROTO in the main table whose device is one of those links, and blackhole routes
with protocol ROUTE_PROTO. Routes of other writers (routing's direct mode uses its own number) are never read
as ours, never changed. Planning functions append requests to an ``rtnl.Batch`` and return what they
changed; the caller commits, so ADD sends a step in one go and reconcile sends all repairs in one go.

Gateways: every host veth carries both gateway addresses itself, 169.254.1.1/32 and fe80::ecee:eeff:feee:eeee/64,
so the kernel answers a container's ARP or neighbour solicitation for its gateway as it does for any address
of its own: no route, nothing written into the container, the same for the CNI and the Docker path. Proxy-ARP
alone is not enough: it answers only for a target the host routes out of another interface, so on a host with
only specific routes (no default route) a container's ARP for 169.254.1.1 stayed INCOMPLETE. CNI containers
got by with a permanent neighbour entry (container.py; kept, it spares the first packet an ARP round trip),
but a Docker sandbox cannot be written at Join (libnetwork moves and configures the interface after our
answer, and a move flushes neighbour entries), and a per-container write afterwards would race the container.

The IPv4 address has scope host, so the kernel never picks it as the source of host-to-container traffic
(with scope link it would: containers would see the host's probes come from 169.254.1.1). The ARP reply for
it needs ``arp_ignore`` 0 or 1, and the kernel takes the larger of ``all`` and the veth's own value: we set
the veth's to 0 (a new link inherits ``default``'s), and ``Dataplane.setup_host`` warns when ``all`` is above 1,
which silences every gateway (proxy-ARP does not help then either). The same address on many veths is
fine (the reference CNI ``ptp`` plugin does it as well): its local route stays while any veth has it.
Proxy-ARP stays on for the other addresses a container may ask for (the subnet peers of a second interface).
"""

import errno
import ipaddress
import socket
from dataclasses import dataclass, field

from netplugin.errors import AlreadyExists
from netplugin.dataplane import sysctl
from netplugin.dataplane.undo import quietly
from netplugin.dataplane.model import GATEWAY_V4, GATEWAY_V6, HOST_VETH_MAC, MAIN_TABLE, ROUTE_PROTO, is_host_ifname
from netplugin.kernel.rtnl import (
    IFF_UP,
    RT_SCOPE_HOST,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RTN_BLACKHOLE,
    RTN_UNICAST,
    Batch,
)

IN6_ADDR_GEN_MODE_NONE = 1
# ``proxy_delay`` of a link we just created: the kernel default, so ours must be written (no dump needed).
PROXY_DELAY_FRESH = -1
RT_SCOPE_NOWHERE = 255
# The gateway addresses every host veth carries (see above), per family.
GATEWAY_IFACES = {4: ipaddress.ip_interface(f"{GATEWAY_V4}/32"), 6: ipaddress.ip_interface(f"{GATEWAY_V6}/64")}
GATEWAY_SCOPES = {4: RT_SCOPE_HOST, 6: RT_SCOPE_UNIVERSE}  # IPv6 takes the scope from the address: link


@dataclass
class HostView:
    """Our part of the host namespace, read with one dump per object kind."""

    links: dict = field(default_factory=dict)  # host ifname -> link message
    routes: dict = field(default_factory=dict)  # ifindex -> set of ip_interface (our host routes)
    blackholes: set = field(default_factory=set)  # ip_network
    proxy_delay: dict = field(default_factory=dict)  # ifindex -> ARP proxy_delay in ms
    addresses: dict = field(default_factory=dict)  # ifindex -> set of ip_interface (both families), our links only


def is_our_link(msg) -> bool:
    return is_host_ifname(msg.get("ifname")) and msg.get(("linkinfo", "kind")) == "veth"


def route_prefix(msg):
    family = 4 if msg["family"] == socket.AF_INET else 6
    dst = msg.get("dst") or ("0.0.0.0" if family == 4 else "::")
    return ipaddress.ip_interface(f"{dst}/{msg['dst_len']}")


def address_of(msg):
    return ipaddress.ip_interface(f"{msg.get('address')}/{msg['prefixlen']}")


def read_routes(nl, oif=None):
    """(host routes by ifindex, blackholes): our protocol in the main table, both families, kernel-filtered."""
    routes, blackholes = {}, set()
    for msg in nl.routes(family=socket.AF_UNSPEC, table=MAIN_TABLE, proto=ROUTE_PROTO, oif=oif):
        if msg["family"] not in (socket.AF_INET, socket.AF_INET6) or msg["proto"] != ROUTE_PROTO:
            continue
        if msg["type"] == RTN_BLACKHOLE:
            blackholes.add(route_prefix(msg).network)
        elif msg["type"] == RTN_UNICAST and msg.get("oif"):
            routes.setdefault(msg.get("oif"), set()).add(route_prefix(msg))
    return routes, blackholes


def read_blackholes(nl) -> set:
    """Our blackholes only (the kernel filters by protocol and route type): no host route is read."""
    msgs = nl.routes(family=socket.AF_UNSPEC, table=MAIN_TABLE, proto=ROUTE_PROTO, kind=RTN_BLACKHOLE)
    return {
        route_prefix(m).network
        for m in msgs
        if m["family"] in (socket.AF_INET, socket.AF_INET6) and m["proto"] == ROUTE_PROTO and m["type"] == RTN_BLACKHOLE
    }


def read_proxy_delay(nl) -> dict:
    out = {}
    for msg in nl.neighbour_tables(socket.AF_INET):
        parms = msg.get("NDTA_PARMS")
        if msg.get("NDTA_NAME") == "arp_cache" and parms and parms.get("NDTPA_IFINDEX"):
            out[parms.get("NDTPA_IFINDEX")] = parms.get("NDTPA_PROXY_DELAY")
    return out


def read_addresses(nl, index=0) -> dict:
    """ifindex -> addresses, both families (one dump; ``index`` filters where the kernel does)."""
    out = {}
    for msg in nl.addresses(socket.AF_UNSPEC, index):
        if msg["family"] in (socket.AF_INET, socket.AF_INET6):
            out.setdefault(msg["index"], set()).add(address_of(msg))
    return out


def snapshot(nl) -> HostView:
    view = HostView()
    for msg in nl.links():
        if is_our_link(msg):
            view.links[msg.get("ifname")] = msg
    view.routes, view.blackholes = read_routes(nl)
    view.proxy_delay = read_proxy_delay(nl)
    ours = {msg["index"] for msg in view.links.values()}
    view.addresses = {k: v for k, v in read_addresses(nl).items() if k in ours}
    return view


def gateway_families(ipv6: bool):
    return (4, 6) if ipv6 else (4,)


def link_problems(msg, mtu: int, ipv6: bool, proxy_delay=None, addresses=None) -> list:
    """Differences between one host veth (as the kernel reports it) and what it must be."""
    name = msg.get("ifname")
    out = []
    if not msg["flags"] & IFF_UP:
        out.append(f"host veth {name} is down")
    if msg.get("mtu") != mtu:
        out.append(f"host veth {name} has MTU {msg.get('mtu')}, expected {mtu}")
    if (msg.get("address") or "").lower() != HOST_VETH_MAC:
        out.append(f"host veth {name} has MAC {msg.get('address')}, expected {HOST_VETH_MAC}")
    want = sysctl.desired_host_sysctls(name, ipv6)
    have = sysctl.link_sysctls(msg, proxy_delay)
    for key, value in sorted(sysctl.drift(want, have, skip_unknown=[sysctl.neigh_key(name, "proxy_delay")]).items()):
        out.append(f"host veth {name}: {key.replace('/', '.')} is {have.get(key)}, expected {value}")
    for family in gateway_families(ipv6) if addresses is not None else ():
        if GATEWAY_IFACES[family] not in addresses:
            out.append(f"host veth {name} lacks the IPv{family} gateway address {GATEWAY_IFACES[family]}")
    return out


def _addr_gen_mode(msg):
    spec = msg.get("af_spec")
    inet6 = spec.get("AF_INET6") if spec else None
    return inet6.get("IFLA_INET6_ADDR_GEN_MODE") if inet6 else None


def plan_link(batch: Batch, msg, mtu: int, ipv6: bool, what: str, proxy_delay=None, addresses=None):
    """Requests that make a host veth right, ending with "up". Returns (changes, IPv6 sysctls to write).

    ``proxy_delay`` None means unknown (not worth a dump): left alone; PROXY_DELAY_FRESH: a new link, set it.
    ``addresses`` (the link's, both families) None: unknown, the gateway addresses are added and an "exists"
    answer accepted.
    """
    name, idx = msg.get("ifname"), msg["index"]
    changes = []
    want = sysctl.desired_host_sysctls(name, ipv6)
    fixes = sysctl.drift(
        want, sysctl.link_sysctls(msg, proxy_delay), skip_unknown=[sysctl.neigh_key(name, "proxy_delay")]
    )
    inet_conf = {k: v for k in sysctl.V4_CONF if (v := fixes.get(sysctl.conf_key(4, name, k))) is not None}
    gen_mode = IN6_ADDR_GEN_MODE_NONE if ipv6 and _addr_gen_mode(msg) != IN6_ADDR_GEN_MODE_NONE else None
    if inet_conf or gen_mode is not None:
        # Automatic link-local generation off: we add the gateway address ourselves, without the second of
        # duplicate-address detection during which containers could not reach their IPv6 gateway.
        batch.link_set(idx, f"configure {what}", inet_conf=inet_conf, addr_gen_mode=gen_mode)
        changes += [f"{name}: net.ipv4.conf.{name}.{k}={v}" for k, v in sorted(inet_conf.items())]
        changes += [f"{name}: addrgenmode none"] if gen_mode is not None else []
    if sysctl.neigh_key(name, "proxy_delay") in fixes:
        batch.proxy_delay(idx, sysctl.PROXY_DELAY, f"set proxy_delay on {what}")
        changes.append(f"{name}: net.ipv4.neigh.{name}.proxy_delay={sysctl.PROXY_DELAY}")
    v6_sysctls = {k: v for k, v in fixes.items() if k.startswith("net/ipv6/")}
    changes += [f"{name}: {k.replace('/', '.')}={v}" for k, v in sorted(v6_sysctls.items())]
    for family in gateway_families(ipv6):
        gateway = GATEWAY_IFACES[family]
        if addresses is None or gateway not in addresses:
            batch.address(
                "add",
                idx,
                gateway,
                f"add IPv{family} gateway address {gateway.ip} to {what}",
                nodad=family == 6,
                scope=GATEWAY_SCOPES[family],
                ok=(errno.EEXIST,),
            )
            changes.append(f"{name}: address {gateway.ip}")
    mac = HOST_VETH_MAC if (msg.get("address") or "").lower() != HOST_VETH_MAC else None
    new_mtu = mtu if msg.get("mtu") != mtu else None
    if mac or new_mtu:
        batch.link_set(idx, f"set MTU/MAC of {what}", mtu=new_mtu, address=mac)
        changes += [f"{name}: mtu {msg.get('mtu')} -> {mtu}"] if new_mtu else []
        changes += [f"{name}: mac -> {mac}"] if mac else []
    if not msg["flags"] & IFF_UP:
        batch.link_set(idx, f"bring up {what}", up=True)
        changes.append(f"{name}: up")
    return changes, v6_sysctls


def converge_endpoint(hnl, host_netns, msg, fresh: bool, mtu: int, addrs, what: str, undo) -> None:
    """The host side of one endpoint at ADD or Join (CNI and Docker alike), in one batch: settings, gateway
    addresses, up, routes. ``fresh``: ``msg`` is the link the kernel just created, so nothing is read; else
    its addresses and routes are read first, and each route this adds is deleted by ``undo`` (an ExitStack)
    if a later step of the caller fails."""
    name, idx = msg.get("ifname"), msg["index"]
    ipv6 = any(a.version == 6 for a in addrs)
    batch = Batch()
    _, v6_sysctls = plan_link(
        batch,
        msg,
        mtu,
        ipv6,
        f"{name} for {what}",
        proxy_delay=PROXY_DELAY_FRESH if fresh else None,
        addresses=set() if fresh else read_addresses(hnl, idx).get(idx, set()),
    )
    sysctl.write(host_netns, v6_sysctls, f"configure IPv6 settings of {name} for {what}")
    have = set() if fresh else read_routes(hnl, oif=idx)[0].get(idx, set())
    plan_routes(batch, idx, name, addrs, have, what)
    for addr in () if fresh else set(addrs) - have:
        undo.callback(quietly, _undo_route, hnl, addr, idx, name)
    failures, _ = hnl.commit(batch)
    raise_failures(hnl, failures)


def failure_errors(hnl, failures) -> list:
    """The errors of a committed batch's failures, in order; a route add that finds its own route is none."""
    out = []
    for failure in failures:
        tag = failure.request.tag
        err = route_conflict(hnl, failure) if tag and tag[0] == "route" else failure.error()
        if err is not None:
            out.append(err)
    return out


def raise_failures(hnl, failures) -> None:
    """Raise the first real failure of a committed batch."""
    errors = failure_errors(hnl, failures)
    if errors:
        raise errors[0]


def _undo_route(hnl, addr, idx, name):
    batch = Batch()
    plan_routes(batch, idx, name, [], [addr], "undo")
    hnl.run(batch)


def plan_routes(batch: Batch, idx: int, name: str, want, have, what: str):
    """Host routes for exactly ``want`` on this veth; add requests are tagged with their prefix."""
    added, removed = [], []
    for addr in sorted(set(want) - set(have), key=str):
        batch.route(
            "add",
            addr.network,
            f"add route {addr} dev {name} for {what}",
            oif=idx,
            scope=RT_SCOPE_LINK if addr.version == 4 else 0,
            proto=ROUTE_PROTO,
            table=MAIN_TABLE,
            tag=("route", addr, idx, name, what),
        )
        added.append(f"{addr} dev {name}")
    for addr in sorted(set(have) - set(want), key=str):
        batch.route(
            "del",
            addr.network,
            f"delete route {addr} dev {name}",
            oif=idx,
            scope=RT_SCOPE_NOWHERE,
            proto=ROUTE_PROTO,
            table=MAIN_TABLE,
            ok=(errno.ESRCH, errno.ENODEV),
        )
        removed.append(f"{addr} dev {name}")
    return added, removed


def plan_blackholes(batch: Batch, want: set, have: set):
    """Blackholes for exactly the owned blocks; returns (added, removed) as strings."""
    added, removed = sorted(want - have, key=str), sorted(have - want, key=str)
    for net in added:
        batch.route("replace", net, f"add blackhole route {net}", kind=RTN_BLACKHOLE, proto=ROUTE_PROTO)
    for net in removed:
        batch.route(
            "del",
            net,
            f"delete blackhole route {net}",
            kind=RTN_BLACKHOLE,
            proto=ROUTE_PROTO,
            scope=RT_SCOPE_NOWHERE,
            ok=(errno.ESRCH,),
        )
    return [str(n) for n in added], [str(n) for n in removed]


def describe_route(nl, prefix) -> str:
    """How the kernel routes exactly ``prefix`` today, for conflict messages (error path only)."""
    family = socket.AF_INET if prefix.version == 4 else socket.AF_INET6
    for msg in nl.routes(family=family, table=MAIN_TABLE):
        if route_prefix(msg) != prefix:
            continue
        if msg["type"] == RTN_BLACKHOLE:
            return f"as a blackhole (proto {msg['proto']})"
        link = nl.link(index=msg.get("oif") or 0) if msg.get("oif") else None
        dev = link.get("ifname") if link is not None else msg.get("oif")
        return f"via dev {dev} (proto {msg['proto']})"
    return "by another route"


def route_conflict(nl, failure):
    """Turn a failed route add into the error to raise, or None if the route is in fact already ours."""
    _, addr, idx, name, what = failure.request.tag
    if failure.errno != errno.EEXIST:
        return failure.error()
    routes, _ = read_routes(nl, oif=idx)
    if addr in routes.get(idx, ()):
        return None
    return AlreadyExists(
        f"failed to add route {addr} dev {name} for {what}: the address is already routed {describe_route(nl, addr)}"
    )
