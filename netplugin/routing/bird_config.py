"""Render one host's BIRD 2 configuration from a RoutingInput: pure, deterministic, no I/O.

What the config does, per address family (IPv4 always; IPv6 when the node has an IPv6 address or blocks):

* ``kernel4``: learns the dataplane's routes (kernel protocol ``ROUTE_PROTO``: container /32s and block
  blackholes) and writes BGP-learned routes to the kernel. BIRD marks every route it writes ``proto bird``
  (12), hard-coded in BIRD 2, which is distinct from the dataplane's number, with metric BIRD_KERNEL_METRIC.
  Learned dataplane routes get a preference above BGP's, so a prefix the kernel already has from us is never
  the best BGP route and therefore never written back to the kernel.
* ``blocks4``: our blocks as static blackholes rendered from the block list (not learned from the kernel),
  because the blocks we own are a fact in etcd: they are advertised as soon as they are claimed, whether or
  not the dataplane has written its blackhole yet, a stale blackhole left in the kernel is never advertised,
  and the advertised set is visible in this file and checked by ``bird -p``. The static preference is the
  highest, so our block always wins locally over anything a peer says about it.
* BGP exports only our blocks and the dataplane's host routes outside our blocks ("borrowed" addresses);
  host routes inside our blocks are covered by the block. Route reflectors also pass on routes learned from
  other nodes (never those from explicit peers such as a top-of-rack router), except back to the node that is
  the route's next hop. With two reflectors each also learns a client's route from the other one; while that
  copy is its best path (it can arrive before the client's own update, or outlive a quickly withdrawn one) it
  would otherwise be offered back to the client, which BIRD refuses at export with an error-level
  "Invalid NEXT_HOP attribute - neighbor address" line: harmless, but noise that hides real errors.

Sessions: node-to-node mesh by default; with mesh off, route reflectors peer with every node (``rr client``
when in the same AS) and non-reflectors peer only with the reflectors; explicit peers are global or for one
node. Every session is ``direct`` (one L2 hop, multihop off); iBGP or eBGP follows from the AS numbers. IPv6
routes travel on separate sessions between IPv6 addresses, so IPv4 and IPv6 sessions fail independently.
There is no ``direct`` protocol: next hops are resolved on directly connected networks via the device protocol.

Graceful restart (measured with BIRD 2.0.12): every BGP session advertises it with ``restart_time``. A BIRD that
is killed, or stopped with ``birdc graceful restart``, leaves its kernel routes, and its peers keep its routes as
stale until it is back (then flushed after its End-of-RIB) or ``restart_time`` ends. A hold timer expiry (a host
that vanished silently) drops the routes at once, as without graceful restart. A clean stop (SIGTERM) still
withdraws everything. The kernel protocol's ``graceful restart on`` makes a BIRD started with ``-R`` keep the
routes it finds in the kernel until the sessions are back; without ``-R`` it prunes them at start (a 3 s hole).
``persist`` is not used: it would also keep routes after a deliberate stop.
"""

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from netplugin.errors import InvalidInput
from netplugin.routing.constants import BIRD_KERNEL_METRIC

# Peer types as `netctl node status` shows them; also written into each session's description.
PEER_MESH = "node-to-node mesh"
PEER_RR = "route reflector"
PEER_RR_CLIENT = "route reflector client"
PEER_GLOBAL = "global"
PEER_NODE = "node-specific"

# Protocol name prefix per peer type (IPv6 node sessions add a "6").
PREFIXES = {PEER_MESH: "mesh", PEER_RR: "rr", PEER_RR_CLIENT: "rrc", PEER_GLOBAL: "peer", PEER_NODE: "peer"}

KERNEL_LEARN_PREFERENCE = 240  # above BGP (100): a route the kernel has from us stays ours
BLOCKS_PREFERENCE = 250  # above everything: our own blocks
KERNEL_SCAN_TIME = 10
BGP_PORT = 179
_NAME_KEEP = 40


@dataclass(frozen=True)
class _Family:
    version: int
    channel: str
    host_len: int

    @property
    def kernel(self):
        return f"kernel{self.version}"

    @property
    def blocks(self):
        return f"blocks{self.version}"


FAMILIES = {4: _Family(4, "ipv4", 32), 6: _Family(6, "ipv6", 128)}


