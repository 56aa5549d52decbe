"""Network policy: YAML resources -> validated model -> compiled ipsets and iptables chains -> the kernel.

    policies = load_file("policy.yaml")                       # or Policy.from_dict(json from etcd)
    ruleset = compile_ruleset(local_endpoints, all_endpoints, policies)
    PolicyDataplane("npt-host").apply(ruleset)                # idempotent; diff() reports drift

Semantics are described in ``policy.compiler``; the Kubernetes NetworkPolicy mapping in ``policy.k8s``.
"""

from policy.applier import PolicyDataplane
from policy.compiler import CompileOptions, IpSet, Ruleset, compile_ruleset
from policy.loader import load_file, load_text
from policy.model import Endpoint, Peer, Policy, Rule
from policy.selector import Requirement, Selector
from policy.validation import PolicyValidationError

__all__ = [
    "CompileOptions",
    "Endpoint",
    "IpSet",
    "Peer",
    "Policy",
    "PolicyDataplane",
    "PolicyValidationError",
    "Requirement",
    "Rule",
    "Ruleset",
    "Selector",
    "compile_ruleset",
    "load_file",
    "load_text",
]
