"""The per-host agent: the one composition root (STYLE.md #8).

Threads:
- the CNI API (waitress on ``<run-dir>/agent.sock``) and, when configured, the Docker plugin socket;
- a watch on ``/netplugin/v1/`` whose events only mark the state dirty;
- the sync loop: a one-slot "dirty" flag plus a jittered periodic full resync; each pass takes one consistent
  ClusterView from the in-memory model the watch keeps current (view.ViewCache; a full resync reads etcd again)
  and hands it, with what changed since the previous pass, to every reconciler (dataplane, routing, policy);
- the heartbeat loop: liveness lease, leader election, and (as leader) reclamation of dead hosts.
"""
import logging
import os
import random
import threading
import time

from netplugin.agent.rwlock import RWLock
from netplugin.agent.view import EVERYTHING, ViewCache
from netplugin.datastore import keys
from netplugin.datastore.client import Datastore
from netplugin.datastore.election import Election
from netplugin.datastore.models import Node
from netplugin.datastore.watch import PrefixWatch
from netplugin.errors import NetpluginError, PoolExhausted
from netplugin.ipam.allocator import IPAM
from netplugin.ipam.reclaim import Reclaimer
from netplugin.nodes import Liveness, NodeRegistry, autodetect_address
from netplugin.service.endpoints import EndpointService

LOG = logging.getLogger(__name__)
WATCH_LAG = 0.25  # seconds a pass waits for the watch to deliver a revision it needs before reading etcd


class LockedService:
    """The EndpointService as the front doors see it inside the agent.

    ADD/DEL hold the shared side of the host lock (see rwlock.py). After ADD, the new interface is only useful
    once this host's policy knows it (our chains drop traffic of unknown ``np*`` interfaces), so ADD waits, up to
    ``policy_wait`` seconds, for a sync pass whose view holds the endpoint's record (``revision(endpoint_id)``: the
    store revision that wrote it). Concurrent ADDs share one pass. 0 turns the wait off (Calico's default, where a
    new pod can lose its first packets).
    """

    def __init__(self, service, lock, wait_for_sync=None, policy_wait=0.0, revision=None):
        self._service = service
        self._lock = lock
        self._wait_for_sync = wait_for_sync
        self._policy_wait = policy_wait
        self._revision = revision

    def __getattr__(self, name):
        return getattr(self._service, name)

    def shared(self):
        """The shared side of the host lock, for front doors that wire endpoints themselves (Docker Join)."""
        return self._lock.shared()

    def policy_ready(self, what):
        """Wait (bounded) until policy covers an endpoint just recorded; never fails the request."""
        if self._wait_for_sync and self._policy_wait > 0:
            revision = None  # unknown: the pass reads everything from etcd
            if self._revision:
                try:
                    revision = self._revision(what)
                except NetpluginError as e:
                    LOG.warning("event=policy.wait_revision endpoint=%s error=%s", what, e.msg)
            if not self._wait_for_sync(self._policy_wait, revision):
                LOG.warning("event=policy.wait_timeout endpoint=%s after_s=%s", what, self._policy_wait)

    def add(self, req):
        with self._lock.shared():
            ep = self._service.add(req)
        self.policy_ready(ep.id)
        return ep

    def delete(self, *args, **kw):
        with self._lock.shared():
            return self._service.delete(*args, **kw)


