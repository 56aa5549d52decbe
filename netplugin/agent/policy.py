"""Policy reconciler: compile the policies that touch this host's endpoints and make the kernel hold them.

Compilation is incremental (policy.compiler.RulesetCompiler): each pass hands the compiler only the endpoint
records that changed since the last (records are told apart by identity: the view model keeps a record's object
until its key changes), so another host's endpoint event costs moving it in or out of the address sets it
matches, not compiling every endpoint of the cluster, and a local one assembling this host's part again from
cached pieces (measured with scripts/bench_policy_compile.py). The kernel is only written when the compiled
ruleset changed (unchanged parts are the same objects, so comparing is cheap), or on a full resync, where the applier reads our chains and sets back and repairs any drift (someone flushing a chain).
Event-driven syncs plan against what the applier last wrote instead of reading the kernel back: that read is
most of a small change's cost, and drift is the full resync's job.

ADD's fast path (``install``): the endpoint just recorded is compiled in with the last view this reconciler
synced, and applied on the ADD thread, without waiting for the record to come back through the watch. The
applier writes only what differs: for an endpoint whose policy shape exists already (policy/compiler.py), just
set members (its addresses, its "address,veth" dispatch entry), by netlink and without a process, under 1 ms;
a new shape adds its chains and dispatch rules too. Every other chain is left alone. Until a view holds the record, each pass keeps compiling it in (``_fresh``), so the
watch-driven pass that brings it finds the ruleset unchanged and runs no process (``stats["applies"]``).
Concurrent ADDs share one apply: whoever holds the lock installs every endpoint waiting.
"""

import logging
import threading
import time

from netplugin.agent.view import EVERYTHING
from netplugin.datastore import keys
from netplugin.errors import InvalidInput
from policy.compiler import RulesetCompiler
from policy.k8s import policy_labels
from policy.model import Endpoint, Policy
from policy.selector import parse_selector
from policy.validation import PolicyValidationError, Problems

LOG = logging.getLogger(__name__)


def policy_endpoint(ep):
    return Endpoint(
        id=ep.id,
        host_ifname=ep.host_ifname,
        addresses=[a.split("/")[0] for a in ep.addresses],
        network=ep.network,
        labels=policy_labels(ep.labels),
    )


