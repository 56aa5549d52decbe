"""What routing needs to know about one host: plain, validated values with no datastore behind them.

The agent builds these from etcd; the renderer (bird_config.py) turns them into BIRD's config. Validation
happens here, at construction, so a bad record is reported by name before anything is rendered or applied.
Addresses and CIDRs are normalised to their canonical text form, so equal input renders byte-identically.
"""

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from netplugin.errors import InvalidInput
from netplugin.routing.constants import ROUTE_PROTO

# Hostname-like names; also rules out quotes and backslashes, which would have to be escaped in BIRD strings.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9_])?$")
_MAX_AS = 2**32 - 1


def _check_name(kind, name):
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInput(f"invalid {kind} name {name!r}: use letters, digits, '.', '-', '_' (max 253)")
    return name


def _check_ip(what, value, version=None):
    try:
        ip = ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise InvalidInput(f"invalid {what} {value!r}: not an IP address") from None
    if version is not None and ip.version != version:
        raise InvalidInput(f"invalid {what} {value!r}: expected an IPv{version} address")
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise InvalidInput(f"invalid {what} {value!r}: not a unicast host address")
    return str(ip)


def _check_as(what, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_AS:
        raise InvalidInput(f"invalid {what} {value!r}: must be an integer AS number 1..{_MAX_AS}")
    return value


def parse_block(cidr):
    """A block CIDR as an ip_network; host bits set is an error (a typo would otherwise shift the block)."""
    try:
        return ipaddress.ip_network(str(cidr).strip(), strict=True)
    except ValueError as e:
        raise InvalidInput(f"invalid block {cidr!r}: {e}") from None


@dataclass(frozen=True)
class BgpNode:
    """A host running netplugin. ``as_number`` None means the cluster default (BgpSettings.default_as)."""

    name: str
    address: str
    address6: Optional[str] = None
    as_number: Optional[int] = None
    route_reflector: bool = False
    cluster_id: Optional[Union[str, int]] = None

    def __post_init__(self):
        _check_name("node", self.name)
        object.__setattr__(self, "address", _check_ip(f"IPv4 address of node {self.name}", self.address, 4))
        if self.address6 is not None:
            object.__setattr__(self, "address6", _check_ip(f"IPv6 address of node {self.name}", self.address6, 6))
        if self.as_number is not None:
            _check_as(f"AS number of node {self.name}", self.as_number)
        if self.cluster_id is not None:
            object.__setattr__(self, "cluster_id", _check_cluster_id(self.name, self.cluster_id))

    def as_or(self, default_as):
        return self.as_number if self.as_number is not None else default_as


def _check_cluster_id(node, value):
    """BIRD takes a route reflector cluster id as a number or an IPv4-formatted 32-bit value."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_AS:
        return str(ipaddress.IPv4Address(value))
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        raise InvalidInput(
            f"invalid cluster id {value!r} of node {node}: use an IPv4-formatted value or 1..{_MAX_AS}"
        ) from None


@dataclass(frozen=True)
class BgpPeer:
    """An explicit BGP peer such as a top-of-rack router. ``node`` None: every node peers with it."""

    name: str
    address: str
    as_number: int
    node: Optional[str] = None
    password: Optional[str] = None

    def __post_init__(self):
        _check_name("BGP peer", self.name)
        object.__setattr__(self, "address", _check_ip(f"address of BGP peer {self.name}", self.address))
        _check_as(f"AS number of BGP peer {self.name}", self.as_number)
        if self.node is not None:
            _check_name("node", self.node)
        if self.password is not None:
            if (
                not isinstance(self.password, str)
                or not 1 <= len(self.password) <= 80
                or not self.password.isprintable()
                or '"' in self.password
                or "\\" in self.password
            ):
                raise InvalidInput(
                    f"invalid password of BGP peer {self.name}: 1..80 printable characters without '\"' or '\\'"
                )

    @property
    def version(self):
        return ipaddress.ip_address(self.address).version


@dataclass(frozen=True)
class BgpSettings:
    """Cluster-wide BGP settings. ``mesh`` False switches from node-to-node mesh to route reflectors.

    Graceful restart (RFC 4724): when a BIRD dies and its TCP sessions close, peers keep its routes ("stale")
    for ``restart_time`` seconds, the time we advertise, so traffic keeps flowing while the agent restarts it.
    A hold timer expiry is not a restart: BIRD drops the routes then, as without graceful restart. A restarted
    BIRD (``bird -R``) keeps its kernel routes until its sessions are back, but for at most ``restart_wait``
    seconds: a peer that never comes back must not freeze the kernel table for BIRD's default 240 s.
    """

    mesh: bool = True
    default_as: int = 64512
    hold_time: int = 9
    keepalive: int = 3
    graceful_restart: bool = True
    listen_port: int = 179
    restart_time: int = 30
    restart_wait: int = 20

    def __post_init__(self):
        _check_as("default AS number", self.default_as)
        if isinstance(self.hold_time, bool) or not isinstance(self.hold_time, int) or not 3 <= self.hold_time <= 65535:
            raise InvalidInput(f"invalid BGP hold time {self.hold_time!r}: must be 3..65535 seconds")
        if (
            isinstance(self.keepalive, bool)
            or not isinstance(self.keepalive, int)
            or not 1 <= self.keepalive < self.hold_time
        ):
            raise InvalidInput(
                f"invalid BGP keepalive {self.keepalive!r}: must be 1 second or more and below the hold time"
            )
        if (
            isinstance(self.listen_port, bool)
            or not isinstance(self.listen_port, int)
            or not 1 <= self.listen_port <= 65535
        ):
            raise InvalidInput(f"invalid BGP listen port {self.listen_port!r}: must be 1..65535")
        # The restart time travels in a 12-bit field of the graceful restart capability.
        if (
            isinstance(self.restart_time, bool)
            or not isinstance(self.restart_time, int)
            or not 1 <= self.restart_time <= 4095
        ):
            raise InvalidInput(f"invalid BGP graceful restart time {self.restart_time!r}: must be 1..4095 seconds")
        if (
            isinstance(self.restart_wait, bool)
            or not isinstance(self.restart_wait, int)
            or not 1 <= self.restart_wait <= 3600
        ):
            raise InvalidInput(f"invalid BGP graceful restart wait {self.restart_wait!r}: must be 1..3600 seconds")


@dataclass(frozen=True)
class RoutingInput:
    """Everything one host's routing config is rendered from.

    ``nodes`` may include ``node`` itself (it is skipped when peering). ``blocks`` are the CIDRs this host owns;
    the dataplane blackholes them with ``route_proto`` and writes container routes with the same number.
    """

    node: BgpNode
    nodes: tuple = ()
    peers: tuple = ()
    settings: BgpSettings = field(default_factory=BgpSettings)
    blocks: tuple = ()
    route_proto: int = ROUTE_PROTO

    def __post_init__(self):
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "peers", tuple(self.peers))
        nets = sorted({parse_block(b) for b in self.blocks}, key=lambda n: (n.version, n))
        object.__setattr__(self, "blocks", tuple(str(n) for n in nets))
        for kind, items in (("node", self.nodes), ("BGP peer", self.peers)):
            seen = set()
            for item in items:
                if item.name in seen:
                    raise InvalidInput(f"duplicate {kind} name {item.name!r} in routing input")
                seen.add(item.name)
        by_addr = {}
        for n in self.nodes:
            for addr in (n.address, n.address6):
                if addr is None:
                    continue
                if by_addr.setdefault(addr, n.name) != n.name:
                    raise InvalidInput(f"nodes {by_addr[addr]} and {n.name} both use address {addr}")
        same = [n for n in self.nodes if n.name == self.node.name]
        if same and same[0] != self.node:
            raise InvalidInput(f"node {self.node.name} appears in the node list with different settings")
        if not 1 <= self.route_proto <= 255:
            raise InvalidInput(f"invalid route protocol number {self.route_proto!r}: must be 1..255")