class Agent:
    def __init__(self, config, dataplane=None):
        from netplugin.dataplane import Dataplane
        self.config = config
        self.host = config.hostname
        self.ds = Datastore(config.etcd)
        self.ipam = IPAM(self.ds)
        self.dataplane = dataplane or Dataplane(mtu=config.mtu)
        self.host_lock = RWLock()
        self.service = LockedService(EndpointService(self.ds, self.ipam, self.dataplane, self.host, config.mtu),
                                     self.host_lock, self.wait_for_sync, config.policy_setup_timeout,
                                     self._endpoint_revision)
        self.nodes = NodeRegistry(self.ds)
        self.liveness = Liveness(self.ds, self.host, config.liveness_ttl)
        self.election = Election(self.ds, "reclaimer", self.host, config.liveness_ttl)
        self.reclaimer = Reclaimer(self.ds, self.ipam, config.reclaim_grace)
        self.reconcilers = []  # objects with .sync(view, full, changes); the dataplane's is built in start()
        self.cache = ViewCache(self.ds)
        self._failed = set()  # reconcilers whose last sync failed: they get the whole view as changed next time
        self._want_revision = 0  # a view at least this new was asked for (wait_for_sync); None: read etcd
        self._dirty = threading.Event()
        self._sync_cond = threading.Condition()
        self._sync_started = 0  # generation of the last pass that began
        self._sync_done = 0  # generation of the last pass that finished
        self._stop = threading.Event()
        self._threads = []
        self._servers = []
        self.watch = None
        self.last_view = None
        self.sync_count = 0

    # --- life cycle -----------------------------------------------------------------------------------------------

    def start(self):
        os.makedirs(self.config.run_dir, mode=0o700, exist_ok=True)
        self._register_node()
        self.liveness.beat()
        setup = self.dataplane.setup_host()
        LOG.info("event=host.setup %s", setup)
        self.reconcilers = self._build_reconcilers()
        revision = self.sync(full=True)
        self.watch = PrefixWatch(self.ds, keys.ROOT, revision, self._on_events, self._on_resync, name="watch")
        self.watch.start()
        self._serve_cni()
        if self.config.docker_socket:
            self._serve_docker()
        self._spawn(self._sync_loop, "sync")
        self._spawn(self._heartbeat_loop, "heartbeat")
        LOG.info("event=agent.started host=%s run_dir=%s", self.host, self.config.run_dir)

    def stop(self):
        self._stop.set()
        self._dirty.set()
        for server in self._servers:
            server.close()
        if self.watch:
            self.watch.stop()
        for t in self._threads:
            t.join(timeout=10)
        for r in self.reconcilers:
            close = getattr(r, "close", None)
            if close:
                close()
        LOG.info("event=agent.stopped host=%s", self.host)

    def run_forever(self):
        while not self._stop.wait(1.0):
            pass

    def _spawn(self, fn, name):
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # --- node -----------------------------------------------------------------------------------------------------

    def _register_node(self):
        c = self.config
        address = c.node_address or autodetect_address()
        node = Node(name=self.host, address=address, address6=c.node_address6, as_number=c.as_number,
                    labels=dict(c.labels), address_autodetected=not c.node_address and bool(address))
        self.nodes.register(node)
        LOG.info("event=node.registered host=%s address=%s", self.host, address)

    # --- API servers ----------------------------------------------------------------------------------------------

    def _serve_unix(self, app, path, name):
        from waitress.server import create_server
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a socket left by a previous run
        server = create_server(app, unix_socket=path, unix_socket_perms="600", threads=8, channel_timeout=300,
                               ident=None, clear_untrusted_proxy_headers=True)
        self._servers.append(server)
        self._spawn(server.run, name)
        LOG.info("event=api.listening name=%s socket=%s", name, path)

    def _serve_cni(self):
        from netplugin.agent.cni_api import create_cni_app
        self._serve_unix(create_cni_app(self.service, self.status), os.path.join(self.config.run_dir, "agent.sock"),
                         "cni-api")

    def _serve_docker(self):
        from netplugin.docker.app import create_docker_app
        from netplugin.docker.driver import DockerDriver
        driver = DockerDriver(self.ds, self.ipam, self.service, self.dataplane, self.host, self.config)
        self._serve_unix(create_docker_app(driver), self.config.docker_socket, "docker-plugin")

    def status(self):
        """CNI STATUS: ready when etcd answers and some pool exists."""
        if not self.ipam.list_pools():
            raise PoolExhausted("no address pool is configured (netctl pool add CIDR)")

    # --- sync -----------------------------------------------------------------------------------------------------

    def _build_reconcilers(self):
        from netplugin.agent.reconcilers import build_reconcilers
        return build_reconcilers(self)

    def _on_events(self, events):
        if self.cache.add_events(events):
            self._dirty.set()

    def _on_resync(self):
        revision = self.ds.revision()
        self.cache.invalidate(revision)
        self._dirty.set()
        return revision

    def sync(self, full=False):
        """One pass: take the view, run every reconciler. Returns the revision of the view."""
        started = time.monotonic()
        with self._sync_cond:
            self._sync_started += 1
            generation = self._sync_started
            want, self._want_revision = self._want_revision, 0
        try:
            return self._sync_pass(started, full, want)
        finally:
            with self._sync_cond:
                self._sync_done = generation
                self._sync_cond.notify_all()

    def wait_for_sync(self, timeout, revision=None):
        """Ask for a sync whose view holds ``revision`` (None: one read from etcd after this call) and wait until
        it has finished; False on timeout."""
        with self._sync_cond:
            target = self._sync_started + 1
            if revision is None or self._want_revision is None:
                self._want_revision = None
            else:
                self._want_revision = max(self._want_revision, revision)
            self._dirty.set()
            return self._sync_cond.wait_for(lambda: self._sync_done >= target or self._stop.is_set(), timeout)

    def _endpoint_revision(self, endpoint_id):
        """The store revision that recorded this host's endpoint, or None when it is not recorded."""
        kv = self.ds.get(keys.endpoint(self.host, endpoint_id))
        return kv.mod_revision if kv else None

    def _sync_pass(self, started, full, want=0):
        if want and not full:
            # The watch normally delivers our own write within milliseconds; reading everything is the fallback.
            self.cache.wait_seen(want, WATCH_LAG)
        view, changes = self.cache.view(reload=full or want is None, min_revision=want or 0)
        for r in self.reconcilers:
            try:
                r.sync(view, full=full, changes=EVERYTHING if r in self._failed else changes)
                self._failed.discard(r)
            except NetpluginError as e:
                self._failed.add(r)
                LOG.error("event=sync.failed part=%s error=%s", type(r).__name__, e.msg)
        self.last_view = view
        self.sync_count += 1
        LOG.info("event=sync revision=%d full=%s took_ms=%.1f reload=%s changed=%d", view.revision, full,
                 (time.monotonic() - started) * 1000, changes.everything, len(changes.keys))
        return view.revision

    def _sync_loop(self):
        period = self.config.resync_interval
        next_full = time.monotonic() + period * random.uniform(0.8, 1.0)
        while not self._stop.is_set():
            self._dirty.wait(timeout=max(0.0, next_full - time.monotonic()))
            if self._stop.is_set():
                return
            full = time.monotonic() >= next_full
            self._dirty.clear()
            try:
                self.sync(full=full)
            except NetpluginError as e:
                LOG.warning("event=sync.failed error=%s", e.msg)
                self._stop.wait(1.0)
                self._dirty.set()
            if full:
                next_full = time.monotonic() + period * random.uniform(0.8, 1.0)

    # --- heartbeat and reclamation --------------------------------------------------------------------------------

    def _heartbeat_loop(self):
        beat = max(0.2, self.config.liveness_ttl / 3.0)
        next_reclaim = time.monotonic()
        while not self._stop.wait(beat):
            self.liveness.beat()
            if time.monotonic() < next_reclaim:
                continue
            next_reclaim = time.monotonic() + self.config.reclaim_interval
            if self.election.campaign():
                try:
                    report = self.reclaimer.run_once()
                    if report["reclaimed"] or report["waiting"]:
                        LOG.info("event=reclaim %s", report)
                except NetpluginError as e:
                    LOG.warning("event=reclaim.failed error=%s", e.msg)
