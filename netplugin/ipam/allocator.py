"""Block-affinity IPAM over etcd with compare-and-swap.

An assignment plans every address it needs (possibly IPv4 and IPv6 together) against cached block records, then
commits them and the owner's handle in **one** etcd transaction guarded by the mod-revision of each block and of
the handle. A lost race answers with the current records (the transaction's failure branch reads them), so a
retry costs no extra round trip. Nothing here holds a lock across etcd calls; concurrent allocators on many
hosts simply lose and retry a CAS, and can never hand out one address twice.

Order of preference for automatic assignment: a free address in a block affine to this host; a newly claimed
block (the claim creates the block record and the affinity key in one transaction); finally an address borrowed
from another host's block, so a pool is never reported exhausted while it has free addresses.
"""

import logging
from dataclasses import dataclass

import netaddr

from netplugin.datastore import keys
from netplugin.datastore.client import MAX_TXN_OPS, delete_op, get_op, mod_is, prefix_unchanged_since, put_op
from netplugin.datastore.models import Block, Handle, Pool, check_pool_cidr
from netplugin.errors import AddressInUse, AddressNotInPool, AlreadyExists, Conflict, InUse, InvalidInput, NotFound
from netplugin.ipam import blocks as blockmath
from netplugin.ipam.plan import AssignmentPlan

LOG = logging.getLogger(__name__)
MAX_ATTEMPTS = 200


@dataclass(frozen=True)
class AssignRequest:
    """One address wanted by a handle: automatic (by family, optionally restricted) or a given address."""

    version: int = 4
    address: str | None = None
    pools: tuple = ()  # restrict to these pool CIDRs (empty: every enabled pool of the family)
    within: str | None = None  # restrict to this range (Docker's --ip-range)

    @classmethod
    def static(cls, address, pools=()):
        try:
            ip = netaddr.IPAddress(str(address).split("/")[0])
        except (netaddr.AddrFormatError, ValueError):
            raise InvalidInput(f"{address!r} is not an IP address") from None
        return cls(version=ip.version, address=str(ip), pools=tuple(pools))


def new_pool(cidr, block_size=None, nat_outgoing=False, disabled=False):
    """A validated Pool; ``block_size`` None is the family's default (never larger than the pool)."""
    net = check_pool_cidr(cidr)
    size = max(blockmath.DEFAULT_BLOCK_SIZE[net.version], net.prefixlen) if block_size is None else int(block_size)
    return Pool(cidr=str(net), block_size=size, nat_outgoing=nat_outgoing, disabled=disabled).validate()


def check_no_overlap(pool, others):
    """A new pool may not repeat or overlap any of ``others``."""
    for other in others:
        if other.cidr == pool.cidr:
            raise AlreadyExists(f"pool {pool.cidr} already exists")
        if blockmath.overlaps(other.cidr, pool.cidr):
            raise InvalidInput(f"pool {pool.cidr} overlaps existing pool {other.cidr}")


def check_pool_empty(pool, blocks):
    """A pool is removed only while none of its ``blocks`` holds an allocation."""
    in_use = sum(len(b.allocations) for b in blocks)
    if in_use:
        raise InUse(f"pool {pool.cidr} still has {in_use} allocated address(es); release them first")


