"""Docker's view of address pools mapped onto netplugin's, as pure functions (unit-testable, no etcd).

Docker asks an IPAM driver for a pool per network (``--subnet``, ``--ip-range``) and later for addresses by
the opaque PoolID we answered. netplugin pools are cluster-wide and cut into per-host blocks, so a Docker
subnet is either a netplugin pool itself, or a part of one (then allocations are confined to it), or new (then
it becomes a pool). The PoolID carries everything an address request needs, so RequestAddress is stateless
and survives agent restarts: ``<pool>|<subnet>|<ip-range>``. Identical RequestPool calls give identical ids.
"""

from dataclasses import dataclass

import netaddr

from netplugin.errors import InvalidInput

ADDRESS_SPACE = "netplugin"
SEP = "|"


def parse_cidr(value, what):
    """A network in canonical form; host bits set is an error, not something to round away."""
    try:
        net = netaddr.IPNetwork(str(value))
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise InvalidInput(f"{what} {value!r} is not a CIDR") from None
    if "/" not in str(value):
        raise InvalidInput(f"{what} {value!r} has no prefix length (e.g. 10.1.0.0/16)")
    if net.ip != net.network:
        raise InvalidInput(f"{what} {value} has host bits set; did you mean {net.cidr}?")
    return net.cidr


# Space no container may hold, whatever a user asks: Docker subnets overlapping it are refused.
RESERVED = {
    "0.0.0.0/8": "'this network'",
    "127.0.0.0/8": "loopback",
    "169.254.0.0/16": "link-local, where the containers' gateway 169.254.1.1 lives",
    "224.0.0.0/4": "multicast",
    "240.0.0.0/4": "reserved and broadcast",
    "::/128": "the unspecified address",
    "::1/128": "loopback",
    "::ffff:0:0/96": "IPv4-mapped",
    "fe80::/10": "link-local, where the containers' gateway lives",
    "ff00::/8": "multicast",
}


def usable_subnet(value, what):
    """``parse_cidr`` that also refuses subnets overlapping RESERVED space (e.g. --subnet 169.254.0.0/16)."""
    net = parse_cidr(value, what)
    for cidr, why in RESERVED.items():
        reserved = netaddr.IPNetwork(cidr)
        if reserved.version == net.version and reserved.first <= net.last and net.first <= reserved.last:
            raise InvalidInput(f"{what} {net} overlaps {cidr} ({why}): containers cannot have those addresses")
    return net


def contains(outer, inner):
    return outer.version == inner.version and outer.first <= inner.first and inner.last <= outer.last


@dataclass(frozen=True)
class PoolRef:
    """What one Docker pool is in netplugin terms: the netplugin pool, Docker's subnet, Docker's ip-range."""

    pool: str
    subnet: str
    ip_range: str | None = None

    @property
    def version(self):
        return netaddr.IPNetwork(self.subnet).version

    @property
    def within(self):
        """The range automatic assignment is confined to (None: the whole netplugin pool)."""
        if self.ip_range:
            return self.ip_range
        return self.subnet if self.subnet != self.pool else None

    def encode(self):
        return SEP.join([self.pool, self.subnet, self.ip_range or ""])

    @classmethod
    def decode(cls, pool_id):
        parts = str(pool_id or "").split(SEP)
        if len(parts) != 3:
            raise InvalidInput(f"pool id {pool_id!r} was not issued by netplugin (expected POOL|SUBNET|RANGE)")
        pool, subnet, ip_range = (
            parse_cidr(parts[0], "pool"),
            parse_cidr(parts[1], "subnet"),
            parse_cidr(parts[2], "ip range") if parts[2] else None,
        )
        if not contains(pool, subnet) or (ip_range is not None and not contains(subnet, ip_range)):
            raise InvalidInput(
                f"pool id {pool_id!r} is inconsistent (the range must lie in the subnet, the subnet in the pool)"
            )
        return cls(str(pool), str(subnet), str(ip_range) if ip_range is not None else None)


def place_subnet(subnet, pools):
    """Where a requested Docker subnet lives: (netplugin pool CIDR, needs_creating).

    ``pools`` are the existing netplugin pool CIDRs. A subnet equal to or inside a pool uses it; a subnet that
    overlaps pools without lying inside one is refused (netplugin pools never overlap); otherwise it is new.
    """
    subnet = parse_cidr(subnet, "subnet")
    for cidr in sorted(pools):
        pool = netaddr.IPNetwork(cidr)
        if contains(pool, subnet):
            return str(pool.cidr), False
    clashes = sorted(
        c
        for c in pools
        if netaddr.IPNetwork(c).version == subnet.version
        and netaddr.IPNetwork(c).first <= subnet.last
        and subnet.first <= netaddr.IPNetwork(c).last
    )
    if clashes:
        raise InvalidInput(
            f"subnet {subnet} overlaps netplugin pool(s) {', '.join(clashes)} without lying inside "
            "one: use a subnet inside a pool, or one clear of them"
        )
    return str(subnet), True


def pool_ref(subnet, pool, ip_range=None):
    """Validate Docker's --subnet/--ip-range against the chosen pool and build the reference."""
    net = parse_cidr(subnet, "subnet")
    rng = parse_cidr(ip_range, "ip range") if ip_range else None
    if not contains(netaddr.IPNetwork(pool), net):
        raise InvalidInput(f"subnet {net} is not inside netplugin pool {pool}")
    if rng is not None and not contains(net, rng):
        raise InvalidInput(f"ip range {rng} is not inside subnet {net}")
    return PoolRef(str(netaddr.IPNetwork(pool).cidr), str(net), str(rng) if rng is not None else None)


def host_prefix_of(address, what="address"):
    """'10.1.0.5/16' or '10.1.0.5' -> '10.1.0.5/32' (Docker hands us addresses with the subnet's mask)."""
    try:
        ip = netaddr.IPNetwork(str(address)).ip
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise InvalidInput(f"{what} {address!r} is not an IP address") from None
    return f"{ip}/{32 if ip.version == 4 else 128}"
