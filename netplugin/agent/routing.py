"""Routing reconciler: BIRD's config (``bgp`` mode) or kernel routes to other hosts' blocks (``direct`` mode),
both rendered from the ClusterView.

BIRD is started once and then only reconfigured (a bad render never replaces a good config: the writer checks
with ``bird -p`` first). It is deliberately left running when the agent stops, so an agent restart does not
withdraw a single route; tearing down the host namespace takes it down.

Graceful restart and dead hosts (bgp mode). Every session advertises graceful restart, so when BIRD dies (killed,
crashed, ``birdc graceful restart``) its peers keep its routes as stale while a watcher thread here notices (every
WATCH_INTERVAL) and starts it again with ``bird -R``, which keeps its kernel routes until the sessions are back.
But a host that dies with its network still up closes its sessions the same way, and its peers would keep its
routes for the whole restart time. So a peer node counts as dead, and is left out of the config (``birdc
configure`` then drops its routes at once), when it has no liveness lease AND none of its sessions with us is
Established. An Established session is never bounced: a host cut off from etcd whose BGP still works keeps its
routes, and while such a node is kept the watcher re-checks its sessions every RECHECK_INTERVAL seconds. A host
that vanishes silently is dropped by the hold timer as before: BIRD applies graceful restart to a closed
connection, not to a hold timer expiry. Route reflectors apply the same rule to their clients, so a dead client's
reflected routes leave everywhere.
"""

import ipaddress
import logging
import os
import threading
import time

from netplugin.errors import InvalidInput, NetpluginError
from netplugin.routing.bird import BirdConfigWriter, BirdError, BirdProcess, bgp_status
from netplugin.routing.bird_config import render_bird_config
from netplugin.routing.direct import DirectRoutes
from netplugin.routing.model import BgpNode, BgpPeer, BgpSettings, RoutingInput
from netplugin.service.endpoints import PhaseClock

LOG = logging.getLogger(__name__)

WATCH_INTERVAL = 0.5  # how often the watcher looks whether BIRD still runs (a read of /proc, no birdc)
RECHECK_INTERVAL = 2.0  # session re-check while a node without a lease is kept for its Established session
RESTART_BACKOFF = (1.0, 30.0)  # delay before retrying a BIRD that failed to start, doubling up to the maximum


def routing_input(view, host, established=frozenset()):
    """The RoutingInput for ``host`` from a ClusterView (pure; unit-tested).

    Other nodes without a liveness lease are left out unless named in ``established`` (they still have an
    Established session with us); see the module docstring.
    """
    me = view.nodes.get(host)
    if me is None or not me.address:
        raise InvalidInput(f"node {host} has no IPv4 address for BGP: start the agent with --node-address")
    nodes = tuple(
        BgpNode(
            name=n.name,
            address=n.address,
            address6=n.address6,
            as_number=n.as_number,
            route_reflector=n.route_reflector,
        )
        for n in sorted(view.nodes.values(), key=lambda n: n.name)
        if n.address and (n.name == host or n.name in view.alive or n.name in established)
    )
    peers = tuple(
        BgpPeer(name=p.name, address=p.address, as_number=p.as_number, node=p.node, password=p.password)
        for p in sorted(view.peers, key=lambda p: p.name)
        if p.node in (None, host)
    )
    settings = BgpSettings(mesh=view.config.mesh, default_as=view.config.as_number)
    node = next(n for n in nodes if n.name == host)
    return RoutingInput(
        node=node, nodes=nodes, peers=peers, settings=settings, blocks=tuple(sorted(view.blocks.get(host, [])))
    )


def lease_less_nodes(view, host):
    """Names of the other nodes with an address but no liveness lease: dead, or cut off from etcd."""
    return frozenset(n.name for n in view.nodes.values() if n.address and n.name != host and n.name not in view.alive)


def established_nodes(view, names, rows):
    """Which of the nodes ``names`` have at least one Established session among BGP status ``rows``."""
    up = {_canonical(r.peer_address) for r in rows if r.state == "Established"}
    return frozenset(
        n for n in names if {_canonical(a) for a in (view.nodes[n].address, view.nodes[n].address6) if a} & up
    )


def _canonical(address):
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def direct_routes(view, host):
    """{other node's address: [its blocks]} for direct mode: IPv4 blocks via the node's address, IPv6 blocks
    via its ``address6``. A block of a family the node has no address for cannot be routed directly and is left
    out (the rest still are: one dual-stack host without ``--node-address6`` must not stop every route)."""
    out = {}
    for name, blocks in view.blocks.items():
        node = view.nodes.get(name)
        if name == host or not node:
            continue
        for cidr in blocks:
            via = node.address6 if ":" in cidr else node.address
            if via:
                out.setdefault(via, []).append(cidr)
    return {addr: sorted(blocks) for addr, blocks in out.items()}


