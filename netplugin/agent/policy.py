"""Policy reconciler: compile the policies that touch this host's endpoints and make the kernel hold them.

Compilation is pure and cheap; the kernel is only written when the compiled ruleset changed, or on a full
resync, where the applier reads our chains and sets back and repairs any drift (someone flushing a chain).
"""
import logging
import os

from netplugin.errors import InvalidInput
from policy.applier import PolicyDataplane
from policy.compiler import compile_ruleset
from policy.model import Endpoint, Policy
from policy.validation import PolicyValidationError

LOG = logging.getLogger(__name__)


def policy_endpoint(ep):
    return Endpoint(id=ep.id, host_ifname=ep.host_ifname, addresses=[a.split("/")[0] for a in ep.addresses],
                    network=ep.network, labels=dict(ep.labels))


class PolicyReconciler:
    def __init__(self, agent, netns=None):
        self.host = agent.host
        # The agent programs the namespace it runs in: the host's (a test host namespace in the tests).
        self.dp = PolicyDataplane(netns or f"/proc/{os.getpid()}/ns/net", allow_host_namespace=True)
        self._last = None

    def _policies(self, view):
        out = []
        for doc in view.policies:
            try:
                out.append(Policy.from_dict(doc))
            except (PolicyValidationError, InvalidInput) as e:
                # netctl validates before storing; a record that fails here was written by hand or a newer
                # version. Skip it loudly rather than dropping every policy.
                LOG.error("event=policy.invalid name=%s error=%s", (doc or {}).get("metadata", {}).get("name"), e)
        return out

    def sync(self, view, full=False):
        local = [policy_endpoint(e) for e in view.endpoints_of(self.host)]
        everyone = [policy_endpoint(e) for e in view.endpoints]
        ruleset = compile_ruleset(local, everyone, self._policies(view))
        if not full and ruleset == self._last:
            return
        changes = self.dp.apply(ruleset)
        self._last = ruleset
        if changes:
            LOG.info("event=policy.applied changes=%d timings=%s", len(changes),
                     {k: round(v * 1000, 1) for k, v in self.dp.last_timings.items()})
