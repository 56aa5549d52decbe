"""The reconcilers the agent runs on every sync, each turning a ClusterView into kernel or daemon state.

Each ``sync(view, full=False, changes=EVERYTHING)`` also gets what changed since the previous pass
(view.ViewChanges) and skips when nothing it depends on did: at 50 hosts most events concern one other host.
"""
import logging

from netplugin.agent.view import EVERYTHING
from netplugin.dataplane import changed
from netplugin.datastore import keys

LOG = logging.getLogger(__name__)


class DataplaneReconciler:
    """Veths, host routes and blackholes of this host. Kernel work runs under the exclusive host lock, and only
    when the owned blocks changed or on the periodic full resync: ADD/DEL keep their own endpoints right."""

    def __init__(self, agent):
        self.agent = agent
        self._blocks = None

    def sync(self, view, full=False, changes=EVERYTHING):
        if not full and not changes.touches(keys.affinity_prefix(self.agent.host)):
            return
        blocks = sorted(view.blocks.get(self.agent.host, []))
        if not full and blocks == self._blocks:
            return
        with self.agent.host_lock.exclusive():
            # Re-read this host's endpoints under the lock: the view may predate an ADD that just finished.
            eps = self.agent.service.list(self.agent.host)
            desired = [self.agent.service.spec_of(ep) for ep in eps]
            done = self.agent.dataplane.reconcile(desired, blocks)
        self._blocks = blocks
        if changed(done) or done.get("errors"):
            LOG.info("event=dataplane.reconciled changes=%s", {k: v for k, v in done.items() if v})


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

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _matters(self, key):
        if key.startswith(self.IGNORED):
            return False
        return not (self.mode == "bgp" and key.startswith(keys.AFFINITY) and not key.startswith(self.own_blocks))

    def sync(self, view, full=False, changes=EVERYTHING):
        if full or changes.everything or any(self._matters(k) for k in changes.keys):
            self.inner.sync(view, full=full)


def build_reconcilers(agent):
    from netplugin.agent.nat import NatReconciler
    from netplugin.agent.policy import PolicyReconciler
    from netplugin.agent.routing import RoutingReconciler
    parts = [DataplaneReconciler(agent)]
    if agent.config.routing in ("bgp", "direct"):
        parts.append(RoutingGate(RoutingReconciler(agent), agent.host, agent.config.routing))
    parts.append(PolicyReconciler(agent))
    parts.append(NatReconciler())
    return parts
