"""Add, remove and check one endpoint: a veth pair between the host namespace and a container namespace.

ADD is all-or-nothing: every step that creates something pushes its undo onto an ExitStack, which runs only
if a later step fails (creating the veth pushes "delete the veth", which takes the peer, its addresses and
our host routes with it). ADD is also idempotent: an existing pair is converged in place, never recreated,
so a repeated ADD does not interrupt a running container.

A fresh ADD is four kernel round trips: create the pair (the kernel echoes the new link, so we learn both
indexes and the current settings without asking), read the container side (IPv6 only), configure the host
side in one batch (devconf and rp_filter before "up", so no packet is ever accepted unchecked; the gateway
addresses; then the routes: host.converge_endpoint, shared with the Docker path), configure the container side
in one batch. Plus one sysctl child for IPv6 settings when the host
namespace is given by path (none when the agent runs in the host namespace, none for IPv4-only endpoints).
"""

import errno
import logging
import os
import time
from contextlib import ExitStack

from netplugin.errors import AlreadyExists, DataplaneError, InvalidInput, NotFound
from netplugin.dataplane import container, host, veth
from netplugin.dataplane.model import EndpointState, host_ifname
from netplugin.dataplane.undo import quietly
from netplugin.kernel.netlink import netlink, netlink_fd, netlink_fd_soon
from netplugin.kernel.netns import open_netns
from netplugin.kernel.rtnl import Batch

log = logging.getLogger(__name__)


def paired(hnl, host_msg, cont_msg, cont_fd) -> bool:
    """True when the host veth and the container interface are the two ends of one veth pair."""
    if not veth.is_pair(host_msg, cont_msg):
        return False
    # Interface indexes repeat across namespaces; the peer's namespace id settles it.
    nsid = hnl.nsid_of(cont_fd)
    return nsid >= 0 and host_msg.get("link_netnsid") == nsid


def _find_or_create(hnl, container_nl, name, spec, cont_fd, what, undo):
    """(host link, container link or None, fresh). Registers the undo of anything it creates. ``container_nl()``
    is the container's netlink handle, asked for only when the pair may exist already."""
    msg = veth.create(hnl, name, spec.ifname, cont_fd, spec.mtu, spec.mac, what, undo)
    if msg is not None:
        return msg, None, True
    where = f"netns '{spec.netns}'"
    host_msg = hnl.link(name=name)
    cont_msg = container_nl().link(name=spec.ifname)
    if cont_msg is not None:
        if host_msg is not None and paired(hnl, host_msg, cont_msg, cont_fd):
            return host_msg, cont_msg, False
        raise AlreadyExists(f"failed to create veth {name} for {what}: {spec.ifname} already exists in {where}")
    if host_msg is None:
        raise DataplaneError(f"failed to create veth {name} for {what}: the kernel says it exists, but it does not")
    # Our name, but its peer is not this container's interface: a leftover of an earlier incarnation.
    return veth.replace(hnl, [name], name, spec.ifname, cont_fd, spec.mtu, spec.mac, what, undo), None, True


