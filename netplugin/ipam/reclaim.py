"""Automatic reclamation of addresses and blocks held by dead hosts, and the leak report behind ``ipam check``.

Safety first (the failure Calico users fear most is a collector freeing an address still in use):
- only hosts whose liveness key is gone are considered, and only once it has been gone for ``grace`` seconds,
  measured from a marker written in etcd (so a new leader does not restart or skip the clock);
- every release transaction also compares "the host's liveness key is absent", so a host that comes back
  between our check and our write keeps everything;
- a handle is released all-or-nothing, and allocations are matched by handle and sequence number (ABA).
"""

import logging
import time

from netplugin.datastore import keys
from netplugin.datastore.client import absent, delete_op, mod_is, put_op
from netplugin.datastore.models import Block, Handle
from netplugin.errors import Conflict
from netplugin.nodes import NodeRegistry

LOG = logging.getLogger(__name__)


class _OutOfTime(Exception):
    """A reclaim pass used its budget (or lost leadership): the next pass continues."""


class Reclaimer:
    def __init__(self, datastore, ipam, grace=600.0, clock=time.time):
        self.ds = datastore
        self.ipam = ipam
        self.grace = grace
        self.clock = clock
        self.nodes = NodeRegistry(datastore)
        self._deadline = None  # of the running pass (monotonic); see run_once
        self._still_leader = None

    def _owners(self):
        """Hosts that hold anything: block affinities, handles or endpoint records."""
        owners = {}
        for kv in self.ds.list(keys.AFFINITY):
            owners.setdefault(kv.key[len(keys.AFFINITY) :].split("/")[0], True)
        handles = [h for _, h in Handle.from_kvs(self.ds.list(keys.HANDLES))]
        for h in handles:
            owners.setdefault(h.host, True)
        for kv in self.ds.list(keys.ENDPOINTS):
            owners.setdefault(kv.key[len(keys.ENDPOINTS) :].split("/")[0], True)
        return set(owners), handles

    def run_once(self, budget=None, still_leader=None):
        """One pass; returns what it did, for logs and tests. With ``budget`` (seconds) the pass stops before its
        next host or handle once past it and says ``truncated``: the next pass goes on where this one stopped
        (every release is its own guarded transaction). ``still_leader()`` False stops it the same way."""
        self._deadline = None if budget is None else time.monotonic() + budget
        self._still_leader = still_leader
        report = {"waiting": {}, "reclaimed": {}, "revived": []}
        alive = self.nodes.alive()
        owners, handles = self._owners()
        markers = {keys.last_segment(kv.key): kv for kv in self.ds.list(keys.DEAD)}
        now = self.clock()
        for host, kv in markers.items():
            if host in alive or host not in owners:
                self.ds.delete(kv.key)
                if host in alive:
                    report["revived"].append(host)
        for host in sorted(owners - alive):
            marker = markers.get(host)
            if marker is None or host in report["revived"]:
                self.ds.txn(
                    [absent(keys.dead(host)), absent(keys.liveness(host))],
                    [put_op(keys.dead(host), {"host": host, "since": now})],
                )
                report["waiting"][host] = 0.0
                continue
            gone_for = now - float(marker.value.get("since", now))
            if gone_for < self.grace:
                report["waiting"][host] = gone_for
                continue
            try:
                report["reclaimed"][host] = self.reclaim_host(host, [h for h in handles if h.host == host])
            except Conflict as e:
                LOG.info("reclaim of %s abandoned: %s", host, e)
            except _OutOfTime:
                report["truncated"] = True
                break
        return report

    def _may_go_on(self):
        return (self._deadline is None or time.monotonic() < self._deadline) and (
            self._still_leader is None or self._still_leader()
        )

    def reclaim_host(self, host, handles):
        guard = absent(keys.liveness(host))
        released = []
        for handle in handles:
            if not self._may_go_on():
                LOG.info("reclaim of %s paused after %d address(es): out of time or leadership", host, len(released))
                raise _OutOfTime()
            released += self.ipam.release_handle(handle.handle, guard=[guard])
        for kv in self.ds.list(keys.affinity_prefix(host)):
            cidr = keys.segment_cidr(keys.last_segment(kv.key))
            self._release_block(host, cidr, guard, released)
        # Endpoint records of the dead host describe containers that no longer exist.
        eps = self.ds.list(keys.endpoint_prefix(host))
        for i in range(0, len(eps), 50):
            self.ds.txn([guard], [delete_op(ep.key) for ep in eps[i : i + 50]])
        self.ds.txn([guard], [delete_op(keys.dead(host))])
        LOG.info(
            "reclaimed host %s: %d address(es), its blocks and %d endpoint record(s)", host, len(released), len(eps)
        )
        return len(released)

    def _release_block(self, host, cidr, guard, released):
        for _ in range(20):
            kv = self.ds.get(keys.block(cidr))
            if kv is None:
                self.ds.txn([guard], [delete_op(keys.affinity(host, cidr))])
                return
            block = Block.from_dict(kv.value)
            for ordinal, alloc in list(block.allocations.items()):
                if alloc.host == host:  # an allocation with no handle left: a leak of the dead host
                    released.append(block.address(ordinal))
                    del block.allocations[ordinal]
            ops = [delete_op(keys.affinity(host, cidr))]
            if block.allocations:
                block.affinity = None  # borrowed addresses of live hosts stay; the block loses its owner
                ops.append(put_op(keys.block(cidr), block.to_dict()))
            else:
                ops.append(delete_op(keys.block(cidr)))
            if self.ds.txn([guard, mod_is(keys.block(cidr), kv.mod_revision)], ops).succeeded:
                self.ipam._blocks.pop(cidr, None)
                return
            if not self.ds.txn([guard], []).succeeded:
                raise Conflict(f"host {host} came back while reclaiming block {cidr}")
        raise Conflict(f"block {cidr} kept changing while reclaiming it")


