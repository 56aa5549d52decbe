"""The container side of an endpoint: its interface, host addresses, gateway neighbours and default routes.

The container's interface has only host addresses (/32, /128) and no on-link subnet, so every packet goes to
the gateway: 169.254.1.1 (a scope-link route to it first, then ``default via 169.254.1.1 onlink``) and
fe80::ecee:eeff:feee:eeee. Both gateways get a permanent neighbour entry pointing at the host veth's fixed
MAC, so the first packet needs no ARP/ND round trip. It is only that: the host veth carries both gateway
addresses and answers for them itself (host.py), which is what Docker containers, whose neighbour table we
never write, rely on.
"""

import errno
import ipaddress
import socket

from netplugin.dataplane import sysctl
from netplugin.dataplane.host import address_of, route_prefix
from netplugin.dataplane.model import GATEWAY_V4, GATEWAY_V6, HOST_VETH_MAC
from netplugin.kernel.rtnl import IFF_UP, RT_SCOPE_LINK, RT_SCOPE_UNIVERSE, Batch

GATEWAYS = {4: GATEWAY_V4, 6: GATEWAY_V6}
_DEFAULT = {4: ipaddress.ip_interface("0.0.0.0/0"), 6: ipaddress.ip_interface("::/0")}


def ipv6_disabled(msg) -> bool:
    spec = msg.get("af_spec")
    inet6 = spec.get("AF_INET6") if spec else None
    conf = inet6.get("IFLA_INET6_CONF") if inet6 else None
    return conf is None or conf.get("disable_ipv6") == 1


def global_addresses(nl, idx) -> set:
    return {address_of(a) for a in nl.addresses(0, idx) if a["scope"] == RT_SCOPE_UNIVERSE}


def enable_ipv6_if_needed(msg, spec, addrs) -> None:
    """Docker sandboxes of networks without IPv6 start with it disabled; only then is a child needed."""
    if any(a.version == 6 for a in addrs) and ipv6_disabled(msg):
        where = f"{spec.ifname} in netns '{spec.netns}'"
        sysctl.write(spec.netns, {sysctl.conf_key(6, spec.ifname, "disable_ipv6"): 0}, f"enable IPv6 on {where}")


def plan(batch: Batch, idx: int, spec, addrs, msg=None, have=frozenset()):
    """Requests that make the container interface match ``spec``. ``msg`` None: just created as specified.

    Returns the addresses this plan adds (so an idempotent re-ADD can undo exactly those on failure).
    """
    where = f"{spec.ifname} in netns '{spec.netns}'"
    if msg is not None:
        if msg.get("mtu") != spec.mtu:
            batch.link_set(idx, f"set MTU {spec.mtu} on {where}", mtu=spec.mtu)
        if spec.mac and (msg.get("address") or "").lower() != spec.mac.lower():
            batch.link_set(idx, f"set MAC {spec.mac} on {where}", address=spec.mac.lower())
    added = [a for a in addrs if a not in have]
    for addr in added:
        # IPv6 without DAD: usable at once; uniqueness comes from IPAM.
        batch.address("add", idx, addr, f"add address {addr} to {where}", nodad=addr.version == 6, ok=(errno.EEXIST,))
    for addr in sorted(set(have) - set(addrs), key=str):
        batch.address("del", idx, addr, f"delete address {addr} from {where}", ok=(errno.EADDRNOTAVAIL,))
    if msg is None or not msg["flags"] & IFF_UP:
        batch.link_set(idx, f"bring up {where}", up=True)
    for family in sorted({a.version for a in addrs}):
        gateway = GATEWAYS[family]
        batch.neighbour(idx, gateway, HOST_VETH_MAC, f"add gateway neighbour {gateway} on {where}")
        if family == 4:
            batch.route("replace", f"{gateway}/32", f"add route to {gateway} on {where}", oif=idx, scope=RT_SCOPE_LINK)
            batch.route(
                "replace",
                "0.0.0.0/0",
                f"add default route via {gateway} on {where}",
                oif=idx,
                gateway=gateway,
                onlink=True,
            )
        else:
            batch.route("replace", "::/0", f"add default route via {gateway} on {where}", oif=idx, gateway=gateway)
    return added


def problems(nl, msg, spec, addrs) -> list:
    """What differs between the container interface and ``spec``."""
    where = f"{spec.ifname} in netns '{spec.netns}'"
    idx = msg["index"]
    out = []
    if not msg["flags"] & IFF_UP:
        out.append(f"{where} is down")
    if msg.get("mtu") != spec.mtu:
        out.append(f"{where} has MTU {msg.get('mtu')}, expected {spec.mtu}")
    if spec.mac and (msg.get("address") or "").lower() != spec.mac.lower():
        out.append(f"{where} has MAC {msg.get('address')}, expected {spec.mac.lower()}")
    have = global_addresses(nl, idx)
    out += [f"{where} lacks address {a}" for a in addrs if a not in have]
    out += [f"{where} has unexpected address {a}" for a in sorted(have - set(addrs), key=str)]
    routes = nl.routes(family=socket.AF_UNSPEC, table=254)
    for family in sorted({a.version for a in addrs}):
        gateway = GATEWAYS[family]
        found = any(
            route_prefix(r) == _DEFAULT[family] and r.get("gateway") == gateway and r.get("oif") == idx
            for r in routes
            if r["family"] in (socket.AF_INET, socket.AF_INET6)
        )
        if not found:
            out.append(f"{where} lacks the default route via {gateway}")
    return out