class IPAM:
    def __init__(self, datastore):
        self.ds = datastore
        self._blocks = {}  # cidr -> (Block, mod_revision); a cache, validated by every CAS
        self._affine = {}  # host -> set of block cidrs
        self._pools = None  # list[Pool]
        self._pool_revs = {}  # pool cidr -> mod-revision read; a block claim is guarded by its pool's
        self._handles = {}  # handle id -> (Handle, mod_revision) written by this process; validated by CAS
        self.stats = {"cas_conflicts": 0, "claims": 0}

    # --- pools ----------------------------------------------------------------------------------------------------

    def list_pools(self):
        kvs = self.ds.list(keys.POOLS)
        decoded = Pool.from_kvs(kvs)
        self._pools = [p for _, p in decoded]
        self._pool_revs = {p.cidr: kv.mod_revision for kv, p in decoded}
        return list(self._pools)

    def add_pool(self, cidr, block_size=None, nat_outgoing=False):
        pool = new_pool(cidr, block_size=block_size, nat_outgoing=nat_outgoing)
        for _ in range(10):
            kvs, rev = self.ds.get_prefix(keys.POOLS)
            check_no_overlap(pool, [Pool.from_dict(kv.value) for kv in kvs])
            res = self.ds.txn([prefix_unchanged_since(keys.POOLS, rev)], [put_op(keys.pool(pool.cidr), pool.to_dict())])
            if res.succeeded:
                self._pools = None
                return pool
        raise Conflict(f"could not add pool {pool.cidr}: pools kept changing")

    def update_pool(self, cidr, nat_outgoing=None, disabled=None):
        """Change a pool's NAT-outgoing flag or disable it (no new blocks or addresses from it; what is allocated
        stays). None leaves a field as it is. Guarded by the record's revision, so a concurrent change wins
        cleanly instead of being overwritten."""
        self._valid_cidr(cidr)
        for _ in range(10):
            kv = self.ds.get(keys.pool(cidr))
            if kv is None:
                raise NotFound(f"pool {cidr} does not exist")
            pool = Pool.from_dict(kv.value)
            changes = {k: v for k, v in (("nat_outgoing", nat_outgoing), ("disabled", disabled)) if v is not None}
            updated = Pool.from_dict({**pool.to_dict(), **changes})
            if updated == pool:
                return pool
            if self.ds.txn(
                [mod_is(keys.pool(cidr), kv.mod_revision)], [put_op(keys.pool(cidr), updated.to_dict())]
            ).succeeded:
                self._pools = None
                return updated
        raise Conflict(f"could not update pool {cidr}: it kept changing")

    def remove_pool(self, cidr):
        """Remove an empty pool and its (empty) blocks; refused while any address is allocated."""
        pool_kv = self.ds.get(keys.pool(cidr)) if self._valid_cidr(cidr) else None
        if pool_kv is None:
            raise NotFound(f"pool {cidr} does not exist")
        pool = Pool.from_dict(pool_kv.value)
        check_pool_empty(pool, [b for b, _ in self._pool_blocks(pool).values()])
        # Disable first so no allocator claims a new block while we delete the empty ones in batches.
        disabled = Pool.from_dict({**pool.to_dict(), "disabled": True})
        if not self.ds.txn(
            [mod_is(keys.pool(pool.cidr), pool_kv.mod_revision)], [put_op(keys.pool(pool.cidr), disabled.to_dict())]
        ).succeeded:
            raise Conflict(f"pool {pool.cidr} changed while removing it; try again")
        items = sorted(self._pool_blocks(pool).items())
        for i in range(0, len(items), MAX_TXN_OPS // 3):
            compare, ops = [], []
            for cidr_, (block, rev) in items[i : i + MAX_TXN_OPS // 3]:
                if block.allocations:
                    self.ds.put(keys.pool(pool.cidr), pool.to_dict())  # re-enable: someone got in first
                    raise InUse(f"pool {pool.cidr} got an allocation in {cidr_} while being removed")
                compare.append(mod_is(keys.block(cidr_), rev))
                ops.append(delete_op(keys.block(cidr_)))
                if block.affinity:
                    ops.append(delete_op(keys.affinity(block.affinity, cidr_)))
            if not self.ds.txn(compare, ops).succeeded:
                self.ds.put(keys.pool(pool.cidr), pool.to_dict())
                raise Conflict(f"pool {pool.cidr} changed while removing it; try again")
        self.ds.delete(keys.pool(pool.cidr))
        for cidr_ in dict(items):
            self._blocks.pop(cidr_, None)
        for cached in self._affine.values():
            cached.difference_update(dict(items))
        self._pools = None

    @staticmethod
    def _valid_cidr(cidr):
        try:
            netaddr.IPNetwork(cidr)
            return True
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise InvalidInput(f"{cidr!r} is not a CIDR") from None

    def _pools_cached(self, refresh=False):
        if self._pools is None or refresh:
            self.list_pools()
        return self._pools

    def _pool_blocks(self, pool):
        out = {}
        for block, rev in self.list_blocks():
            if block.pool == pool.cidr:
                out[block.cidr] = (block, rev)
        return out

    # --- blocks ---------------------------------------------------------------------------------------------------

    def list_blocks(self):
        """Every block record with its mod-revision (refreshes the cache)."""
        out = []
        for kv in self.ds.list(keys.BLOCKS):
            block = Block.from_dict(kv.value)
            self._blocks[block.cidr] = (block, kv.mod_revision)
            out.append((block, kv.mod_revision))
        return out

    def _load_block(self, cidr, refresh=False):
        """A private copy of a block record (from the cache unless ``refresh``), with its mod-revision."""
        block, rev = self._peek_block(cidr, refresh)
        return (block.copy() if block else None), rev

    def _peek_block(self, cidr, refresh=False):
        """The cached record itself: read it, never change it."""
        if not refresh and cidr in self._blocks:
            return self._blocks[cidr]
        kv = self.ds.get(keys.block(cidr))
        if kv is None:
            self._blocks.pop(cidr, None)
            return None, 0
        self._blocks[cidr] = (Block.from_dict(kv.value), kv.mod_revision)
        return self._blocks[cidr]

    def _affine_blocks(self, host):
        if host not in self._affine:
            kvs = self.ds.list(keys.affinity_prefix(host))
            self._affine[host] = {keys.segment_cidr(keys.last_segment(kv.key)) for kv in kvs}
        return sorted(self._affine[host], key=lambda c: (netaddr.IPNetwork(c).version, netaddr.IPNetwork(c).first))

    # --- assignment -----------------------------------------------------------------------------------------------

    def auto_assign(self, handle_id, host, version=4, pools=(), within=None, attrs=None):
        return self.assign(handle_id, host, [AssignRequest(version, None, tuple(pools), within)], attrs)[0]

    def assign_ip(self, handle_id, host, address, attrs=None, pools=()):
        return self.assign(handle_id, host, [AssignRequest.static(address, pools)], attrs)[0]

    def assign(self, handle_id, host, requests, attrs=None):
        """Give ``handle_id`` one address per request; returns the addresses, in request order.

        Idempotent: a handle that already holds an address satisfying a request keeps it (a retried CNI ADD gets
        the same addresses back). All-or-nothing: either every request is satisfied or nothing changes.
        """
        return self.assign_new(handle_id, host, requests, attrs)[0]

    def assign_new(self, handle_id, host, requests, attrs=None, with_creation=None):
        """``assign``, also saying what this call took: (addresses, {address: seq} newly allocated, revision), so
        that a caller undoing a failed retry releases only those, never what the handle held before.

        ``with_creation(addresses)``: etcd operations written in the transaction that creates the handle (ADD's
        endpoint record rides with its addresses, one round trip instead of two); ``revision`` is that
        transaction's when it created the handle, else None (the handle existed: nothing extra was written)."""
        hkey = keys.handle(handle_id)
        handle, handle_rev = None, 0
        rechecked = False
        for attempt in range(MAX_ATTEMPTS):
            plan = AssignmentPlan(self, handle_id, host, handle)
            try:
                addresses = [plan.satisfy(req) for req in requests]
            except AddressInUse:
                if rechecked:
                    raise
                # "In use" was judged from the cache and without the handle (a retried static request holds the
                # address itself): re-read both once before refusing.
                rechecked = True
                for cidr in plan.blocks:
                    self._blocks.pop(cidr, None)
                handle, handle_rev = self.get_handle(handle_id)
                continue
            if not plan.changed:
                return addresses, {}, None
            creating = handle is None
            rec = handle or Handle(handle=handle_id, host=host, attrs=dict(attrs or {}))
            for addr, (cidr, seq) in plan.new_addresses.items():
                rec.addresses[addr] = {"block": cidr, "seq": seq}
            compare = [mod_is(hkey, handle_rev)]
            success = [put_op(hkey, rec.to_dict())]
            if creating and with_creation is not None:
                success += with_creation(addresses)
            failure = [get_op(hkey)]
            for cidr, (block, rev) in sorted(plan.blocks.items()):
                bkey = keys.block(cidr)
                compare.append(mod_is(bkey, rev))
                success.append(put_op(bkey, block.to_dict()))
                failure.append(get_op(bkey))
                if cidr in plan.claims:
                    success.append(put_op(keys.affinity(host, cidr), {"host": host, "cidr": cidr}))
                    # ... only from a pool that was not removed or disabled since we listed it
                    compare.append(mod_is(keys.pool(block.pool), self._pool_revs.get(block.pool, 0)))
            res = self.ds.txn(compare, success, failure)
            if res.succeeded:
                self._remember_handle(rec, res.revision)
                for cidr, (block, _) in plan.blocks.items():
                    self._blocks[cidr] = (block, res.revision)
                if plan.claims:
                    self._affine.setdefault(host, set()).update(plan.claims)
                    self.stats["claims"] += len(plan.claims)
                created = res.revision if creating and with_creation is not None else None
                return addresses, {addr: seq for addr, (_, seq) in plan.new_addresses.items()}, created
            # Lost the race: take the current records from the failure branch and plan again.
            self.stats["cas_conflicts"] += 1
            current = res.kvs(0)
            handle = Handle.from_dict(current[0].value) if current else None
            handle_rev = current[0].mod_revision if current else 0
            for i, cidr in enumerate(sorted(plan.blocks), start=1):
                kvs = res.kvs(i)
                if kvs:
                    self._blocks[cidr] = (Block.from_dict(kvs[0].value), kvs[0].mod_revision)
                else:
                    self._blocks.pop(cidr, None)
            if plan.claims:
                self._affine.pop(host, None)  # someone else claimed: re-read what is ours
                self._pools = None  # ... or the pool changed
        raise Conflict(f"could not allocate for {handle_id} after {MAX_ATTEMPTS} attempts (heavy contention)")

    # --- release --------------------------------------------------------------------------------------------------

    def get_handle(self, handle_id, cached=False):
        if cached and handle_id in self._handles:
            return self._handles[handle_id]
        kv = self.ds.get(keys.handle(handle_id))
        return (Handle.from_dict(kv.value), kv.mod_revision) if kv else (None, 0)

    def _remember_handle(self, handle, revision):
        if len(self._handles) > 10000:
            self._handles.clear()
        self._handles[handle.handle] = (handle, revision)

    def release_handle(self, handle_id, guard=(), also=()):
        """Release every address of a handle in one transaction. Unknown handle: nothing to do, returns [].

        ``guard`` adds compares to the transaction (the reclaimer passes "the owner's liveness key is absent"):
        if a guard fails the release is abandoned and Conflict raised, never half-done. ``also`` adds operations
        done in the same transaction (DEL removes the endpoint record with it), even when there is no handle.
        """
        hkey = keys.handle(handle_id)
        for attempt in range(MAX_ATTEMPTS):
            handle, hrev = self.get_handle(handle_id, cached=attempt == 0)
            self._handles.pop(handle_id, None)
            if handle is None:
                if also and not self.ds.txn(list(guard), list(also)).succeeded:
                    raise Conflict(f"release of {handle_id} abandoned: its guard no longer holds")
                return []
            compare, success = [mod_is(hkey, hrev)] + list(guard), [delete_op(hkey)] + list(also)
            touched = {}
            for addr, info in sorted(handle.addresses.items()):
                cidr = info["block"]
                if cidr not in touched:
                    touched[cidr] = self._load_block(cidr)
                block, _ = touched[cidr]
                if block is None:
                    continue
                ordinal = str(block.ordinal(addr))
                alloc = block.allocations.get(ordinal)
                if alloc and alloc.handle == handle_id and alloc.seq == info.get("seq", alloc.seq):
                    del block.allocations[ordinal]
            for cidr, (block, rev) in sorted(touched.items()):
                compare.append(mod_is(keys.block(cidr), rev))
                if block is not None:
                    success.append(put_op(keys.block(cidr), block.to_dict()))
            res = self.ds.txn(compare, success)
            if res.succeeded:
                for cidr, (block, _) in touched.items():
                    if block is not None:
                        self._blocks[cidr] = (block, res.revision)
                return sorted(handle.addresses)
            self.stats["cas_conflicts"] += 1
            for cidr in touched:
                self._blocks.pop(cidr, None)
            if guard and not self.ds.txn(list(guard), []).succeeded:
                raise Conflict(f"release of {handle_id} abandoned: its guard no longer holds")
        raise Conflict(f"could not release {handle_id} (heavy contention)")

    def release_address(self, address, seq=None):
        """Release one address, whoever holds it (ops clean-up). Returns the handle it belonged to."""
        try:
            ip = str(netaddr.IPAddress(address))
        except (netaddr.AddrFormatError, ValueError):
            raise InvalidInput(f"{address!r} is not an IP address") from None
        for _ in range(MAX_ATTEMPTS):
            pool = self._pool_of(ip)
            cidr = blockmath.block_for(pool.cidr, pool.block_size, ip)
            block, brev = self._load_block(cidr, refresh=True)
            alloc = block.allocations.get(str(block.ordinal(ip))) if block else None
            if alloc is None:
                raise NotFound(f"address {ip} is not allocated")
            if seq is not None and alloc.seq != seq:
                raise Conflict(f"address {ip} was re-allocated since (seq {alloc.seq}, not {seq}); not released")
            del block.allocations[str(block.ordinal(ip))]
            hkey = keys.handle(alloc.handle)
            handle, hrev = self.get_handle(alloc.handle)
            compare = [mod_is(keys.block(cidr), brev), mod_is(hkey, hrev)]
            success = [put_op(keys.block(cidr), block.to_dict())]
            if handle is not None:
                handle.addresses.pop(ip, None)
                success.append(put_op(hkey, handle.to_dict()) if handle.addresses else delete_op(hkey))
            if self.ds.txn(compare, success).succeeded:
                self._blocks.pop(cidr, None)
                return alloc.handle
        raise Conflict(f"could not release {ip} (heavy contention)")

    def _pool_of(self, ip, pools=()):
        for refresh in (False, True):
            for pool in self._pools_cached(refresh):
                if (not pools or pool.cidr in pools) and ip in pool.network:
                    return pool
        wanted = f" among {', '.join(pools)}" if pools else ""
        raise AddressNotInPool(f"address {ip} is not in any pool{wanted}")

    # --- reporting ------------------------------------------------------------------------------------------------

    def usage(self):
        rows = []
        for block, _ in sorted(self.list_blocks(), key=lambda b: (b[0].network.version, b[0].network.first)):
            rows.append(
                {
                    "block": block.cidr,
                    "pool": block.pool,
                    "host": block.affinity or "",
                    "used": len(block.allocations),
                    "free": block.free_count(),
                }
            )
        return rows
