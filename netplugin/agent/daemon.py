"""The per-host agent: the one composition root (STYLE.md #8).

Threads:
- the CNI API (waitress on ``<run-dir>/agent.sock``) and, when configured, the Docker plugin socket;
- a watch on ``/netplugin/v1/`` whose events only mark the state dirty;
- the sync loop: a one-slot "dirty" flag plus a jittered periodic full resync; each pass takes one consistent
  ClusterView from the in-memory model the watch keeps current (view.ViewCache; a full resync reads etcd again)
  and hands it, with what changed since the previous pass, to every reconciler (dataplane, routing, policy);
- liveness: the lease beat every ttl/3, alone on its thread so nothing slow can make a live host look dead;
- election: the reclaimer leadership, its key on the liveness lease (the beat keeps both). The leader checks each
  beat without a request; the others campaign (one transaction) when the watch sees the key deleted, at start
  and every CAMPAIGN_TTLS lease TTLs (jittered) in case an event was missed;
- reclaim: as leader, reclamation of dead hosts every reclaim_interval, each pass bounded in time.
Every loop runs through netplugin.loops.run_forever: no exception ends one, and ``health`` reports a loop that
stopped making progress.

When the sync is *failing* or *stalled* (``sync_trouble``) the agent is unhealthy and ADD, which waits for a pass
that gives the new endpoint its policy, answers "try again later" (CNI code 11) instead of a success that leaves
the pod cut off. Failing: the last SYNC_FAILING_PASSES passes in a row could not read the view or their policy
reconciler raised. Stalled: a pass has been running longer than ``sync_deadline`` seconds, or none has finished for
``resync_interval + sync_deadline`` seconds. A pass that is merely slow (under the deadline, the previous ones
good) keeps ADD's behaviour of returning after ``policy_setup_timeout``, so heavy load never stops pods starting.

Why one module of about 550 lines: it is the composition root and the threads above share its state (the view,
the sync generation the front doors wait on, the loops' progress that health reads); each section below is one
of them, and the work itself lives in the collaborators it builds.
"""

import collections
import logging
import os
import random
import threading
import time

from netplugin import loops
from netplugin.agent.bpf_backend import log_selection, select_backend
from netplugin.agent.locked import LockedService
from netplugin.agent.metrics import Metrics, StateCollector, WatchLag
from netplugin.agent.collector import Collector
from netplugin.agent.rwlock import RWLock
from netplugin.agent.view import EVERYTHING, ViewCache
from netplugin.datastore import keys
from netplugin.datastore.client import Datastore
from netplugin.datastore.election import Election
from netplugin.datastore.models import Node
from netplugin.datastore.watch import PrefixWatch
from netplugin.errors import DatastoreUnavailable, NetpluginError, PoolExhausted
from netplugin.ipam.allocator import IPAM
from netplugin.ipam.reclaim import Reclaimer
from netplugin.nodes import Liveness, NodeRegistry, autodetect_address
from netplugin.service.endpoints import EndpointService

LOG = logging.getLogger(__name__)
WATCH_LAG = 0.25  # seconds a pass waits for the watch to deliver a revision it needs before reading etcd
SYNC_FAILING_PASSES = 3  # this many failed passes in a row make the sync "failing" (see the module docstring)
SYNC_BACKOFF = (0.5, 5.0)  # retry of a failed pass: soon, so that etcd coming back is noticed within seconds
START_BACKOFF = (0.5, 10.0)  # start-up attempts while etcd does not answer
CAMPAIGN_TTLS = 3  # lease TTLs between safety-net campaigns: a missed delete event delays a takeover by this much


