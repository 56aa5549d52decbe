"""One assignment attempt of the IPAM allocator (allocator.py): which blocks it changes and claims, planned
against cached block records; the allocator commits the plan in one guarded etcd transaction, so a stale cache
only costs a retry."""

import netaddr

from netplugin.datastore import keys
from netplugin.datastore.models import Allocation, Block
from netplugin.errors import AddressInUse, AddressNotInPool, PoolExhausted
from netplugin.ipam import blocks as blockmath


class AssignmentPlan:
    """The blocks one assignment attempt will write, built against cached records (validated by the CAS)."""

    def __init__(self, ipam, handle_id, host, handle):
        self.ipam = ipam
        self.handle_id = handle_id
        self.host = host
        self.handle = handle
        self.blocks = {}  # cidr -> (Block copy with our changes, revision read)
        self.claims = set()
        self.new_addresses = {}  # address -> (block cidr, seq)
        self.used = set()  # addresses already given to an earlier request of this assignment
        self.changed = False

    def _block(self, cidr):
        if cidr not in self.blocks:
            block, rev = self.ipam._load_block(cidr)
            if block is None:
                return None, 0
            self.blocks[cidr] = (block, rev)
        return self.blocks[cidr]

    def _take(self, block, ordinal):
        seq = block.next_seq
        block.next_seq += 1
        block.allocations[str(ordinal)] = Allocation(handle=self.handle_id, host=self.host, seq=seq)
        addr = block.address(ordinal)
        self.new_addresses[addr] = (block.cidr, seq)
        self.changed = True
        return addr

    def _held(self, req):
        """An address the handle already holds that satisfies ``req`` (idempotent retries)."""
        held = list(self.handle.addresses) if self.handle else []
        held += list(self.new_addresses)
        for addr in held:
            ip = netaddr.IPAddress(addr)
            if req.address:
                if ip == netaddr.IPAddress(req.address):
                    return addr
                continue
            if ip.version != req.version or addr in self.used:
                continue
            if req.within and ip not in netaddr.IPNetwork(req.within):
                continue
            if not req.pools or any(ip in netaddr.IPNetwork(p) for p in req.pools):
                return addr
        return None

    def satisfy(self, req):
        addr = self._held(req) or (self._static(req) if req.address else self._auto(req))
        self.used.add(addr)
        return addr

    def _static(self, req):
        pool = self.ipam._pool_of(req.address, req.pools)
        if pool.disabled:
            raise AddressNotInPool(f"pool {pool.cidr} is disabled")
        cidr = blockmath.block_for(pool.cidr, pool.block_size, req.address)
        block, _ = self._block(cidr)
        if block is None:
            block = Block(cidr=cidr, pool=pool.cidr, affinity=self.host)
            self.blocks[cidr] = (block, 0)
            self.claims.add(cidr)
        ordinal = block.ordinal(req.address)
        alloc = block.allocations.get(str(ordinal))
        if alloc is not None:
            raise AddressInUse(f"address {req.address} is already in use (by {alloc.handle} on {alloc.host})")
        return self._take(block, ordinal)

    def _candidate_pools(self, req):
        pools = [p for p in self.ipam._pools_cached() if p.version == req.version and not p.disabled]
        if req.pools:
            pools = [p for p in pools if p.cidr in req.pools]
        if req.within:
            pools = [p for p in pools if blockmath.overlaps(p.cidr, req.within)]
        return pools

    def _auto(self, req):
        pools = self._candidate_pools(req)
        if not pools:
            self.ipam._pools_cached(refresh=True)
            pools = self._candidate_pools(req)
        if not pools:
            what = f" matching {', '.join(req.pools)}" if req.pools else ""
            raise PoolExhausted(f"no enabled IPv{req.version} pool{what} to allocate from")
        pool_cidrs = {p.cidr for p in pools}
        # 1. blocks this host already owns (or claims in this very assignment)
        for cidr in self.ipam._affine_blocks(self.host) + sorted(self.claims):
            block, _ = self.blocks.get(cidr) or self.ipam._peek_block(cidr)
            if block is None or block.pool not in pool_cidrs or block.affinity != self.host:
                continue
            if blockmath.first_free(block, req.within) is not None:
                block, _ = self._block(cidr)
                return self._take(block, blockmath.first_free(block, req.within))
        # 2. claim a new block (one per attempt: the CAS decides who gets it)
        existing = {
            keys.segment_cidr(keys.last_segment(kv.key))
            for kv in self.ipam.ds.get_prefix(keys.BLOCKS, keys_only=True)[0]
        }
        for pool in pools:
            for cidr in blockmath.iter_blocks(pool.cidr, pool.block_size, req.within):
                if cidr in existing or cidr in self.blocks:
                    continue
                block = Block(cidr=cidr, pool=pool.cidr, affinity=self.host)
                ordinal = blockmath.first_free(block, req.within)
                if ordinal is None:
                    continue
                self.blocks[cidr] = (block, 0)
                self.claims.add(cidr)
                return self._take(block, ordinal)
        # 3. borrow from any block with room
        for block, rev in self.ipam.list_blocks():
            if block.pool not in pool_cidrs:
                continue
            if block.cidr in self.blocks:
                block, rev = self.blocks[block.cidr]
            ordinal = blockmath.first_free(block, req.within)
            if ordinal is not None:
                if block.cidr not in self.blocks:
                    block = block.copy()  # list_blocks returned the cached record: never change it in place
                self.blocks[block.cidr] = (block, rev)
                return self._take(block, ordinal)
        raise PoolExhausted(
            f"no free IPv{req.version} address in pool(s) {', '.join(sorted(pool_cidrs))}"
            + (f" within {req.within}" if req.within else "")
        )
