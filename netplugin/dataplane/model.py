"""What an endpoint looks like on the host: the spec we are given, the state we report, and fixed names.

Everything here is pure (no kernel calls) so it can be unit tested and shared by add, check and reconcile.
"""

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field

from netplugin.errors import InvalidInput

__all__ = [
    "ROUTE_PROTO",
    "MAIN_TABLE",
    "HOST_VETH_MAC",
    "GATEWAY_V4",
    "GATEWAY_V6",
    "HOST_IFNAME_PREFIX",
    "EndpointSpec",
    "EndpointState",
    "host_ifname",
    "is_host_ifname",
    "parse_addresses",
    "parse_blocks",
    "random_mac",
    "validate_spec",
]

# Container /32 (/128) routes and owned-block blackholes carry this kernel route protocol number: it is how
# the reconciler knows its own routes, and how BIRD's kernel protocol learns them and advertises the ones
# outside our blocks ("borrowed" addresses). The routing writers' numbers are in netplugin/routing/constants.py.
ROUTE_PROTO = 80
MAIN_TABLE = 254  # the kernel's main routing table

# Every host veth carries this MAC, so the IPv6 gateway link-local derived from it is the same everywhere
# (fe80::ecee:eeff:feee:eeee) and containers can hold a permanent neighbour entry for both gateways.
HOST_VETH_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"
HOST_IFNAME_PREFIX = "np"
_HOST_IFNAME_RE = re.compile(r"^np[0-9a-f]{11}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME_BAD = re.compile(r"[\s/:]")
IFNAMSIZ = 16


def random_mac() -> str:
    """A container interface MAC as the kernel would pick it (random, locally administered, unicast), chosen by
    us so the endpoint's record can be written before the veth exists."""
    while True:
        octets = bytearray(os.urandom(6))
        octets[0] = (octets[0] & 0xFE) | 0x02
        mac = ":".join(f"{b:02x}" for b in octets)
        if mac != HOST_VETH_MAC:
            return mac


@dataclass(frozen=True)
class EndpointSpec:
    """One container interface as the agent wants it. ``addresses`` are host routes (/32 or /128)."""

    endpoint_id: str
    netns: str
    ifname: str = "eth0"
    addresses: tuple = ()
    mtu: int = 1500
    mac: str | None = None

    def __post_init__(self):
        # Lists are accepted for convenience but the spec stays hashable.
        if not isinstance(self.addresses, tuple):
            object.__setattr__(self, "addresses", tuple(self.addresses))


@dataclass
class EndpointState:
    endpoint_id: str
    host_ifname: str
    mac: str
    ifindex_in_container: int
    addresses: list = field(default_factory=list)
    created: bool = field(default=True, compare=False)  # False: an existing pair was converged (repeated ADD)


def host_ifname(endpoint_id: str) -> str:
    """``np`` + 11 hex digits of sha1(endpoint_id): 13 characters, below IFNAMSIZ, stable across restarts."""
    return HOST_IFNAME_PREFIX + hashlib.sha1(endpoint_id.encode()).hexdigest()[:11]


def is_host_ifname(name: str) -> bool:
    """True only for names host_ifname can produce, so other people's ``np*`` links are never ours."""
    return bool(_HOST_IFNAME_RE.match(name or ""))


def parse_addresses(addresses, what="endpoint") -> list:
    """Host routes as ``ipaddress`` interfaces; bare addresses become /32 or /128, wider prefixes are refused."""
    out = []
    for raw in addresses:
        try:
            iface = ipaddress.ip_interface(str(raw).strip())
        except ValueError:
            raise InvalidInput(f"invalid address {raw!r} for {what}") from None
        if iface.network.prefixlen != iface.max_prefixlen:
            raise InvalidInput(
                f"address {raw} for {what} must be a host address (/{iface.max_prefixlen}): "
                "each container gets a routed host address"
            )
        ip = iface.ip
        if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
            raise InvalidInput(f"address {raw} for {what} is not a usable unicast address")
        if iface in out:
            raise InvalidInput(f"address {raw} is listed twice for {what}")
        out.append(iface)
    return out


def parse_blocks(blocks) -> list:
    """Owned address blocks as networks; host bits set is an error, not something to round away."""
    out = []
    for raw in blocks:
        try:
            net = ipaddress.ip_network(str(raw).strip())
        except ValueError as e:
            raise InvalidInput(f"invalid address block {raw!r}: {e}") from None
        if net not in out:
            out.append(net)
    return out


def validate_spec(spec: EndpointSpec) -> list:
    """Check a spec before touching the kernel; returns the parsed addresses."""
    if not isinstance(spec, EndpointSpec):
        raise InvalidInput(f"expected an EndpointSpec, got {type(spec).__name__}")
    if not spec.endpoint_id or not isinstance(spec.endpoint_id, str):
        raise InvalidInput("endpoint id must be a non-empty string")
    what = f"endpoint {spec.endpoint_id}"
    if not spec.netns or not isinstance(spec.netns, str) or not spec.netns.startswith("/"):
        raise InvalidInput(f"netns for {what} must be an absolute path (e.g. /run/netns/NAME), got {spec.netns!r}")
    name = spec.ifname
    if not name or len(name) >= IFNAMSIZ or _IFNAME_BAD.search(name) or name in (".", ".."):
        raise InvalidInput(f"invalid interface name {name!r} for {what} (1-15 characters, no '/', ':' or spaces)")
    addrs = parse_addresses(spec.addresses, what)
    if not isinstance(spec.mtu, int) or not 68 <= spec.mtu <= 65535:
        raise InvalidInput(f"invalid MTU {spec.mtu!r} for {what} (68-65535)")
    if spec.mtu < 1280 and any(a.version == 6 for a in addrs):
        raise InvalidInput(f"MTU {spec.mtu} for {what} is below IPv6's minimum of 1280")
    if spec.mac is not None:
        mac = spec.mac.lower()
        if not _MAC_RE.match(mac):
            raise InvalidInput(f"invalid MAC address {spec.mac!r} for {what}")
        if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            raise InvalidInput(f"MAC address {spec.mac} for {what} must be unicast and non-zero")
        if mac == HOST_VETH_MAC:
            raise InvalidInput(f"MAC address {spec.mac} for {what} is reserved for the host side")
    return addrs
