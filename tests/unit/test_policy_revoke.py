"""When a policy apply must sweep conntrack (pure part of policy.revoke): after changes of policies or of what the
rules see of an endpoint that was there before, not after an endpoint was only added or removed (ADD's path)."""

import dataclasses

from policy.model import Endpoint
from policy.revoke import FlowRevoker
from tests.unit.test_policy_decide import C, D, W, policies

P = policies(("p", "  selector: {matchLabels: {app: web}}\n  ingress: [{action: allow}]"))


def test_a_sweep_is_needed_after_policy_or_endpoint_changes_only():
    rv = FlowRevoker("/nonexistent")  # nothing is opened until a sweep
    assert rv.needed([W], [W, D], P)  # nothing judged yet
    assert not rv.needed([W], [W, D], P)
    new = Endpoint("ep-n", "", ["10.65.0.9"], "blue", {})
    assert not rv.needed([W], [W, D, new], P)  # an ADD
    assert not rv.needed([W], [W, new], P)  # a DEL
    assert rv.needed([W], [W, dataclasses.replace(new, labels={"app": "db"})], P)
    assert rv.needed([W], [W, dataclasses.replace(new, network="red", labels={"app": "db"})], P)
    assert rv.needed([W], [W, C], ())
    assert not rv.needed([W], [W, C], ())
    assert rv.needed([W], [W, C], P)