class Agent:
    """Builds every part once and passes each its collaborators (STYLE.md #8); ``dataplane`` is the backend
    (netplugin.dataplane.backend.Backend), today's iptables one unless another is given."""

    def __init__(self, config, dataplane=None):
        self.config = config
        self.host = config.hostname
        self.ds = Datastore(config.etcd)
        self.ipam = IPAM(self.ds)
        if dataplane is None:
            dataplane, self.dataplane_name, self.dataplane_reason = select_backend(config)
        else:
            self.dataplane_name, self.dataplane_reason = getattr(dataplane, "name", "iptables"), "given by the caller"
        self.dataplane = dataplane
        self.host_lock = RWLock()
        self.collector = Collector(self.host_lock)  # full garbage collections when no ADD/DEL runs (collector.py)
        self.metrics = Metrics()  # this agent's registry and instruments, handed to the parts that observe
        self.metrics.registry.register(StateCollector(self))
        self.watch_lag = WatchLag(self.metrics.watch_lag_seconds)
        self.service = LockedService(
            EndpointService(self.ds, self.ipam, self.dataplane, self.host, config.mtu),
            self.host_lock,
            self.wait_for_sync,
            config.policy_setup_timeout,
            self._endpoint_revision,
            self.sync_trouble,
            self.metrics,
            install=self._install_policy,
            forget=self._forget_policy,
        )
        self.nodes = NodeRegistry(self.ds)
        self.liveness = Liveness(self.ds, self.host, config.liveness_ttl)
        self.election = Election(self.ds, "reclaimer", self.host, self.liveness)
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
        self.docker = None  # the Docker driver, when the agent serves Docker
        self.last_view = None
        self.sync_count = 0
        self.progress = loops.Progress()
        self.leading = False  # this agent holds the reclaimer leadership (the election thread keeps it)
        self._leader_gone = threading.Event()  # the watch saw the leader key deleted (or lost events): campaign
        self._next_campaign = 0.0  # monotonic time of the next safety-net campaign
        self._started_at = time.monotonic()
        self._next_full = 0.0
        self._passes = collections.deque(maxlen=SYNC_FAILING_PASSES)  # True per recent pass that went well
        self._pass_errors = {}  # part -> why, of the last pass
        self._pass_began = None  # monotonic start of the pass running now
        self._pass_ended = None  # monotonic end of the last pass
        self._logged = {}  # part -> the last unexpected error logged with its traceback
        self._retry_delay = SYNC_BACKOFF[0]  # before the next pass after one in which a part failed

    # --- life cycle -----------------------------------------------------------------------------------------------

    def start(self):
        """Build and start everything. While etcd does not answer, wait and retry (one line per attempt) rather
        than exit: at a cluster's start-up etcd is often busy or not there yet. Returns early if stopped."""
        os.makedirs(self.config.run_dir, mode=0o700, exist_ok=True)
        self._serve_ops()  # first: /readyz answers (false) while start-up waits for etcd
        self._until_etcd_answers("register node", self._register_node)
        if self._stop.is_set():
            return
        self.liveness.beat()
        log_selection(self.config.dataplane, self.dataplane_name, self.dataplane_reason)
        setup = self.dataplane.setup_host()
        LOG.info("event=host.setup %s", setup)
        self.reconcilers = self._build_reconcilers()
        revision = self._until_etcd_answers("first sync", lambda: self.sync(full=True))
        if self._stop.is_set():
            return
        self.watch = PrefixWatch(self.ds, keys.ROOT, revision, self._on_events, self._on_resync, name="watch")
        self.watch.start()
        self._serve_cni()
        if self.config.docker_socket:
            self._serve_docker()
        self._start_loops()
        LOG.info("event=agent.started host=%s run_dir=%s", self.host, self.config.run_dir)

    def _start_loops(self):
        """One thread per loop, so a slow one (a reclaim pass listing every handle) never delays another."""
        c = self.config
        self._next_full = time.monotonic() + c.resync_interval * random.uniform(0.8, 1.0)
        beat = self._beat_s()
        self._loop("sync", self._sync_round, 0, backoff=SYNC_BACKOFF)
        self._loop("liveness", self._beat, beat, backoff=(beat, beat))
        self._loop("election", self._campaign, 0, backoff=(beat, beat))
        self._loop("reclaim", self._reclaim_round, c.reclaim_interval)
        self.collector.start()
        self._loop("gc", self.collector.step, 1.0)

    def _until_etcd_answers(self, what, fn):
        """``fn()``, retried with a jittered back-off while etcd is unreachable; None once the agent is stopped.
        ``etcd_start_timeout`` (0: no limit) bounds the wait, after which the last error is raised."""
        limit = getattr(self.config, "etcd_start_timeout", 0) or 0
        began, delay, attempt = time.monotonic(), START_BACKOFF[0], 0
        while not self._stop.is_set():
            attempt += 1
            try:
                return fn()
            except DatastoreUnavailable as e:
                if limit and time.monotonic() - began >= limit:
                    raise
                wait = delay * random.uniform(0.5, 1.5)
                LOG.warning(
                    "event=agent.waiting_for_etcd step=%r attempt=%d error=%s retry_in_s=%.1f",
                    what,
                    attempt,
                    e.msg,
                    wait,
                )
                self._stop.wait(wait)
                delay = min(delay * 2, START_BACKOFF[1])
        return None

    def stop(self):
        self._stop.set()
        if self.docker is not None:
            self.docker.stop()
        self._dirty.set()
        self._leader_gone.set()
        for server in self._servers:
            server.close()
        if self.watch:
            self.watch.stop()
        for t in self._threads:
            t.join(timeout=10)
        self.collector.stop()
        for r in list(self.reconcilers) + [self.dataplane]:  # the dataplane: veth deletions DEL left running
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

    def _loop(self, name, body, interval, **kw):
        self._threads.append(loops.spawn(name, body, self._stop, interval, self.progress, log=LOG, **kw))

    # --- node -----------------------------------------------------------------------------------------------------

    def _register_node(self):
        c = self.config
        address = c.node_address or autodetect_address()
        node = Node(
            name=self.host,
            address=address,
            address6=c.node_address6,
            as_number=c.as_number,
            labels=dict(c.labels),
            address_autodetected=not c.node_address and bool(address),
        )
        self.nodes.register(node)
        LOG.info("event=node.registered host=%s address=%s", self.host, address)

    # --- API servers ----------------------------------------------------------------------------------------------

    def _serve_unix(self, app, path, name):
        from waitress.server import create_server

        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a socket left by a previous run
        server = create_server(
            app,
            unix_socket=path,
            unix_socket_perms="600",
            threads=8,
            channel_timeout=300,
            ident=None,
            clear_untrusted_proxy_headers=True,
        )
        self._servers.append(server)
        self._spawn(server.run, name)
        LOG.info("event=api.listening name=%s socket=%s", name, path)

    def _serve_cni(self):
        from netplugin.agent.cni_api import create_cni_app

        self._serve_unix(
            create_cni_app(self.service, self.status, self.health),
            os.path.join(self.config.run_dir, "agent.sock"),
            "cni-api",
        )

    def _serve_ops(self):
        """``/metrics``, ``/livez`` and ``/readyz`` on ``--metrics-listen`` (off without it)."""
        listen = getattr(self.config, "metrics_listen", None)
        if listen:
            from netplugin.agent.ops_http import OpsServer

            self._servers.append(OpsServer(listen, self.metrics.registry, self.health).start())

    def _serve_docker(self):
        from netplugin.docker.app import create_docker_app
        from netplugin.docker.driver import build_driver

        self.docker = build_driver(self.ds, self.ipam, self.service, self.host, self.config, progress=self.progress)
        self.docker.start()
        self._serve_unix(create_docker_app(self.docker), self.config.docker_socket, "docker-plugin")

    def status(self):
        """CNI STATUS: ready when etcd answers and some pool exists."""
        if not self.ipam.list_pools():
            raise PoolExhausted("no address pool is configured (netctl pool add CIDR)")

    # --- health ---------------------------------------------------------------------------------------------------

    def sync_trouble(self):
        """None while the sync works (even slowly), else why it is failing or stalled (module docstring)."""
        deadline = self.config.sync_deadline
        now = time.monotonic()
        with self._sync_cond:
            began, ended, passes, errors = self._pass_began, self._pass_ended, list(self._passes), self._pass_errors
        if began is not None and now - began > deadline:
            return f"a sync pass has been running for {now - began:.0f}s (deadline {deadline:.0f}s)"
        if len(passes) == SYNC_FAILING_PASSES and not any(passes):
            why = "; ".join(f"{part}: {e}" for part, e in sorted(errors.items()))
            return f"the last {SYNC_FAILING_PASSES} sync passes failed ({why})"
        quiet = now - (ended if ended is not None else self._started_at)
        if quiet > self.config.resync_interval + deadline:
            return f"no sync pass has finished for {quiet:.0f}s"
        return None

    def health(self):
        """The agent's health answer: ``ok`` is False, and ``problems`` says why, when the sync is failing or
        stalled, etcd has been unreachable for longer than the liveness TTL, a loop stopped making progress, or a
        reconciler's ``report()`` lists problems (BIRD down). Also every loop's age, the records skipped as
        undecodable, and every reconciler's ``report()``."""
        c = self.config
        problems = []
        trouble = self.sync_trouble()
        if trouble:
            problems.append(f"sync: {trouble}")
        dead = sorted(t.name for t in self._threads if not t.is_alive()) if not self._stop.is_set() else []
        if dead:  # /livez answers from this too
            problems.append(f"threads not running: {', '.join(dead)}")
        loops_now = self.progress.snapshot()
        limits = {
            "liveness": c.liveness_ttl,
            "election": 2 * c.liveness_ttl,
            "reclaim": 2 * c.reclaim_interval + self._reclaim_budget() + c.liveness_ttl,
        }
        for name, limit in limits.items():
            state = loops_now.get(name)
            if state and state["age_s"] > limit:
                what = "etcd unreachable" if name == "liveness" else f"{name} loop not making progress"
                problems.append(
                    f"{what}: no good {name} round for {state['age_s']:.0f}s (threshold {limit:.0f}s;"
                    f" last error: {state['error']})"
                )
        reports = {}
        for r in self.reconcilers:
            report = getattr(r, "report", None)
            if not callable(report):
                continue
            name = type(getattr(r, "inner", r)).__name__
            try:
                reports[name] = report()
            except Exception as e:  # noqa: BLE001 - a health answer must not fail on one part
                reports[name] = {"problems": [f"report failed: {loops.describe(e)}"]}
            problems += [f"{name}: {p}" for p in reports[name].get("problems") or ()]
        now = time.monotonic()
        with self._sync_cond:
            began, ended = self._pass_began, self._pass_ended
            sync = {
                "passes": self.sync_count,
                "recent_ok": list(self._passes),
                "last_errors": dict(self._pass_errors),
                "running_for_s": None if began is None else round(now - began, 3),
                "last_finished_s_ago": None if ended is None else round(now - ended, 3),
            }
        return {
            "ok": not problems,
            "host": self.host,
            "problems": problems,
            "loops": loops_now,
            "sync": sync,
            "threads_dead": dead,
            "metrics_listen": getattr(c, "metrics_listen", None),
            "dataplane": {"active": self.dataplane_name, "reason": self.dataplane_reason},
            "leader": self.leading,
            "skipped_records": self.cache.skipped.snapshot(),
            "skipped_total": self.cache.skipped.total,
            "watch": {"reconnects": getattr(self.watch, "reconnects", None)},
            "reports": reports,
        }

    # --- sync -----------------------------------------------------------------------------------------------------

    def _build_reconcilers(self):
        from netplugin.agent.reconcilers import build_reconcilers
        from netplugin.agent.routing import RoutingReconciler

        c = self.config
        routing = (
            RoutingReconciler.for_mode(self.host, c.routing, c.run_dir, self.metrics)
            if c.routing in ("bgp", "direct")
            else None
        )
        return build_reconcilers(c, self.dataplane, self.service, self.host_lock, routing, self.metrics)

    def _on_events(self, events):
        self.watch_lag.received(max(e.kv.mod_revision for e in events))
        if any(e.kind == "delete" and e.kv.key == self.election.key for e in events):
            self._leader_gone.set()
        if self.cache.add_events(events):
            self._dirty.set()

    def _on_resync(self):
        revision = self.ds.revision()
        self.metrics.fallbacks.labels("watch_resync").inc()
        self.cache.invalidate(revision)
        self._dirty.set()
        self._leader_gone.set()  # events were lost: the leader key's delete may be among them
        return revision

    def sync(self, full=False):
        """One pass: take the view, run every reconciler. Returns the revision of the view."""
        started = time.monotonic()
        with self._sync_cond:
            self._sync_started += 1
            generation = self._sync_started
            want, self._want_revision = self._want_revision, 0
            self._pass_began = started
        good, errors = False, {}
        try:
            revision, errors = self._sync_pass(started, full, want)
            good = not any(
                getattr(r, "covers_new_endpoints", False) and type(r).__name__ in errors for r in self.reconcilers
            )
            return revision
        except Exception as e:
            errors = {"view": loops.describe(e)}
            self.metrics.error("sync.view", e)
            raise
        finally:
            with self._sync_cond:
                self._sync_done = generation
                self._pass_began, self._pass_ended = None, time.monotonic()
                self._passes.append(good)
                self._pass_errors = errors
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

    def _policy_part(self):
        return next((r for r in self.reconcilers if callable(getattr(r, "install", None))), None)

    def _install_policy(self, ep, revision):
        """ADD's fast path (agent/policy.py install); False before the reconcilers exist."""
        part = self._policy_part()
        return part.install(ep, revision) if part else False

    def _forget_policy(self, ep_id):
        part = self._policy_part()
        if part:
            part.forget(ep_id)

    def _endpoint_revision(self, endpoint_id):
        """The store revision that recorded this host's endpoint, or None when it is not recorded."""
        kv = self.ds.get(keys.endpoint(self.host, endpoint_id))
        return kv.mod_revision if kv else None

    def _sync_pass(self, started, full, want=0):
        if want and not full:
            # The watch normally delivers our own write within milliseconds; reading everything is the fallback.
            if not self.cache.wait_seen(want, WATCH_LAG):
                self.metrics.fallbacks.labels("etcd_read").inc()
        clock = self.metrics.sync_clock()
        view, changes = self.cache.view(reload=full or want is None, min_revision=want or 0)
        clock.mark("read")
        errors = {}
        for r in self.reconcilers:
            part = type(r).__name__
            try:
                r.sync(view, full=full, changes=EVERYTHING if r in self._failed else changes)
                self._failed.discard(r)
                self._logged.pop(part, None)
            except Exception as e:  # noqa: BLE001 - one part failing never stops the others
                self.metrics.error(f"sync.{part}", e)
                self._failed.add(r)
                errors[part] = why = loops.describe(e)
                if isinstance(e, NetpluginError) or self._logged.get(part) == why:
                    LOG.error("event=sync.failed part=%s error=%s", part, why)
                else:  # a bug: its traceback once, then one line per repeat
                    LOG.exception("event=sync.failed part=%s error=%s", part, why)
                self._logged[part] = why
            finally:
                clock.mark(part)
        self.last_view = view
        self.sync_count += 1
        self.metrics.sync_seconds.labels(str(bool(full)).lower()).observe(time.monotonic() - started)
        self.watch_lag.applied(view.revision)
        LOG.info(
            "event=sync revision=%d full=%s took_ms=%.1f reload=%s changed=%d",
            view.revision,
            full,
            (time.monotonic() - started) * 1000,
            changes.everything,
            len(changes.keys),
        )
        return view.revision, errors

    def _sync_round(self):
        """One round of the sync loop: wait for a change (or the periodic full resync), then one pass."""
        self._dirty.wait(timeout=max(0.0, self._next_full - time.monotonic()))
        if self._stop.is_set():
            return 0
        full = time.monotonic() >= self._next_full
        self._dirty.clear()
        try:
            self.sync(full=full)
        except Exception:
            self._dirty.set()  # again after the loop's back-off
            raise
        if full:
            self._next_full = time.monotonic() + self.config.resync_interval * random.uniform(0.8, 1.0)
        if not self._pass_errors:
            self._retry_delay = SYNC_BACKOFF[0]
            return 0
        # A part failed (already logged): it gets the whole view again soon, with the same back-off as a failed
        # read, rather than at the next event or full resync.
        self._dirty.set()
        wait, self._retry_delay = (
            self._retry_delay * random.uniform(0.5, 1.5),
            min(self._retry_delay * 2, SYNC_BACKOFF[1]),
        )
        return wait

    # --- liveness, election and reclamation: one thread each --------------------------------------------------

    def _beat(self):
        self.liveness.renew()

    def _campaign(self):
        """One beat of the election loop; a transaction only when the leader key went (watch), when leading
        lapsed, or when the safety-net campaign is due."""
        now = time.monotonic()
        if (
            self._leader_gone.is_set()
            or now >= self._next_campaign
            or (self.leading and not self.election.still_leading())
        ):
            self._leader_gone.clear()
            self.election.campaign()
            ttl = self.config.liveness_ttl
            self._next_campaign = now + (
                self._beat_s() if self.election.error else CAMPAIGN_TTLS * ttl * random.uniform(0.8, 1.2)
            )
        leading = self.election.still_leading()
        if leading != self.leading:
            LOG.info("event=election.%s role=reclaimer host=%s", "won" if leading else "lost", self.host)
        self.leading = leading
        self._leader_gone.wait(self._beat_s())
        return 0

    def _beat_s(self):
        return max(0.2, self.config.liveness_ttl / 3.0)

    def _reclaim_budget(self):
        """Seconds one reclaim pass may take: it yields before its next release once past them."""
        return max(1.0, self.config.reclaim_interval / 2.0)

    def _reclaim_round(self):
        if not self.leading:
            return
        report = self.reclaimer.run_once(budget=self._reclaim_budget(), still_leader=self.election.still_leading)
        self.metrics.reclaimed.inc(sum(report["reclaimed"].values()))
        if report["reclaimed"] or report["waiting"] or report.get("truncated"):
            LOG.info("event=reclaim %s", report)