class RoutingReconciler:
    """bgp mode: ``bird`` (a BirdProcess) and ``writer`` (its BirdConfigWriter); direct mode: ``direct`` (the
    DirectRoutes writer). Built by the composition root (``for_mode``), which owns where BIRD runs."""

    def __init__(self, host, mode, bird=None, writer=None, direct=None, metrics=None):
        self.host = host
        self.mode = mode
        self.metrics = metrics  # netplugin.agent.metrics.Metrics, or None
        self.bird = bird
        self.writer = writer
        self.direct = direct
        self._started = False
        self._lock = threading.Lock()  # one BGP pass at a time: the sync thread's or the watcher's
        self._view = None  # the last view synced, for the watcher's passes
        self._kept = frozenset()  # nodes without a lease kept for their Established session
        self._dropped = frozenset()  # nodes without a lease left out of the config
        self._restart_at = 0.0  # monotonic time before which a BIRD that failed to start is not retried
        self._restart_delay = RESTART_BACKOFF[0]
        self._stop = threading.Event()
        self._watcher = None

    @classmethod
    def for_mode(cls, host, mode, run_dir, metrics=None):
        """The reconciler of ``mode`` (bgp or direct) for the namespace the agent runs in."""
        if mode == "bgp":
            bird = BirdProcess(os.path.join(run_dir, "bird"), netns=None)
            return cls(host, mode, bird=bird, writer=BirdConfigWriter(bird), metrics=metrics)
        if mode == "direct":
            return cls(host, mode, direct=DirectRoutes(netns=None), metrics=metrics)
        raise InvalidInput(f"no routing reconciler for routing mode {mode!r}")

    def sync(self, view, full=False):
        if self.mode == "bgp":
            with self._lock:
                self._view = view
                # Asking BIRD costs a birdc process: only at start-up and on full resyncs (a hung BIRD); in between
                # the watcher restarts a BIRD whose process is gone.
                self._sync_bgp(view, ask_bird=full or not self._started)
            self._watch()
        elif self.mode == "direct":
            changes = self.direct.reconcile(direct_routes(view, self.host))
            if changes:
                LOG.info("event=direct_routes.reconciled %s", changes)

    def report(self):
        """For the agent's health answer: in bgp mode whether BIRD runs (a problem once it should)."""
        if self.mode != "bgp":
            return {"mode": self.mode}
        running = self.bird.pid() is not None
        problems = (
            [] if running or not self._started else [f"BIRD is not running (control socket {self.bird.sock_path})"]
        )
        return {"mode": self.mode, "bird_running": running, "problems": problems}

    def close(self):
        """Stop the watcher; BIRD keeps running (see the module docstring)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def _sync_bgp(self, view, ask_bird):
        lease_less = lease_less_nodes(view, self.host)
        kept = self._established(view, lease_less)
        clock = PhaseClock(self._observe)
        try:
            text = render_bird_config(routing_input(view, self.host, kept))
            clock.mark("render")
            changed = self.writer.apply(text)
            if changed:
                clock.mark("reload")  # check with bird -p, rename, birdc configure
        except InvalidInput:
            if self._started:
                self._ensure_bird(ask_bird, False)  # a dead BIRD comes back with the last good config
            raise
        dropped = lease_less - kept
        if (kept, dropped) != (self._kept, self._dropped):
            LOG.info(
                "event=bgp.lease_less kept=%s dropped=%s",
                ",".join(sorted(kept)) or "-",
                ",".join(sorted(dropped)) or "-",
            )
        self._kept, self._dropped = kept, dropped
        self._ensure_bird(ask_bird, changed)

    def _observe(self, phase, seconds):
        if self.metrics is not None:
            self.metrics.bird_seconds.labels(phase).observe(seconds)

    def _ensure_bird(self, ask_bird, changed):
        dead = not self.bird.running() if ask_bird else self.bird.pid() is None
        if dead:
            self._start_bird()
        elif changed:
            LOG.info("event=bird.reconfigured")
        self._started = True

    def _established(self, view, lease_less):
        if not lease_less:
            return frozenset()
        try:
            rows = bgp_status(self.bird.sock_path, birdc_bin=self.bird.birdc_bin)
        except BirdError:
            if self.bird.pid() is None:
                return frozenset()  # no BIRD, no session: it starts with the dead left out
            return self._kept & lease_less  # BIRD did not answer: keep what we knew rather than bounce sessions
        return established_nodes(view, lease_less, rows)

    def _start_bird(self):
        if time.monotonic() < self._restart_at:
            return
        try:
            self.bird.start()  # in graceful restart recovery when a killed BIRD left its routes
        except BirdError:
            self._restart_at = time.monotonic() + self._restart_delay
            self._restart_delay = min(self._restart_delay * 2, RESTART_BACKOFF[1])
            raise
        self._restart_at, self._restart_delay = 0.0, RESTART_BACKOFF[0]
        LOG.info("event=bird.started pid=%s", self.bird.pid())

    # --- the watcher ------------------------------------------------------------------------------------------

    def _watch(self):
        if self._watcher is None and not self._stop.is_set():
            self._watcher = threading.Thread(target=self._watch_loop, name="bird-watch", daemon=True)
            self._watcher.start()

    def _watch_loop(self):
        """Between syncs: restart a BIRD whose process is gone, and re-check kept lease-less nodes' sessions.
        Each round is one pass over the last synced view under the same lock as ``sync``."""
        recheck_at = pause_until = 0.0
        pause = RESTART_BACKOFF[0]
        while not self._stop.wait(WATCH_INTERVAL):
            now = time.monotonic()
            bird_gone = self.bird.pid() is None and now >= self._restart_at
            recheck = bool(self._kept) and now >= recheck_at
            if not (bird_gone or recheck) or now < pause_until:
                continue
            if recheck:
                recheck_at = now + RECHECK_INTERVAL
            if bird_gone:
                LOG.warning("event=bird.gone restarting=true")
            try:
                with self._lock:
                    self._sync_bgp(self._view, ask_bird=False)
                pause = RESTART_BACKOFF[0]
                continue
            except NetpluginError as e:
                LOG.error("event=routing.watch_failed error=%s", e.msg)
            except Exception:  # the watcher must outlive a bug in one round; the sync loop still runs
                LOG.exception("event=routing.watch_failed")
            pause_until, pause = time.monotonic() + pause, min(pause * 2, RESTART_BACKOFF[1])