def add(host_netns, spec, addrs) -> EndpointState:
    """Create or converge the endpoint; on any failure leave the kernel as it was."""
    started = time.monotonic()
    name = host_ifname(spec.endpoint_id)
    what = f"endpoint {spec.endpoint_id}"
    ipv6 = any(a.version == 6 for a in addrs)
    cont_fd = open_netns(spec.netns)
    try:
        # The container's netlink socket is made while the pair is created and, for IPv4, the host side wired.
        with netlink(host_netns) as hnl, netlink_fd_soon(cont_fd, spec.netns) as container_nl, ExitStack() as undo:
            host_msg, cont_msg, fresh = _find_or_create(hnl, container_nl, name, spec, cont_fd, what, undo)
            peer = host_msg.get("link")
            if cont_msg is None and ipv6:
                cont_msg = container_nl().link(index=peer)
            if cont_msg is not None:
                container.enable_ipv6_if_needed(cont_msg, spec, addrs)

            # Host side: settings, gateway addresses, then up, then routes, in one batch.
            host.converge_endpoint(hnl, host_netns, host_msg, fresh, spec.mtu, addrs, what, undo)

            # Container side in one batch.
            cnl = container_nl()
            cb = Batch()
            have_addrs = set() if fresh else container.global_addresses(cnl, cont_msg["index"])
            cidx = peer if fresh else cont_msg["index"]
            new_addrs = container.plan(cb, cidx, spec, addrs, msg=None if fresh else cont_msg, have=have_addrs)
            if not fresh:
                for addr in new_addrs:
                    undo.callback(quietly, _undo_address, cnl, cidx, addr)
            cnl.run(cb)
            if fresh:
                _wait_host_end_running(hnl, host_msg["index"], name, what)

            state = EndpointState(
                endpoint_id=spec.endpoint_id,
                host_ifname=name,
                mac=spec.mac.lower() if spec.mac else _container_mac(cnl, cidx, cont_msg),
                ifindex_in_container=cidx,
                addresses=[str(a) for a in addrs],
                created=fresh,
            )
            undo.pop_all()
    finally:
        os.close(cont_fd)
    log.info(
        "endpoint %s %s as %s (%s) in %.1f ms",
        spec.endpoint_id,
        "added" if fresh else "converged",
        name,
        ", ".join(state.addresses) or "no addresses",
        (time.monotonic() - started) * 1000,
    )
    return state


def _wait_host_end_running(hnl, index, name, what, timeout=0.5):
    """Until the kernel has attached the host end's queueing discipline (bounded). The host end comes up first,
    without a carrier (its peer is still down), so the kernel attaches its qdisc only when its linkwatch worker
    handles the carrier-on event, right after it marks the link operationally up; until then the host end drops
    what it sends (ARP to the container, the first reply to the container's first packet, which then comes a
    second late). That worker is a kernel thread, and on a busy host it runs milliseconds later; ADD must not
    return before it did. The container end came up second, with its carrier, so it is ready at once."""
    deadline = time.monotonic() + timeout
    while True:
        msg = hnl.link(index=index)
        if msg is None or msg.get("operstate") == "UP":
            return
        if time.monotonic() > deadline:
            log.warning("%s: host veth %s not operationally up after %.1f s; going on", what, name, timeout)
            return
        time.sleep(0.0005)


def _container_mac(cnl, cidx, cont_msg):
    msg = cont_msg if cont_msg is not None else cnl.link(index=cidx)
    return (msg.get("address") if msg is not None else "") or ""


def _undo_address(cnl, idx, addr):
    batch = Batch()
    batch.address("del", idx, addr, f"delete address {addr}", ok=(errno.EADDRNOTAVAIL, errno.ENODEV))
    cnl.run(batch)


def detach(host_netns, endpoint_id, netns=None, ifname="eth0") -> bool:
    """DEL's first half, what must be gone before the addresses are released: the host routes to the container
    (so nothing is routed into the old veth, and strict reverse-path filtering drops anything the old container
    still sends from those addresses), then the container interface's global addresses when its namespace is
    still there. Fast (route and address deletes). Deleting the pair (``remove``) is the slow half: the kernel
    waits for RCU grace periods to unregister a device, 15-20 ms here, and the caller need not wait for it.
    Returns False when there is no host veth (then ``remove`` has only the orphan case left)."""
    name = host_ifname(endpoint_id)
    what = f"DEL of endpoint {endpoint_id}"
    with netlink(host_netns) as hnl:
        host_msg = hnl.link(name=name)
        if host_msg is None:
            return False
        idx = host_msg["index"]
        batch = Batch()
        host.plan_routes(batch, idx, name, [], host.read_routes(hnl, oif=idx)[0].get(idx, set()), what)
        hnl.run(batch)
        if netns is None:
            return True
        try:
            fd = open_netns(netns)
        except (NotFound, InvalidInput):  # the runtime removed it already: its addresses went with it
            return True
        try:
            with netlink_fd(fd, netns) as cnl:
                cont_msg = cnl.link(name=ifname)
                if cont_msg is None or not paired(hnl, host_msg, cont_msg, fd):
                    return True
                batch = Batch()
                for addr in sorted(container.global_addresses(cnl, cont_msg["index"]), key=str):
                    batch.address(
                        "del",
                        cont_msg["index"],
                        addr,
                        f"delete {addr} from {ifname} in netns '{netns}' for {what}",
                        ok=(errno.EADDRNOTAVAIL, errno.ENODEV),
                    )
                cnl.run(batch)
        finally:
            os.close(fd)
    return True


