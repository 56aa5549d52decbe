"""The agent's Prometheus instruments, one ``Metrics`` per agent (its own CollectorRegistry, no module globals:
a unit test may build several agents in one process).

Timings come from the mechanisms that already measure them, never from a second timer: ``PhaseClock``
(netplugin/service/endpoints.py: the phases of ADD, DEL and a sync pass, also logged as ``<phase>_ms``), the policy applier's ``last_timings`` and the
routing reconciler's render/reload clock. Gauges are computed when Prometheus scrapes (``StateCollector``), from
what the agent already holds (the last view, the last ruleset, ``birdc show protocols``, the IPAM blocks).

Watch lag: from the moment the watch thread handed the agent an event (``_on_events``) to the end of the first sync
pass whose view includes that event's revision. It covers the agent's queueing and work, not etcd's own commit
to delivery time (the etcd revision carries no wall-clock time).
"""

import ipaddress
import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from netplugin.service.endpoints import PhaseClock

LOG = logging.getLogger(__name__)
# 1 ms .. 30 s: an ADD's IPAM phase is a few ms, a full resync with thousands of CIDRs seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every instrument of one agent."""

    def __init__(self, registry=None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def hist(name, doc, labels=()):
            return Histogram(name, doc, labels, registry=r, buckets=BUCKETS)

        self.op_seconds = {
            "add": hist(
                "netplugin_cni_add_seconds", "Whole CNI ADD, policy wait included (Docker Join is not timed here)"
            ),
            "del": hist("netplugin_cni_del_seconds", "Whole DEL"),
        }
        self.op_phase_seconds = {
            "add": hist(
                "netplugin_cni_add_phase_seconds",
                "One phase of ADD (ipam, dataplane, record, policy_install or policy_wait)",
                ["phase"],
            ),
            "del": hist(
                "netplugin_cni_del_phase_seconds",
                "One phase of DEL (lookup, ipam: the release with the record, dataplane)",
                ["phase"],
            ),
        }
        self.sync_seconds = hist("netplugin_sync_seconds", "One sync pass", ["full"])
        self.sync_phase_seconds = hist(
            "netplugin_sync_phase_seconds",
            "One phase of a sync pass: read (the view) or a reconciler's name",
            ["phase"],
        )
        self.policy_sync_seconds = hist("netplugin_policy_sync_seconds", "Policy sync that wrote the kernel")
        self.policy_phase_seconds = hist(
            "netplugin_policy_sync_phase_seconds",
            "Phase of a policy sync: compile, read, ipset, ipset_destroy, iptables_restore_ipv4/_ipv6, revoke",
            ["phase"],
        )
        self.bird_seconds = hist(
            "netplugin_bird_seconds", "BIRD config render, and check+reload when it changed", ["phase"]
        )
        self.watch_lag_seconds = hist(
            "netplugin_watch_lag_seconds", "From the watch delivering an event to the end of the sync that applied it"
        )
        self.errors = Counter(
            "netplugin_errors_total", "Failures by where and kind (exception class)", ["where", "kind"], registry=r
        )
        self.reclaimed = Counter(
            "netplugin_reclaimed_addresses_total", "Addresses reclaimed from dead hosts", registry=r
        )
        self.fallbacks = Counter(
            "netplugin_fallbacks_total",
            "Slow paths taken: watch_resync (the watch lost history and the view is read"
            " again), etcd_read (the watch was late for a revision ADD waits for)",
            ["kind"],
            registry=r,
        )

    def clock(self, op):
        """A PhaseClock feeding ``op``'s phase histogram (op: add, del)."""
        phases, whole = self.op_phase_seconds[op], self.op_seconds[op]
        return PhaseClock(lambda phase, s: phases.labels(phase).observe(s), lambda s: whole.observe(s))

    def sync_clock(self):
        return PhaseClock(lambda phase, s: self.sync_phase_seconds.labels(phase).observe(s))

    def error(self, where, exc):
        self.errors.labels(where, type(exc).__name__).inc()

    def policy_applied(self, timings):
        """Timings of one policy apply ({phase: seconds}, the applier's ``last_timings`` plus compile)."""
        for phase, seconds in timings.items():
            self.policy_phase_seconds.labels(_phase_label(phase)).observe(seconds)
        self.policy_sync_seconds.observe(sum(timings.values()))


def _phase_label(phase):
    """'IPv4' -> 'iptables_restore_ipv4' (the applier labels a family's restore by the family's name)."""
    if phase.startswith("IPv"):
        return "iptables_restore_" + phase.lower().replace(" ", "_")
    return phase.replace("-", "_")


class WatchLag:
    """Receipt times of watch events not yet applied by a sync pass (bounded: the oldest are kept, so a stuck
    sync shows as lag rather than being forgotten)."""

    LIMIT = 256

    def __init__(self, histogram):
        self._histogram = histogram
        self._pending = []  # (revision, monotonic receipt time), ascending
        self._lock = threading.Lock()

    def received(self, revision):
        with self._lock:
            if len(self._pending) < self.LIMIT:
                self._pending.append((revision, time.monotonic()))

    def applied(self, revision):
        now = time.monotonic()
        with self._lock:
            done = [t for r, t in self._pending if r <= revision]
            self._pending = [(r, t) for r, t in self._pending if r > revision]
        for t in done:
            self._histogram.observe(now - t)


class StateCollector:
    """Gauges read from the agent when scraped; a part that cannot be read (etcd down, BIRD gone) is left out
    of that scrape rather than failing it."""

    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        return []  # computed at scrape time: no fixed description (and no collect() at registration)

    def collect(self):
        a = self.agent
        view = a.last_view
        if view is not None:
            eps = GaugeMetricFamily("netplugin_endpoints", "Endpoints in the last synced view", labels=["scope"])
            eps.add_metric(["local"], len(view.endpoints_of(a.host)))
            eps.add_metric(["cluster"], len(view.endpoints))
            yield eps
            yield GaugeMetricFamily("netplugin_policies", "Policies in the last synced view", len(view.policies))
        yield GaugeMetricFamily(
            "netplugin_skipped_records_current", "Records skipped as undecodable (now)", len(a.cache.skipped.snapshot())
        )
        yield _counter_family(
            "netplugin_skipped_records_total", "Records skipped as undecodable, ever", a.cache.skipped.total
        )
        revoked = getattr(getattr(a.dataplane, "flows", None), "revoked", None)
        if revoked is not None:
            yield _counter_family(
                "netplugin_flows_revoked_total",
                "Established connections deleted from conntrack because a policy change denies them",
                revoked,
            )
        members = _ipset_members(a)
        if members is not None:
            yield GaugeMetricFamily("netplugin_ipset_members", "Members of this host's policy ipsets", members)
        sessions = _bgp_sessions(a)
        if sessions is not None:
            g = GaugeMetricFamily("netplugin_bgp_sessions", "BIRD's BGP sessions by BGP state", labels=["state"])
            for state, n in sorted(sessions.items()):
                g.add_metric([state], n)
            yield g
        yield from _ipam(a)


def _counter_family(name, doc, value):
    return CounterMetricFamily(name[: -len("_total")], doc, value)


def _ipset_members(agent):
    for r in agent.reconcilers:
        ruleset = getattr(r, "_last", None)
        if ruleset is not None and hasattr(ruleset, "ipsets"):
            return sum(len(s.members) for s in ruleset.ipsets)
    return None


def _bgp_sessions(agent):
    from netplugin.routing.bird import BirdError, bgp_status

    for r in agent.reconcilers:
        bird = getattr(getattr(r, "inner", r), "bird", None)
        if bird is None:
            continue
        counts = {state: 0 for state in ("Established", "Active", "Connect", "Idle", "OpenSent", "OpenConfirm")}
        try:
            rows = bgp_status(bird.sock_path, birdc_bin=bird.birdc_bin)
        except BirdError:
            return None
        for row in rows:
            counts[row.state or "Down"] = counts.get(row.state or "Down", 0) + 1
        return counts
    return None


def _ipam(agent):
    """Blocks and free addresses per pool: one read of the blocks per scrape, skipped while the liveness beat
    fails (etcd unreachable), so a scrape never waits out etcd's timeout."""
    from netplugin.errors import NetpluginError

    if agent.progress.failures("liveness"):
        return
    try:
        rows = agent.ipam.usage()
        pools = agent.ipam.list_pools()
    except NetpluginError as e:
        LOG.debug("event=metrics.ipam_unreadable error=%s", e.msg)
        return
    blocks = GaugeMetricFamily("netplugin_ipam_blocks", "Blocks claimed from each pool", labels=["pool"])
    free = GaugeMetricFamily(
        "netplugin_ipam_free_addresses",
        "Addresses of each pool not allocated (in claimed blocks and unclaimed ones)",
        labels=["pool"],
    )
    for pool in pools:
        mine = [row for row in rows if row["pool"] == pool.cidr]
        blocks.add_metric([pool.cidr], len(mine))
        free.add_metric([pool.cidr], _size(pool.cidr) - sum(row["used"] for row in mine))
    yield blocks
    yield free


def _size(cidr):
    return ipaddress.ip_network(cidr, strict=False).num_addresses
