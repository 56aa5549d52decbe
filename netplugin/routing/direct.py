"""Direct mode: other hosts' blocks as kernel routes via those hosts, for hosts on one L2 segment, no BGP.

Routes we write carry DIRECT_PROTO; reconcile compares the desired routes with the kernel's routes of that
protocol in the main table and only ever adds, replaces or deletes those, so routes of anyone else (the
dataplane's proto 80, BIRD's proto bird, an operator's static routes) are never touched. A prefix already
held by someone else's route is reported as a conflict, not overwritten.

Netlink goes through the kernel layer's handle (netplugin.kernel.netlink: a socket made in the namespace by a
throwaway thread, so no thread of ours switches namespace); all changes of one reconcile go in one batch, and
the kernel acknowledges each, so one bad route does not stop the others.
"""

import errno
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field

from netplugin.errors import DataplaneError, InvalidInput
from netplugin.kernel.netlink import netlink
from netplugin.kernel.rtnl import Batch
from netplugin.routing.constants import DIRECT_PROTO, MAIN_TABLE
from netplugin.routing.model import parse_block

log = logging.getLogger(__name__)

_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass
class RouteChanges:
    """What one reconcile changed, as "CIDR via GATEWAY" strings, sorted."""

    added: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    removed: list = field(default_factory=list)

    def __bool__(self):
        return bool(self.added or self.replaced or self.removed)


def desired_routes(node_blocks):
    """{block network: gateway address} from {node address: [block CIDRs]}; InvalidInput on bad or
    conflicting input (a block claimed by two nodes, a block of the other address family)."""
    routes = {}
    for addr, blocks in sorted(node_blocks.items()):
        try:
            gw = ipaddress.ip_address(str(addr).strip())
        except ValueError:
            raise InvalidInput(f"direct routes: invalid node address {addr!r}") from None
        for cidr in blocks:
            net = parse_block(cidr)
            if net.version != gw.version:
                raise InvalidInput(f"direct routes: block {net} cannot go via {gw} (other address family)")
            if net in routes and routes[net] != gw:
                raise InvalidInput(f"direct routes: block {net} is claimed by both {routes[net]} and {gw}")
            routes[net] = gw
    return routes


class DirectRoutes:
    """Reconciles DIRECT_PROTO routes in one namespace.

    ``netns`` is required: a name under /run/netns or a path (e.g. /proc/1/ns/net); an explicit None means
    this process's own namespace. A missing namespace is an error, never created.
    """

    def __init__(self, netns, proto=DIRECT_PROTO, table=MAIN_TABLE):
        self.netns = netns
        self.proto = proto
        self.table = table

    def current(self):
        """{network: gateway, or None when not a single gateway} for our routes in the kernel now."""
        with netlink(self.netns) as nl:
            return {net: gw for net, (gw, _prio) in self._kernel_routes(nl).items()}

    def _kernel_routes(self, nl):
        found = {}
        for version, family in _FAMILIES.items():
            for msg in nl.routes(family=family, table=self.table, proto=self.proto):
                dst = msg.get("RTA_DST") or ("0.0.0.0" if version == 4 else "::")
                gw = msg.get("RTA_GATEWAY")
                found[ipaddress.ip_network(f"{dst}/{msg['dst_len']}")] = (
                    ipaddress.ip_address(gw) if gw else None,
                    msg.get("RTA_PRIORITY"),
                )
        return found

    def reconcile(self, node_blocks):
        """Make our routes exactly ``node_blocks`` ({node address: [block CIDRs]}) and return the changes.

        All valid changes are made even if some fail; failures are then raised together as DataplaneError.
        """
        want = desired_routes(node_blocks)
        batch = Batch()
        with netlink(self.netns) as nl:
            raw = self._kernel_routes(nl)
            have = {net: gw for net, (gw, _prio) in raw.items()}
            for net in sorted(set(have) - set(want), key=_key):
                gw, prio = raw[net]
                self._request(batch, "del", net, gw, prio, "removed")
            for net in sorted(want, key=_key):
                if net not in have:
                    self._request(batch, "add", net, want[net], None, "added")
                elif have[net] != want[net]:
                    # The kernel keys a route by prefix and metric, not protocol: replace only our own.
                    self._request(batch, "replace", net, want[net], raw[net][1], "replaced")
            failures, _ = nl.commit(batch)
        failed = {id(f.request): f for f in failures}
        changes, errors = RouteChanges(), []
        for req in batch.requests:
            done, text = req.tag
            if id(req) not in failed:
                getattr(changes, done).append(text)
                continue
            code = failed[id(req)].errno
            reason = "a route for this prefix exists already (not ours)" if code == errno.EEXIST else os.strerror(code)
            errors.append(f"{req.action}: {reason}")
        if changes:
            log.info(
                "direct routes in %s: +%d ~%d -%d",
                self.netns or "this namespace",
                len(changes.added),
                len(changes.replaced),
                len(changes.removed),
            )
        if errors:
            raise DataplaneError(
                f"direct routes in {self.netns or 'this namespace'}: {len(errors)} failed: " + "; ".join(errors)
            )
        return changes

    def _request(self, batch, op, net, gw, prio, done):
        text = f"{net} via {gw}" if gw is not None else str(net)
        ok = (errno.ESRCH,) if op == "del" else ()  # already gone
        batch.route(
            op,
            str(net),
            f"{op} {text}",
            gateway=None if gw is None else str(gw),
            proto=self.proto,
            table=self.table,
            priority=prio,
            ok=ok,
            tag=(done, text),
        )


def _key(net):
    return (net.version, net)