def remove(host_netns, endpoint_id, netns=None, ifname="eth0") -> bool:
    """Delete the pair; a missing link or namespace is success. Returns True if something was deleted."""
    name = host_ifname(endpoint_id)
    with netlink(host_netns) as hnl:
        batch = Batch()
        batch.link_del(f"delete veth {name} of endpoint {endpoint_id}", name=name, ok=())
        failures, _ = hnl.commit(batch)
        if not failures:
            log.info("endpoint %s removed (%s)", endpoint_id, name)
            return True
        if failures[0].errno != errno.ENODEV:  # already gone is fine
            raise failures[0].error()
    if netns is None:
        return False
    # The host end is gone but the container may still hold an interface of ours (the host end was moved
    # or renamed by hand): by the CNI contract ``ifname`` in ``netns`` is ours to delete, if it is a veth.
    try:
        fd = open_netns(netns)
    except (NotFound, InvalidInput):  # gone, or never a namespace: no interface of ours can be in it
        return False
    try:
        with netlink_fd(fd, netns) as cnl:
            msg = cnl.link(name=ifname)
            if msg is None or msg.get(("linkinfo", "kind")) != "veth":
                return False
            batch = Batch()
            batch.link_del(f"delete {ifname} in netns '{netns}' of endpoint {endpoint_id}", index=msg["index"])
            cnl.run(batch)
            log.info("endpoint %s: removed orphan %s in %s", endpoint_id, ifname, netns)
            return True
    finally:
        os.close(fd)


def check(host_netns, spec, addrs) -> list:
    """Human-readable differences between the kernel and ``spec``, both sides; [] when all is well."""
    name = host_ifname(spec.endpoint_id)
    ipv6 = any(a.version == 6 for a in addrs)
    out = []
    with netlink(host_netns) as hnl:
        host_msg = hnl.link(name=name)
        if host_msg is None:
            out.append(f"host veth {name} of endpoint {spec.endpoint_id} is missing")
        else:
            idx = host_msg["index"]
            delay = host.read_proxy_delay(hnl).get(idx)
            have_addrs = host.read_addresses(hnl, idx).get(idx, set())
            out += host.link_problems(host_msg, spec.mtu, ipv6, delay, have_addrs)
            have = host.read_routes(hnl, oif=idx)[0].get(idx, set())
            out += [f"host route {a} dev {name} is missing" for a in addrs if a not in have]
            out += [f"host has unexpected route {a} dev {name}" for a in sorted(have - set(addrs), key=str)]
        try:
            cont_fd = open_netns(spec.netns)
        except NotFound:
            return out + [f"netns '{spec.netns}' of endpoint {spec.endpoint_id} does not exist"]
        try:
            with netlink_fd(cont_fd, spec.netns) as cnl:
                cont_msg = cnl.link(name=spec.ifname)
                if cont_msg is None:
                    out.append(f"{spec.ifname} is missing in netns '{spec.netns}'")
                else:
                    if host_msg is not None and not paired(hnl, host_msg, cont_msg, cont_fd):
                        out.append(f"{spec.ifname} in netns '{spec.netns}' is not the peer of host veth {name}")
                    out += container.problems(cnl, cont_msg, spec, addrs)
        finally:
            os.close(cont_fd)
    return out