class PolicyReconciler:
    covers_new_endpoints = True  # ADD waits for this part: while it fails, a new pod would be cut off

    def __init__(self, host, dataplane, metrics=None):
        self.host = host
        self.metrics = metrics  # netplugin.agent.metrics.Metrics, or None
        self.dataplane = dataplane  # a netplugin.dataplane.backend.Backend: apply_policy
        self._last = None
        self._parsed = {}  # name -> (stored document, its Selector, Policy or None if not parsed yet)
        self._start_over()
        self._invalid = {}  # name -> (stored document, why) of selected policies that do not validate
        self._lock = threading.Lock()  # one writer of the ruleset: the sync thread or an ADD's install
        self._view = None  # the last view a pass compiled (install compiles against it)
        self._fresh = {}  # endpoint id -> (record, store revision of its put) not in a view yet
        self._fresh_lock = threading.Lock()
        self._compiling = {}  # the fresh records the last _ruleset compiled in
        self._covered = {}  # endpoint id -> the fresh record the kernel's ruleset was compiled with
        self.stats = {"applies": 0, "unchanged": 0, "installs": 0, "installed_by_other": 0}

    def _start_over(self):
        """Forget what the compiler was told: the next pass hands it the whole view."""
        self._compiler = RulesetCompiler()  # holds what the last pass compiled; _ruleset tells it what changed
        self._held = {}  # (host, endpoint id) -> (record, its policy.model.Endpoint) the compiler holds
        self._local = {}  # (host, endpoint id) -> policy.model.Endpoint, of this host's held ones
        self._seen = []  # the endpoint records of the last view compiled
        self._in_view = {}  # (host, endpoint id) -> its record in that view
        self._view_compiled = None
        self._fresh_keys = set()  # the keys of the installed records the last pass compiled in
        self._policy_docs = None  # the stored policies the compiler's policies were parsed from

    def _policies(self, view, local):
        """The policies that select a local endpoint, parsed and validated. Only those shape this host's rules,
        so the others are not parsed past their selector: validating a 10,000-CIDR policy costs every agent
        ~0.1 s of CPU, and only the hosts it selects need it. Parsed policies are kept until their record
        changes."""
        out, parsed, invalid = [], {}, {}
        for doc in view.policies:
            name = _name_of(doc)
            known = self._parsed.get(name)
            if known is None or known[0] != doc:
                known = (doc, _selector_of(doc), None)
            selector = known[1]
            if selector is not None and not any(selector.matches(ep.labels) for ep in local):
                parsed[name] = known
                continue
            policy = known[2]
            if policy is None:
                try:
                    policy = Policy.from_dict(doc)
                except Exception as e:  # noqa: BLE001 - one bad policy must never stop every other
                    # netctl validates before storing; a record that fails here was written by hand or a newer
                    # version. Skip it loudly (once per stored version) rather than dropping every policy.
                    why = str(e) if isinstance(e, (PolicyValidationError, InvalidInput)) else f"{type(e).__name__}: {e}"
                    if self._invalid.get(name, (None,))[0] != doc:
                        LOG.error("event=policy.invalid name=%s error=%s", name, why)
                    invalid[name] = (doc, why)
                    continue
            parsed[name] = (doc, selector, policy)
            out.append(policy)
        self._parsed = parsed
        self._invalid = invalid
        return out

    def report(self):
        """For the agent's health answer: stored policies this host skipped because they do not validate."""
        return {
            "invalid_policies": {name: why for name, (_, why) in sorted(self._invalid.items())},
            "stats": dict(self.stats),
            "revision": self._view.revision if self._view else 0,
        }

    def install(self, ep, revision):
        """ADD's fast path: make the kernel hold policy for ``ep`` (recorded at store ``revision``) now, from the
        last synced view plus every endpoint waiting. False when there is no view yet (the caller waits for a
        sync instead). Raises what the applier raises."""
        with self._fresh_lock:
            self._fresh[ep.id] = (ep, revision)
        with self._lock:
            if self._view is None:
                return False
            with self._fresh_lock:
                waiting = self._fresh.get(ep.id)
            if waiting is None or waiting[0] is not ep:
                # A pass whose view holds the record took it over (or DEL forgot it, or a retry replaced it).
                self.stats["installed_by_other"] += 1
                return self._last is not None
            if self._covered.get(ep.id) is ep:
                self.stats["installed_by_other"] += 1
                return True
            self.stats["installs"] += 1
            self._sync_locked(self._view, False, EVERYTHING)
            return True

    def forget(self, ep_id):
        """DEL: an endpoint installed by ``install`` is not compiled in any more (its record is gone)."""
        with self._fresh_lock:
            self._fresh.pop(ep_id, None)

    def _with_fresh(self, view):
        """The installed records a view does not hold yet, by (host, id); drops those a view now has (or that a
        view at or past their revision lacks: deleted meanwhile)."""
        with self._fresh_lock:
            for ep_id, (ep, revision) in list(self._fresh.items()):
                if (ep.host, ep.id) in self._in_view or view.revision >= revision:
                    del self._fresh[ep_id]
            self._compiling = {ep.id: ep for ep, _ in self._fresh.values()}
        return {(ep.host, ep.id): ep for ep in self._compiling.values()}

    def _ruleset(self, view):
        """The compiled ruleset of the view (plus the installed records it lacks). Only what changed since the
        last pass is handed to the compiler (policy.compiler.RulesetCompiler): records are told apart by
        identity, since the view model hands back the same record object until its key changes, so a pass costs
        O(records changed) besides one scan of identities, and returns the same Ruleset when nothing changed.
        InvalidInput (a record or policy that cannot be compiled) leaves the compiler consistent: it is raised
        again each pass while its cause is there. After any other failure the next pass starts over."""
        try:
            return self._compile(view)
        except InvalidInput:
            raise
        except Exception:
            self._start_over()
            raise

    def _compile(self, view):
        touched = set(self._fresh_keys)
        if view is not self._view_compiled:
            for e, holds in _changed_records(self._seen, view.endpoints):
                key = (e.host, e.id)
                touched.add(key)
                if holds:
                    self._in_view[key] = e
                else:  # (the gone come first: a key in both stays, with its new record)
                    self._in_view.pop(key, None)
            self._seen, self._view_compiled = list(view.endpoints), view
        fresh = self._with_fresh(view)
        touched.update(fresh)
        self._fresh_keys = set(fresh)
        local_changed = False
        for key in sorted(touched):
            record = self._in_view.get(key)
            record = fresh.get(key) if record is None else record
            held = self._held.get(key)
            if held is not None and held[0] is record:
                continue
            local = key[0] == self.host
            local_changed |= local
            if record is None:
                self._held.pop(key, None)
                self._local.pop(key, None)
                self._compiler.remove(key)
                continue
            ep = policy_endpoint(record)  # each record converted once, only the ones that changed
            self._held[key] = (record, ep)
            if local:
                self._local[key] = ep
            self._compiler.put(key, ep, local=local)
        docs = view.policies
        if local_changed or not _same(docs, self._policy_docs):
            self._policy_docs = list(docs)
            self._compiler.set_policies(self._policies(view, list(self._local.values())))
        return self._compiler.ruleset()

    def sync(self, view, full=False, changes=EVERYTHING):
        if not full and not changes.touches(keys.ENDPOINTS, keys.POLICIES):
            return  # the ruleset depends on endpoints and policies only
        with self._lock:
            self._sync_locked(view, full, changes)

    def _sync_locked(self, view, full, changes):
        started = time.monotonic()
        ruleset = self._ruleset(view)
        self._view = view
        compiled = time.monotonic() - started
        if not full and ruleset == self._last:
            self._covered = self._compiling
            self.stats["unchanged"] += 1
            LOG.debug("event=policy.unchanged revision=%d", view.revision)
            return
        self._last = None  # unknown until this apply went through
        diffs, timings = self.dataplane.apply_policy(ruleset, full=full)
        self.stats["applies"] += 1
        self._last, self._covered = ruleset, self._compiling
        timings = {"compile": compiled, **timings}
        if self.metrics is not None:
            self.metrics.policy_applied(timings)
        if diffs:
            LOG.info(
                "event=policy.applied changes=%d timings=%s",
                len(diffs),
                {k: round(v * 1000, 1) for k, v in timings.items()},
            )