def check(datastore):
    """Leaks and inconsistencies, for ``netctl ipam check``: a list of findings (empty: clean)."""
    findings = []
    alive = NodeRegistry(datastore).alive()
    handles = {}
    for _, h in Handle.from_kvs(datastore.list(keys.HANDLES)):  # bad records: ``netctl check`` lists them
        handles[h.handle] = h
    seen = set()
    for _, block in Block.from_kvs(datastore.list(keys.BLOCKS)):
        if block.affinity and block.affinity not in alive:
            findings.append(
                {
                    "kind": "block-of-dead-host",
                    "block": block.cidr,
                    "host": block.affinity,
                    "detail": f"block {block.cidr} is affine to {block.affinity}, which is not alive",
                }
            )
        for ordinal, alloc in block.allocations.items():
            addr = block.address(ordinal)
            seen.add((alloc.handle, addr))
            h = handles.get(alloc.handle)
            if h is None or addr not in h.addresses:
                findings.append(
                    {
                        "kind": "orphan-allocation",
                        "address": addr,
                        "handle": alloc.handle,
                        "host": alloc.host,
                        "detail": f"{addr} is allocated to {alloc.handle}, which has no record of it",
                    }
                )
            elif alloc.host not in alive:
                findings.append(
                    {
                        "kind": "owner-not-alive",
                        "address": addr,
                        "handle": alloc.handle,
                        "host": alloc.host,
                        "detail": f"{addr} belongs to {alloc.handle} on {alloc.host}, which is not alive",
                    }
                )
    for h in handles.values():
        for addr in h.addresses:
            if (h.handle, addr) not in seen:
                findings.append(
                    {
                        "kind": "dangling-handle",
                        "address": addr,
                        "handle": h.handle,
                        "host": h.host,
                        "detail": f"handle {h.handle} claims {addr}, which no block allocates to it",
                    }
                )
    return findings
