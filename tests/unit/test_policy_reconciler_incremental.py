"""The policy reconciler, handing its compiler only what changed between views, ends every pass holding what
compile_ruleset gives from scratch for the view's endpoints (plus the installed records a view lacks); ADD's install,
for the last view a pass compiled (a view the compiler refuses is not synced: neither its records nor its policies).

Random sequences: endpoint records put (new objects: changed, or equal copies), deleted, ADD's ``install`` of a
record no view holds yet and DEL's ``forget``, and stored policies replaced; views mostly in key order (as the
view model builds them), now and then shuffled.
"""

import random

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netplugin.agent import policy as agent_policy
from netplugin.agent.view import ClusterView
from netplugin.datastore.models import Endpoint
from netplugin.errors import InvalidInput
from policy.compiler import compile_ruleset
from policy.model import Policy
from tests.unit.test_view_policy_gate import _Recording

HOSTS = ("h1", "h2")  # the reconciler runs on h1
SELECTORS = [{}, {"matchLabels": {"app": "web"}}, {"matchLabels": {"app": "db"}}]


def _doc(name, selector, peer):
    rule = {"action": "allow", "from": [{"selector": {"matchLabels": {"app": peer}}}, {"network": "red"}]}
    spec = {"selector": selector, "types": ["Ingress", "Egress"], "ingress": [rule], "egress": [{"action": "allow"}]}
    return {"apiVersion": "netplugin/v1", "kind": "Policy", "metadata": {"name": name}, "spec": spec}


DOCS = [_doc(f"p{i}", SELECTORS[i % 3], ("web", "db")[i % 2]) for i in range(4)]


def _record(n, host, app, network="blue", addresses=("10.0.0.1/32",)):
    return Endpoint(
        id=f"ep{n}",
        host=host,
        network=network,
        container_id=f"c{n}",
        netns="/x",
        ifname="eth0",
        host_ifname=f"np{n:011x}",
        addresses=list(addresses),
        labels={"app": app},
    )


@st.composite
def record(draw):
    n = draw(st.integers(1, 6))
    return _record(
        n,
        draw(st.sampled_from(HOSTS)),
        draw(st.sampled_from(["web", "db", "x"])),
        draw(st.sampled_from(["blue", "red"])),
        [f"10.0.0.{draw(st.integers(1, 4))}/32"] + draw(st.sampled_from([[], [f"fd00::{n}/128"]])),
    )


step = st.one_of(
    st.tuples(st.just("put"), record()),
    st.tuples(st.just("copy"), st.integers(0, 20)),
    st.tuples(st.just("delete"), st.integers(0, 20)),
    st.tuples(st.just("install"), record()),
    st.tuples(st.just("forget"), st.integers(1, 6)),
    st.tuples(st.just("policies"), st.lists(st.sampled_from(range(len(DOCS))), max_size=3, unique=True)),
    st.tuples(st.just("shuffle"), st.integers(0, 1000)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=20))
# Found by hypothesis: views refused (ep1 on two hosts with different labels), one with other policies, then an
# install, which compiles with the last view synced, policies included.
@example(
    [
        ("put", _record(1, "h1", "web")),
        ("policies", [0]),
        ("put", _record(1, "h2", "db")),
        ("policies", []),
        ("install", _record(2, "h1", "web")),
    ]
)
def test_every_pass_holds_what_compiling_the_whole_view_gives(steps):
    r = agent_policy.PolicyReconciler("h1", _Recording())
    records, docs, fresh = {}, [], {}  # (host, id) -> record; stored policies; id -> (record, revision)
    revision = 1
    r.sync(ClusterView(revision=revision))
    # The records, revision and policies of the last view a pass compiled: ADD installs on it.
    synced = ({}, revision, [])
    for kind, arg in steps:
        order = sorted(records)
        if kind == "put":
            records[arg.host, arg.id] = arg
        elif kind == "copy" and records:
            key = order[arg % len(order)]
            records[key] = Endpoint.from_dict(records[key].to_dict())  # an equal record, another object
        elif kind == "delete" and records:
            del records[order[arg % len(order)]]
        elif kind == "install":
            ep = Endpoint.from_dict({**arg.to_dict(), "host": "h1"})
            if ("h1", ep.id) not in records:
                fresh[ep.id] = (ep, revision + 1)
                synced_records, synced_revision, synced_docs = synced
                install = lambda: r.install(ep, revision + 1)  # noqa: E731 - called at once, in _check
                fresh, _ = _check(r, install, synced_records, synced_revision, fresh, synced_docs)
            continue
        elif kind == "forget":
            fresh.pop(f"ep{arg}", None)
            r.forget(f"ep{arg}")
            continue
        elif kind == "policies":
            docs = [DOCS[i] for i in arg]
        order = sorted(records)
        if kind == "shuffle":
            random.Random(arg).shuffle(order)
        revision += 1
        view = ClusterView(revision=revision, endpoints=[records[k] for k in order], policies=list(docs))
        fresh, ok = _check(r, lambda: r.sync(view), records, revision, fresh, docs)
        synced = (dict(records), revision, list(docs)) if ok else synced


def _check(r, run, records, revision, fresh, docs):
    """``run`` (a pass over a view of ``records`` at ``revision``) leaves the reconciler holding what
    compile_ruleset gives, or both refuse the input; -> (the installed records still waiting, whether it
    compiled)."""
    fresh = {i: (e, rev) for i, (e, rev) in fresh.items() if ("h1", i) not in records and rev > revision}
    held = list(records.values()) + [e for e, _ in fresh.values()]
    everyone = [agent_policy.policy_endpoint(e) for e in held]
    local = [agent_policy.policy_endpoint(e) for e in held if e.host == "h1"]
    try:
        want = compile_ruleset(local, everyone, [Policy.from_dict(d) for d in docs])
    except InvalidInput:
        want = None
    try:
        run()
    except InvalidInput:
        assert want is None
        return fresh, False
    assert r._last == want
    return fresh, True


def test_an_install_after_refused_views_compiles_with_the_last_view_synced():
    """A view the compiler refuses is not synced, so ADD compiles its endpoint in with the last view that was,
    policies included (not with the policies of a refused view); the next view that compiles replaces it all."""
    r = agent_policy.PolicyReconciler("h1", _Recording())
    web, db_elsewhere = _record(1, "h1", "web"), _record(1, "h2", "db")  # one id, two hosts, other labels
    r.sync(ClusterView(revision=2, endpoints=[web], policies=[DOCS[0]]))
    for revision, docs in ((3, [DOCS[0]]), (4, [])):
        with pytest.raises(InvalidInput, match="ep1 is given twice"):
            r.sync(ClusterView(revision=revision, endpoints=[web, db_elsewhere], policies=docs))
    new = _record(2, "h1", "web")
    assert r.install(new, 5)
    held = [agent_policy.policy_endpoint(e) for e in (web, new)]
    assert r.dataplane.applied[-1][0] == compile_ruleset(held, held, [Policy.from_dict(DOCS[0])])

    r.sync(ClusterView(revision=5, endpoints=[web, new]))
    assert r.dataplane.applied[-1][0] == compile_ruleset(held, held, [])