def _changed_records(old, new):
    """(record, True) for each record of list ``new`` that ``old`` lacks, (record, False) for each of ``old``
    that ``new`` lacks, except that records in the same place at both ends count as kept when equal: the view
    model builds its lists in key order with the same objects for unchanged keys, so one change leaves a long
    common head and tail, found by comparing slices (in C, equal at once for the same objects)."""
    head = _common(old, new, lambda a, k: a[:k])
    rest = min(len(old), len(new)) - head
    tail = _common(old, new, lambda a, k: a[len(a) - k :], rest)
    gone = [(e, False) for e in old[head : len(old) - tail]]
    return gone + [(e, True) for e in new[head : len(new) - tail]]


def _common(a, b, part, most=None):
    """The longest k <= ``most`` with part(a, k) == part(b, k), by bisection."""
    lo, hi = 0, min(len(a), len(b)) if most is None else most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if part(a, mid) == part(b, mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _same(a, b):
    """The same objects in the same order (the view model keeps a record's object until its key changes)."""
    return b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _name_of(doc):
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    return meta.get("name") if isinstance(meta, dict) else None


def _selector_of(doc):
    """A stored policy's selector, or None when it is not readable (then the full parse reports why)."""
    spec = doc.get("spec") if isinstance(doc, dict) else None
    if not isinstance(spec, dict) or "selector" not in spec:
        return None
    problems = Problems()
    try:
        selector = parse_selector(spec["selector"], ("spec", "selector"), problems)
    except Exception:  # noqa: BLE001 - an unreadable selector: the full parse says why
        return None
    return None if problems.items else selector
