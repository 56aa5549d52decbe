"""Pure IP arithmetic for IPAM: which blocks a pool has, which ordinals are free, which block holds an address.

No etcd here, so everything is unit-testable and the allocator stays a thin CAS loop around it.
"""

import netaddr

DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}


def block_for(pool_cidr, block_size, address):
    """The block CIDR (as a string) inside the pool that holds ``address``."""
    ip = netaddr.IPAddress(address)
    return str(netaddr.IPNetwork(f"{ip}/{block_size}").cidr)


def iter_blocks(pool_cidr, block_size, within=None):
    """Every block of the pool, in address order; with ``within``, only blocks overlapping that range."""
    pool = netaddr.IPNetwork(pool_cidr)
    scope = netaddr.IPNetwork(within) if within else pool
    if not overlaps(str(pool), str(scope)):
        return
    if scope.prefixlen > block_size:
        # a range smaller than a block: the one block that holds it
        yield block_for(pool_cidr, block_size, netaddr.IPAddress(scope.first, pool.version))
        return
    start = max(pool.first, scope.first)
    end = min(pool.last, scope.last)
    step = 2 ** ((32 if pool.version == 4 else 128) - block_size)
    first = start - (start - pool.first) % step
    for base in range(first, end + 1, step):
        yield str(netaddr.IPNetwork(f"{netaddr.IPAddress(base, pool.version)}/{block_size}"))


def ordinal_range(block_cidr, within=None):
    """The ordinals of a block that may be handed out (all of them, or those inside ``within``)."""
    block = netaddr.IPNetwork(block_cidr)
    if not within:
        return range(block.size)
    scope = netaddr.IPNetwork(within)
    lo = max(block.first, scope.first) - block.first
    hi = min(block.last, scope.last) - block.first
    return range(lo, hi + 1) if hi >= lo else range(0)


def first_free(block, within=None):
    """The lowest free ordinal of a Block record (optionally inside ``within``), or None."""
    taken = block.allocations
    for ordinal in ordinal_range(block.cidr, within):
        if str(ordinal) not in taken:
            return ordinal
    return None


def overlaps(cidr_a, cidr_b):
    a, b = netaddr.IPNetwork(cidr_a), netaddr.IPNetwork(cidr_b)
    return a.version == b.version and a.first <= b.last and b.first <= a.last


def host_prefix(address):
    """'10.0.0.5' -> '10.0.0.5/32', 'fd00::5' -> 'fd00::5/128'."""
    ip = netaddr.IPAddress(address)
    return f"{ip}/{32 if ip.version == 4 else 128}"
