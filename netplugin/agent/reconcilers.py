"""The reconcilers the agent runs on every sync, each turning a ClusterView into kernel or daemon state."""
import logging

from netplugin.dataplane import changed

LOG = logging.getLogger(__name__)


class DataplaneReconciler:
    """Veths, host routes and blackholes of this host. Kernel work runs under the exclusive host lock, and only
    when the owned blocks changed or on the periodic full resync: ADD/DEL keep their own endpoints right."""

    def __init__(self, agent):
        self.agent = agent
        self._blocks = None

    def sync(self, view, full=False):
        blocks = sorted(view.blocks.get(self.agent.host, []))
        if not full and blocks == self._blocks:
            return
        with self.agent.host_lock.exclusive():
            # Re-read this host's endpoints under the lock: the view may predate an ADD that just finished.
            eps = self.agent.service.list(self.agent.host)
            desired = [self.agent.service.spec_of(ep) for ep in eps]
            changes = self.agent.dataplane.reconcile(desired, blocks)
        self._blocks = blocks
        if changed(changes) or changes.get("errors"):
            LOG.info("event=dataplane.reconciled changes=%s", {k: v for k, v in changes.items() if v})


def build_reconcilers(agent):
    from netplugin.agent.policy import PolicyReconciler
    from netplugin.agent.routing import RoutingReconciler
    parts = [DataplaneReconciler(agent)]
    if agent.config.routing in ("bgp", "direct"):
        parts.append(RoutingReconciler(agent))
    parts.append(PolicyReconciler(agent))
    return parts
