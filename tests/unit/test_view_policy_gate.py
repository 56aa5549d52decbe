"""The policy reconciler skips passes whose changes cannot touch its ruleset, and converts each endpoint record
once (the view model hands back the same record object until its key changes)."""

import pytest

from netplugin.agent import policy as agent_policy
from netplugin.agent.view import EVERYTHING, ClusterView, ViewChanges
from netplugin.datastore import keys
from netplugin.datastore.models import Endpoint, Node


class _Recording:
    """Stands in for the dataplane backend: records the rulesets it is asked to enforce, touches no kernel."""

    def __init__(self):
        self.applied = []

    def apply_policy(self, ruleset, full=False):
        self.applied.append((ruleset, full))
        return [], {}


def _ep(host, n):
    return Endpoint(
        id=f"ep{n}",
        host=host,
        network="blue",
        container_id=f"c{n}",
        netns="/x",
        ifname="eth0",
        host_ifname=f"np{n:011x}",
        addresses=[f"10.0.0.{n}/32"],
    )


def _changed(*ks):
    return ViewChanges(everything=False, keys=frozenset(ks))


@pytest.fixture
def reconciler(monkeypatch):
    compiled = []
    real = agent_policy.RulesetCompiler.ruleset
    monkeypatch.setattr(agent_policy.RulesetCompiler, "ruleset", lambda self: compiled.append(self) or real(self))
    converted = []
    real_convert = agent_policy.policy_endpoint
    monkeypatch.setattr(agent_policy, "policy_endpoint", lambda e: converted.append(e.id) or real_convert(e))
    r = agent_policy.PolicyReconciler("h1", _Recording())
    return r, compiled, converted


def test_only_endpoint_and_policy_changes_reach_the_compiler(reconciler):
    r, compiled, converted = reconciler
    local, remote = _ep("h1", 1), _ep("h2", 2)
    view = ClusterView(nodes={"h1": Node("h1")}, endpoints=[local, remote])
    r.sync(view, changes=EVERYTHING)
    assert len(r.dataplane.applied) == 1 and len(compiled) == 1 and sorted(converted) == ["ep1", "ep2"]

    # Nodes, liveness, blocks of other hosts: no compile, no apply.
    r.sync(view, changes=_changed(keys.node("h9"), keys.liveness("h2"), keys.affinity("h2", "10.0.1.0/26")))
    assert len(r.dataplane.applied) == 1 and len(compiled) == 1

    # Another host's endpoint appears: recompiled and applied; the unchanged records are not converted again.
    view = ClusterView(nodes=view.nodes, endpoints=[local, remote, _ep("h3", 3)])
    r.sync(view, changes=_changed(keys.endpoint("h3", "ep3")))
    assert len(r.dataplane.applied) == 2 and converted == ["ep1", "ep2", "ep3"]
    ruleset, full = r.dataplane.applied[-1]
    assert not full and any("10.0.0.3/32" in s.members for s in ruleset.ipsets)

    # A periodic full resync always applies (reading the kernel back), whatever changed.
    r.sync(view, full=True, changes=_changed())
    assert r.dataplane.applied[-1] == (ruleset, True)
