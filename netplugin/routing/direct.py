"""Direct mode: other hosts' blocks as kernel routes via those hosts, for hosts on one L2 segment, no BGP.

Routes we write carry DIRECT_PROTO; reconcile compares the desired routes with the kernel's routes of that
protocol in the main table and only ever adds, replaces or deletes those, so routes of anyone else (the
dataplane's proto 80, BIRD's proto bird, an operator's static routes) are never touched. A prefix already
held by someone else's route is reported as a conflict, not overwritten.

Netlink goes through a short-lived pyroute2 handle bound to the namespace (a socket created there by a child
process), so no thread of ours ever switches namespace.
"""
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from netplugin.errors import DataplaneError, InvalidInput
from netplugin.routing.constants import DIRECT_PROTO, MAIN_TABLE
from netplugin.routing.model import parse_block

log = logging.getLogger(__name__)

_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_DUMP_TRIES = 5


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

    def _open(self):
        if self.netns is None:
            return IPRoute()
        path = self.netns if "/" in self.netns else os.path.join("/run/netns", self.netns)
        if not os.path.exists(path):
            raise DataplaneError(f"direct routes: network namespace {self.netns} does not exist")
        try:
            return IPRoute(netns=path, flags=0)  # flags=0: never create a namespace by mistake
        except OSError as e:
            raise DataplaneError(f"direct routes: failed to open network namespace {self.netns}: {e}") from None

    def current(self):
        """{network: gateway, or None when not a single gateway} for our routes in the kernel now."""
        with self._open() as ipr:
            return {net: gw for net, (gw, _prio) in self._kernel_routes(ipr).items()}

    def _kernel_routes(self, ipr):
        found = {}
        for version, family in _FAMILIES.items():
            for msg in self._dump(ipr, family):
                if msg.get("table") != self.table or msg.get("proto") != self.proto:
                    continue
                dst = msg.get("dst") or ("0.0.0.0" if version == 4 else "::")
                gw = msg.get("gateway")
                found[ipaddress.ip_network(f"{dst}/{msg.get('dst_len')}")] = (
                    ipaddress.ip_address(gw) if gw else None, msg.get("priority"))
        return found

    def _dump(self, ipr, family):
        for _ in range(_DUMP_TRIES):
            try:
                return list(ipr.route("dump", family=family, proto=self.proto, table=self.table))
            except NetlinkDumpInterrupted:
                continue
        raise DataplaneError(f"direct routes: route dump in {self.netns} kept being interrupted")

    def reconcile(self, node_blocks):
        """Make our routes exactly ``node_blocks`` ({node address: [block CIDRs]}) and return the changes.

        All valid changes are made even if some fail; failures are then raised together as DataplaneError.
        """
        want = desired_routes(node_blocks)
        changes, errors = RouteChanges(), []
        with self._open() as ipr:
            raw = self._kernel_routes(ipr)
            have = {net: gw for net, (gw, _prio) in raw.items()}
            for net in sorted(set(have) - set(want), key=_key):
                gw, prio = raw[net]
                self._call(ipr, "del", net, gw, prio, changes.removed, errors)
            for net in sorted(want, key=_key):
                if net not in have:
                    self._call(ipr, "add", net, want[net], None, changes.added, errors)
                elif have[net] != want[net]:
                    # The kernel keys a route by prefix and metric, not protocol: replace only our own.
                    self._call(ipr, "replace", net, want[net], raw[net][1], changes.replaced, errors)
        if changes:
            log.info("direct routes in %s: +%d ~%d -%d", self.netns or "this namespace",
                     len(changes.added), len(changes.replaced), len(changes.removed))
        if errors:
            raise DataplaneError(f"direct routes in {self.netns or 'this namespace'}: {len(errors)} failed: "
                                 + "; ".join(errors))
        return changes

    def _call(self, ipr, op, net, gw, prio, done, errors):
        spec = dict(dst=str(net), proto=self.proto, table=self.table)
        if gw is not None:
            spec["gateway"] = str(gw)
        if prio is not None:
            spec["priority"] = prio
        text = f"{net} via {gw}" if gw is not None else str(net)
        try:
            ipr.route(op, **spec)
            done.append(text)
        except NetlinkError as e:
            if op == "del" and e.code == 3:  # ESRCH: already gone
                return
            reason = "a route for this prefix exists already (not ours)" if e.code == 17 else os.strerror(e.code)
            errors.append(f"{op} {text}: {reason}")


def _key(net):
    return (net.version, net)
