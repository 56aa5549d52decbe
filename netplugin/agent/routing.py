"""Routing reconciler: BIRD's config (``bgp`` mode) or kernel routes to other hosts' blocks (``direct`` mode),
both rendered from the ClusterView.

BIRD is started once and then only reconfigured (a bad render never replaces a good config: the writer checks
with ``bird -p`` first). It is deliberately left running when the agent stops, so an agent restart does not
withdraw a single route; tearing down the host namespace takes it down.
"""
import logging
import os

from netplugin.errors import InvalidInput
from netplugin.routing.bird import BirdConfigWriter, BirdProcess
from netplugin.routing.bird_config import render_bird_config
from netplugin.routing.direct import DirectRoutes
from netplugin.routing.model import BgpNode, BgpPeer, BgpSettings, RoutingInput

LOG = logging.getLogger(__name__)


def routing_input(view, host):
    """The RoutingInput for ``host`` from a ClusterView (pure; unit-tested)."""
    me = view.nodes.get(host)
    if me is None or not me.address:
        raise InvalidInput(f"node {host} has no IPv4 address for BGP: start the agent with --node-address")
    nodes = tuple(BgpNode(name=n.name, address=n.address, address6=n.address6, as_number=n.as_number,
                          route_reflector=n.route_reflector)
                  for n in sorted(view.nodes.values(), key=lambda n: n.name) if n.address)
    peers = tuple(BgpPeer(name=p.name, address=p.address, as_number=p.as_number, node=p.node, password=p.password)
                  for p in sorted(view.peers, key=lambda p: p.name) if p.node in (None, host))
    # BGP graceful restart off: with it, a peer keeps a dead host's routes as "stale" for BIRD's default restart
    # time (120 s) instead of dropping them when the session fails (measured in the multi-host lab). The kernel
    # protocol's graceful restart, which keeps routes in the kernel across a BIRD restart, is unaffected.
    settings = BgpSettings(mesh=view.config.mesh, default_as=view.config.as_number, graceful_restart=False)
    node = next(n for n in nodes if n.name == host)
    return RoutingInput(node=node, nodes=nodes, peers=peers, settings=settings,
                        blocks=tuple(sorted(view.blocks.get(host, []))))


def direct_routes(view, host):
    """{other node's address: [its blocks]} for direct mode."""
    out = {}
    for name, blocks in view.blocks.items():
        node = view.nodes.get(name)
        if name != host and node and node.address and blocks:
            out[node.address] = sorted(blocks)
    return out


class RoutingReconciler:
    def __init__(self, agent):
        self.host = agent.host
        self.mode = agent.config.routing
        self.bird = None
        self.writer = None
        self.direct = None
        self._started = False
        if self.mode == "bgp":
            self.bird = BirdProcess(os.path.join(agent.config.run_dir, "bird"), netns=None)
            self.writer = BirdConfigWriter(self.bird)
        elif self.mode == "direct":
            self.direct = DirectRoutes(netns=None)

    def sync(self, view, full=False):
        if self.mode == "bgp":
            changed = self.writer.apply(render_bird_config(routing_input(view, self.host)))
            # Asking BIRD costs a birdc process: only at start-up and on full resyncs (which restart a dead BIRD).
            if (full or not self._started) and not self.bird.running():
                self.bird.start()
                LOG.info("event=bird.started pid=%s", self.bird.pid())
            elif changed:
                LOG.info("event=bird.reconfigured")
            self._started = True
        elif self.mode == "direct":
            changes = self.direct.reconcile(direct_routes(view, self.host))
            if changes:
                LOG.info("event=direct_routes.reconciled %s", changes)