@dataclass(frozen=True)
class Session:
    """One planned BGP session; rendering is a straight translation of these fields."""

    name: str
    peer_type: str
    peer_name: str
    version: int
    local_address: str
    local_as: int
    peer_address: str
    peer_as: int
    port: Optional[int] = None  # both ends listen here (node sessions with a non-default port)
    rr_client: bool = False
    cluster_id: Optional[str] = None
    reflect: bool = False  # export routes learned from other nodes too (route reflectors)
    password: Optional[str] = None


def protocol_name(prefix, name):
    """A valid, stable BIRD identifier for a peer: the name itself when it is one, else a hashed spelling.

    The hash suffix keeps names that sanitize alike (``node-a``, ``node.a``) apart and keeps a session's name
    stable when other nodes come and go (a renamed protocol would be restarted by BIRD).
    """
    clean = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if clean != name or len(clean) > _NAME_KEEP:
        clean = f"{clean[:_NAME_KEEP]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return f"{prefix}_{clean}"


def plan_sessions(inp):
    """The BGP sessions this host should have, sorted by name; pure, so tests can inspect the topology."""
    me, settings = inp.node, inp.settings
    my_as = me.as_or(settings.default_as)
    others = sorted((n for n in inp.nodes if n.name != me.name), key=lambda n: n.name)
    port = settings.listen_port if settings.listen_port != BGP_PORT else None
    sessions = []

    def node_sessions(other, peer_type, rr_client=False, reflect=False):
        other_as = other.as_or(settings.default_as)
        rr_client = rr_client and other_as == my_as  # a client must be internal; otherwise plain eBGP
        pairs = [(4, me.address, other.address)]
        if me.address6 and other.address6:
            pairs.append((6, me.address6, other.address6))
        for version, local, remote in pairs:
            prefix = PREFIXES[peer_type] + ("6" if version == 6 else "")
            sessions.append(
                Session(
                    name=protocol_name(prefix, other.name),
                    peer_type=peer_type,
                    peer_name=other.name,
                    version=version,
                    local_address=local,
                    local_as=my_as,
                    peer_address=remote,
                    peer_as=other_as,
                    port=port,
                    rr_client=rr_client,
                    cluster_id=(me.cluster_id or me.address) if rr_client else None,
                    reflect=reflect,
                )
            )

    if settings.mesh:
        for other in others:
            node_sessions(other, PEER_MESH)
    elif me.route_reflector:
        for other in others:
            if other.route_reflector:
                node_sessions(other, PEER_RR, reflect=True)
            else:
                node_sessions(other, PEER_RR_CLIENT, rr_client=True, reflect=True)
    else:
        for other in others:
            if other.route_reflector:
                node_sessions(other, PEER_RR)

    taken = {s.peer_address for s in sessions} | {me.address, me.address6}
    for peer in sorted(inp.peers, key=lambda p: p.name):
        if peer.node is not None and peer.node != me.name:
            continue
        if peer.address in taken:
            continue  # ourselves, or a node we already have a session with
        if peer.version == 6 and not me.address6:
            continue  # no IPv6 address to peer from
        taken.add(peer.address)
        sessions.append(
            Session(
                name=protocol_name(PREFIXES[PEER_GLOBAL], peer.name),
                peer_type=PEER_GLOBAL if peer.node is None else PEER_NODE,
                peer_name=peer.name,
                version=peer.version,
                local_address=me.address if peer.version == 4 else me.address6,
                local_as=my_as,
                peer_address=peer.address,
                peer_as=peer.as_number,
                password=peer.password,
            )
        )

    names = [s.name for s in sessions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInput(f"BGP protocol names collide for node {me.name}: {', '.join(dupes)}; rename a peer")
    return sorted(sessions, key=lambda s: s.name)


def _families(inp):
    versions = {4}
    if inp.node.address6 or any(ipaddress.ip_network(b).version == 6 for b in inp.blocks):
        versions.add(6)
    return [FAMILIES[v] for v in sorted(versions)]


def _render_filters(fam, blocks, route_proto):
    own = ", ".join(f"{b}+" for b in blocks)
    lines = [
        f"# Routes the dataplane wrote (proto {route_proto}): container host routes and block blackholes.",
        f"filter np_kernel_import{fam.version}",
        "{",
        f"  if krt_source = {route_proto} then accept;",
        "  reject;",
        "}",
        "",
        "# Only BGP-learned routes go into the kernel; our own routes are there already.",
        f"filter np_kernel_export{fam.version}",
        "{",
        "  if source = RTS_BGP then accept;",
        "  reject;",
        "}",
        "",
        "# A dataplane host route outside our blocks: an address borrowed from another host's block.",
        f"function np_borrowed{fam.version}()",
        "{",
        f'  if proto != "{fam.kernel}" then return false;',
        f"  if net.len != {fam.host_len} then return false;",
    ]
    if own:
        lines.append(f"  if net ~ [ {own} ] then return false;")
    lines += [
        "  return true;",
        "}",
        "",
        f"filter np_bgp_export{fam.version}",
        "{",
        f'  if proto = "{fam.blocks}" then accept;',
        f"  if np_borrowed{fam.version}() then accept;",
        "  reject;",
        "}",
        "",
        "# Route reflectors also pass on what other nodes advertise, never what explicit peers send, and never a",
        "# route whose next hop is the receiving peer: that is the peer's own route come back through the other",
        "# reflector (reflectors in different clusters reflect to each other). The peer could not use it, and BIRD",
        '# would refuse to send it anyway, logging "Invalid NEXT_HOP attribute - neighbor address".',
        f"function np_bgp_reflect{fam.version}(ip peer)",
        "{",
        "  if source = RTS_BGP && bgp_next_hop = peer then return false;",
        f'  if proto = "{fam.blocks}" then return true;',
        f"  if np_borrowed{fam.version}() then return true;",
        '  if source = RTS_BGP && !(proto ~ "peer_*") then return true;',
        "  return false;",
        "}",
        "",
    ]
    return lines


def _render_family_protocols(fam, blocks):
    lines = [
        f"protocol kernel {fam.kernel}",
        "{",
        f"  {fam.channel} {{",
        f"    preference {KERNEL_LEARN_PREFERENCE};",
        f"    import filter np_kernel_import{fam.version};",
        f"    export filter np_kernel_export{fam.version};",
        "  };",
        "  learn;",
        f"  scan time {KERNEL_SCAN_TIME};",
        "  graceful restart on;",
        "  merge paths on;",
        f"  metric {BIRD_KERNEL_METRIC};",
        "}",
        "",
        f"protocol static {fam.blocks}",
        "{",
        f"  {fam.channel} {{ preference {BLOCKS_PREFERENCE}; }};",
    ]
    lines += [f"  route {b} blackhole;" for b in blocks]
    lines += ["}", ""]
    return lines


def _render_session(s, settings):
    fam = FAMILIES[s.version]
    port = f" port {s.port}" if s.port else ""
    lines = [
        f"protocol bgp {s.name}",
        "{",
        f'  description "{s.peer_type}: {s.peer_name}";',
        f"  local {s.local_address}{port} as {s.local_as};",
        f"  neighbor {s.peer_address}{port} as {s.peer_as};",
        "  direct;",
        f"  hold time {settings.hold_time};",
        f"  keepalive time {settings.keepalive};",
        f"  graceful restart {'on' if settings.graceful_restart else 'off'};",
    ]
    if settings.graceful_restart:
        lines.append(f"  graceful restart time {settings.restart_time};")
    if s.rr_client:
        lines += ["  rr client;", f"  rr cluster id {s.cluster_id};"]
    if s.password is not None:
        lines.append(f'  password "{s.password}";')
    lines += [f"  {fam.channel} {{", "    import all;"]
    if s.reflect:
        # Reflected routes must keep the originating node as next hop: no ``next hop self``.
        lines.append(f"    export where np_bgp_reflect{fam.version}({s.peer_address});")
    else:
        lines += [f"    export filter np_bgp_export{fam.version};", "    next hop self;"]
    lines += ["  };", "}", ""]
    return lines


def render_bird_config(inp):
    """BIRD 2 config text for ``inp`` (a RoutingInput); equal input gives byte-identical output."""
    me = inp.node
    lines = [
        f"# Generated by netplugin for node {me.name}. Do not edit: the agent rewrites this file.",
        f"router id {me.address};",
        "timeformat protocol iso long;",
        "log stderr all;",
        "# How long a restarted BIRD (bird -R) keeps its kernel routes waiting for its sessions to come back.",
        f"graceful restart wait {inp.settings.restart_wait};",
        "",
        "protocol device devices",
        "{",
        f"  scan time {KERNEL_SCAN_TIME};",
        "}",
        "",
    ]
    for fam in _families(inp):
        blocks = [b for b in inp.blocks if ipaddress.ip_network(b).version == fam.version]
        lines += _render_filters(fam, blocks, inp.route_proto)
        lines += _render_family_protocols(fam, blocks)
    for session in plan_sessions(inp):
        lines += _render_session(session, inp.settings)
    return "\n".join(lines).rstrip("\n") + "\n"
