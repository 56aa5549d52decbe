"""The reconcilers the agent runs on every sync, each turning a ClusterView into kernel or daemon state.

Each ``sync(view, full=False, changes=EVERYTHING)`` also gets what changed since the previous pass
(view.ViewChanges) and skips when nothing it depends on did: at 50 hosts most events concern one other host.
"""

import logging

from netplugin.agent.view import EVERYTHING
from netplugin.dataplane import changed, host_ifname
from netplugin.datastore import keys

LOG = logging.getLogger(__name__)


class DataplaneReconciler:
    """Veths, host routes and blackholes of this host. ADD/DEL keep their own endpoints right, so the whole pass
    (every veth, route and address read back, under the exclusive host lock) runs on the periodic full resync
    and when a record deleted by someone else leaves a veth to remove; a change of the owned blocks alone only
    converges their blackholes, without the lock.
    Host-wide IPv6 forwarding is turned on here when the first IPv6 pool appears (Dataplane.enable_ipv6).

    A veth is deleted only when its endpoint is known to be deleted: a watch event deleted its record (the
    key changed and the record is no longer in the view). DEL and Docker's Leave/DeleteEndpoint remove their
    own veths. A record merely missing from a full read proves nothing (an etcd restored from an older
    snapshot, a restart with another ``--hostname``, a record deleted by hand while the agent was down): the
    agent cannot tell a stale veth from a live container's, so it keeps it, logs it once and shows it in
    ``report()`` (``netctl`` shows that; ``ip link del NAME`` removes one that is really stale).
    """

    def __init__(self, host, dataplane, service, host_lock):
        self.host = host
        self.dataplane = dataplane  # a netplugin.dataplane.backend.Backend
        self.service = service  # the endpoint records: list, spec_of
        self.host_lock = host_lock
        self._blocks = None
        self._deleted = set()  # host ifnames whose records watch events deleted since the last kernel pass
        self._unaccounted = []  # veths of ours with no record, kept (as of the last kernel pass)
        self._logged = set()  # unaccounted veths already logged

    def _learn_deletions(self, view, changes):
        if changes.everything:
            return  # a full read says what exists now, not what was deleted
        prefix = keys.endpoint_prefix(self.host)
        present = {ep.id for ep in view.endpoints_of(self.host)}
        for key in changes.keys:
            if key.startswith(prefix) and key[len(prefix) :] not in present:
                self._deleted.add(host_ifname(key[len(prefix) :]))

    def sync(self, view, full=False, changes=EVERYTHING):
        self._learn_deletions(view, changes)
        if changes.touches(keys.POOLS) and any(p.version == 6 for p in view.pools):
            self.dataplane.enable_ipv6(recheck=full)  # host IPv6 forwarding only once it is needed
        if not full and not changes.touches(keys.affinity_prefix(self.host)):
            return
        blocks = sorted(view.blocks.get(self.host, []))
        if not full and blocks == self._blocks:
            return
        if not full and not self._deleted:
            # Only the owned blocks changed (an ADD claimed one, a DEL emptied one): their blackholes are all
            # there is to do, no veth is touched, so no ADD waits for it (the whole pass took 100 ms at 200).
            done = self.dataplane.converge_blocks(blocks)
            self._blocks = blocks
            if changed(done) or done.get("errors"):
                LOG.info("event=dataplane.blocks_converged changes=%s", {k: v for k, v in done.items() if v})
            return
        with self.host_lock.exclusive():
            # Re-read this host's endpoints under the lock: the view may predate an ADD that just finished.
            eps = self.service.list(self.host)
            desired = [self.service.spec_of(ep) for ep in eps]
            deletable = self._deleted - {host_ifname(ep.id) for ep in eps}
            done = self.dataplane.reconcile(desired, blocks, deletable=deletable)
            self._deleted.clear()  # removed now, or already gone; a failed removal shows up as unaccounted
        self._blocks = blocks
        self._note_unaccounted(done.get("unaccounted", []))
        if changed(done) or done.get("errors"):
            LOG.info("event=dataplane.reconciled changes=%s", {k: v for k, v in done.items() if v})

    def _note_unaccounted(self, names):
        self._unaccounted = sorted(names)
        for name in self._unaccounted:
            if name not in self._logged:
                LOG.warning(
                    "event=dataplane.unaccounted host_if=%s host=%s reason=no endpoint record of this host"
                    " names it; kept (delete it with 'ip link del %s' if no container uses it)",
                    name,
                    self.host,
                    name,
                )
        self._logged = set(self._unaccounted)

    def report(self):
        """For the agent's status answer and netctl."""
        return {"unaccounted_interfaces": list(self._unaccounted)}


class RoutingGate:
    """Runs the routing reconciler unless every changed key is one routing never reads: endpoints, policies,
    networks, pools and, in bgp mode, other hosts' blocks (BIRD's config holds only ours). At 50 hosts nearly every
    event is another host's endpoint or block, and rendering and comparing BIRD's config for each was most of an
    idle agent's pass. A list of what to ignore rather than of what to watch, so that an input routing starts to
    read (liveness, for dead peers) is never silently missed."""

    IGNORED = (keys.ENDPOINTS, keys.POLICIES, keys.NETWORKS, keys.POOLS)

    def __init__(self, inner, host, mode):
        self.inner = inner
        self.own_blocks = keys.affinity_prefix(host)
        self.mode = mode

    def report(self):
        return self.inner.report()

    def close(self):
        self.inner.close()

    def _matters(self, key):
        if key.startswith(self.IGNORED):
            return False
        return not (self.mode == "bgp" and key.startswith(keys.AFFINITY) and not key.startswith(self.own_blocks))

    def sync(self, view, full=False, changes=EVERYTHING):
        if full or changes.everything or any(self._matters(k) for k in changes.keys):
            self.inner.sync(view, full=full)


def build_reconcilers(config, dataplane, service, host_lock, routing=None, metrics=None):
    """The agent's reconcilers in the order a pass runs them; ``routing`` (a RoutingReconciler) only in bgp or
    direct mode. Each gets its collaborators, never the agent.

    Routing first: it renders from the view alone (BIRD advertises our blocks from etcd, not from the kernel), so
    a block this host just claimed is announced while the ADD that claimed it still holds the host lock, which
    the dataplane's kernel pass waits for."""
    from netplugin.agent.nat import NatReconciler
    from netplugin.agent.policy import PolicyReconciler

    parts = []
    if routing is not None:
        parts.append(RoutingGate(routing, config.hostname, config.routing))
    parts.append(DataplaneReconciler(config.hostname, dataplane, service, host_lock))
    parts.append(PolicyReconciler(config.hostname, dataplane, metrics))
    parts.append(NatReconciler(dataplane))
    return parts
