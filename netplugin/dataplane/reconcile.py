"""Level-triggered repair of the host side: desired endpoints and owned blocks against one kernel snapshot.

Reads are whole-table dumps (links, our routes filtered by the kernel, addresses, neighbour-table
parameters), so the cost does not grow with one request per endpoint. Every repair across all endpoints, the
removal of stray veths and the blackhole changes then go to the kernel as one batch (plus one sysctl child
for IPv6 settings, only if any drifted). Writes happen only where the kernel differs, so a healthy endpoint is
never touched and a second run right after the first reports no changes. One endpoint failing (its namespace
is gone, its address is routed elsewhere) is reported under ``errors`` and does not stop the others.

Never destroy what cannot be accounted for: a veth of ours that no desired endpoint names is deleted only when
the caller says its endpoint is known to be deleted (``deletable``: a watch event deleted its record).
Any other is kept and listed under ``unaccounted``: a host renamed, a typo in ``--hostname`` or an etcd restored
from an old snapshot must not cut every container on the host off (Felix keeps unknown workload interfaces too).
"""

import logging
import time

from netplugin.errors import InvalidInput, NetpluginError
from netplugin.dataplane import host, sysctl
from netplugin.dataplane.model import host_ifname, parse_blocks, validate_spec
from netplugin.kernel.netlink import netlink
from netplugin.kernel.rtnl import Batch

log = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "created",
    "removed",
    "repaired",
    "routes_added",
    "routes_removed",
    "blackholes_added",
    "blackholes_removed",
    "errors",
    "unaccounted",
)
# Not changes: what a run found but did not (or could not) write.
NOT_CHANGES = ("errors", "unaccounted")


def empty_summary() -> dict:
    return {key: [] for key in SUMMARY_KEYS}


def changed(summary: dict) -> bool:
    """True when the run wrote anything (errors and kept unaccounted veths are not changes)."""
    return any(summary[key] for key in SUMMARY_KEYS if key not in NOT_CHANGES)


def desired_by_name(desired) -> dict:
    out = {}
    for spec in desired:
        addrs = validate_spec(spec)
        name = host_ifname(spec.endpoint_id)
        if name in out:
            raise InvalidInput(f"endpoint {spec.endpoint_id} is listed twice in the desired endpoints")
        out[name] = (spec, addrs)
    return out


class _Plan:
    """One batch; each group of its requests carries the summary lines it stands for, recorded only if every
    request of the group succeeded."""

    def __init__(self):
        self.batch = Batch()
        self.groups = []  # (ids of requests, summary key, texts)

    def mark(self, start: int, key: str, texts):
        """The requests appended since ``start`` stand for ``texts`` under ``key``."""
        ids = {id(r) for r in self.batch.requests[start:]}
        if ids and texts:
            self.groups.append((ids, key, list(texts)))

    def record(self, failures, summary):
        failed = {id(f.request) for f in failures}
        for ids, key, texts in self.groups:
            if not ids & failed:
                summary[key] += texts


def _plan_endpoint(plan, view, name, spec, addrs, v6_sysctls):
    msg = view.links[name]
    idx = msg["index"]
    what = f"{name} for endpoint {spec.endpoint_id}"
    ipv6 = any(a.version == 6 for a in addrs)
    start = len(plan.batch)
    changes, v6 = host.plan_link(
        plan.batch,
        msg,
        spec.mtu,
        ipv6,
        what,
        proxy_delay=view.proxy_delay.get(idx),
        addresses=view.addresses.get(idx, set()),
    )
    v6_sysctls.update(v6)
    plan.mark(start, "repaired", [c for c in changes if "net.ipv6." not in c])
    for addr in sorted(set(addrs) - view.routes.get(idx, set()), key=str):
        start = len(plan.batch)
        added, _ = host.plan_routes(plan.batch, idx, name, [addr], [], f"endpoint {spec.endpoint_id}")
        plan.mark(start, "routes_added", added)
    for addr in sorted(view.routes.get(idx, set()) - set(addrs), key=str):
        start = len(plan.batch)
        _, removed = host.plan_routes(plan.batch, idx, name, [], [addr], what)
        plan.mark(start, "routes_removed", removed)
    return [c for c in changes if "net.ipv6." in c]


def _plan_blackholes(plan, want, have):
    for net in sorted(want - have, key=str):
        start = len(plan.batch)
        added, _ = host.plan_blackholes(plan.batch, {net}, set())
        plan.mark(start, "blackholes_added", added)
    for net in sorted(have - want, key=str):
        start = len(plan.batch)
        _, removed = host.plan_blackholes(plan.batch, set(), {net})
        plan.mark(start, "blackholes_removed", removed)


def converge_blackholes(host_netns, blocks) -> dict:
    """Blackholes for exactly the owned blocks, and nothing else read or changed: all a change of the owned
    blocks needs (ADD and DEL keep their own endpoints right). The whole pass below reads every veth, route and
    address first: 100 to 130 ms at 200 endpoints, which the next ADD waited for (bench_cni's p99)."""
    summary = empty_summary()
    with netlink(host_netns) as hnl:
        plan = _Plan()
        _plan_blackholes(plan, set(parse_blocks(blocks)), host.read_blackholes(hnl))
        failures, _ = hnl.commit(plan.batch)
        summary["errors"] += [str(err) for err in host.failure_errors(hnl, failures)]
        plan.record(failures, summary)
    return summary


def reconcile(host_netns, desired, blocks, add_endpoint, deletable=frozenset()) -> dict:
    """Converge the host side; ``add_endpoint(spec, addrs)`` recreates an endpoint whose veth is missing.
    Veths not desired are deleted only if named in ``deletable`` (host ifnames), else kept as unaccounted."""
    started = time.monotonic()
    wanted = desired_by_name(desired)
    nets = set(parse_blocks(blocks))
    summary = empty_summary()
    with netlink(host_netns) as hnl:
        view = host.snapshot(hnl)
        plan = _Plan()
        for name in sorted(set(view.links) - set(wanted)):
            if name not in deletable:
                summary["unaccounted"].append(name)
                continue
            start = len(plan.batch)
            plan.batch.link_del(f"delete stray veth {name}", index=view.links[name]["index"])
            plan.mark(start, "removed", [name])
        v6_sysctls, v6_changes = {}, []
        missing = []
        for name, (spec, addrs) in sorted(wanted.items()):
            if name in view.links:
                v6_changes += _plan_endpoint(plan, view, name, spec, addrs, v6_sysctls)
            else:
                missing.append((spec, addrs))
        _plan_blackholes(plan, nets, view.blackholes)

        try:
            sysctl.write(host_netns, v6_sysctls, f"repair IPv6 settings of {len(v6_sysctls)} host veth keys")
            summary["repaired"] += v6_changes
        except NetpluginError as e:
            summary["errors"].append(str(e))
        failures, _ = hnl.commit(plan.batch)
        summary["errors"] += [str(err) for err in host.failure_errors(hnl, failures)]
        plan.record(failures, summary)

        for spec, addrs in missing:
            try:
                add_endpoint(spec, addrs)
                summary["created"].append(spec.endpoint_id)
            except NetpluginError as e:
                summary["errors"].append(f"endpoint {spec.endpoint_id}: {e}")
    log.info(
        "dataplane sync: %d endpoints, %d blocks, %s in %.1f ms",
        len(wanted),
        len(nets),
        ", ".join(f"{k} {len(v)}" for k, v in summary.items() if v) or "no changes",
        (time.monotonic() - started) * 1000,
    )
    return summary
