"""Today's dataplane backend: netlink for veths and routes, iptables/ipset for policy, NAT-outgoing and
anti-spoofing. It implements netplugin.dataplane.backend.Backend by handing each job to its one writer; the
agent (the composition root) builds it with ``iptables_backend`` and passes it to every reconciler and front
door, which see only the Backend methods.
"""

import logging
import time

from netplugin.agent.nat import NatOutgoing
from netplugin.dataplane import Dataplane, docker_link
from netplugin.errors import DataplaneError
from netplugin.kernel.netns import own_netns
from policy.applier import PolicyDataplane
from policy.revoke import FlowRevoker

LOG = logging.getLogger(__name__)


class IptablesBackend:
    name = "iptables"  # what health reports as the active dataplane
    background_link_deletion = True  # DEL returns once the endpoint is detached (netplugin/dataplane/reaper.py)

    def __init__(self, endpoints: Dataplane, policy: PolicyDataplane, nat: NatOutgoing, flows: FlowRevoker = None):
        self.endpoints = endpoints  # veths, host routes, blackholes, host sysctls, anti-spoofing
        self.policy = policy  # the filter table and ipsets
        self.nat = nat  # the nat table
        # conntrack: established connections the policy now denies (in the policy's namespace by default)
        self.flows = flows if flows is not None or policy is None else FlowRevoker(policy.ns.path)

    @property
    def host_netns(self):
        return self.endpoints.host_netns

    def setup_host(self) -> dict:
        return self.endpoints.setup_host()

    def enable_ipv6(self, recheck=False) -> dict:
        return self.endpoints.enable_ipv6(recheck=recheck)

    def add_endpoint(self, spec):
        return self.endpoints.add_endpoint(spec)

    def remove_endpoint(self, endpoint_id, netns=None, ifname="eth0"):
        return self.endpoints.remove_endpoint(endpoint_id, netns, ifname, background=self.background_link_deletion)

    def close(self):
        self.endpoints.close()

    def add_docker_endpoint(self, spec) -> docker_link.DockerLink:
        return self.endpoints.add_docker_endpoint(spec)

    def remove_docker_endpoint(self, endpoint_id) -> bool:
        return self.endpoints.remove_docker_endpoint(endpoint_id)

    def check_endpoint(self, spec) -> list:
        return self.endpoints.check_endpoint(spec)

    def reconcile(self, desired, blocks, deletable=frozenset()) -> dict:
        return self.endpoints.reconcile(desired, blocks, deletable=deletable)

    def converge_blocks(self, blocks) -> dict:
        return self.endpoints.converge_blocks(blocks)

    def apply_policy(self, ruleset, full=False) -> tuple:
        # Event-driven passes plan against what the applier last wrote; full ones read the kernel back.
        diffs = self.policy.apply(ruleset, trust_cache=not full)
        timings = dict(self.policy.last_timings)
        if self.flows is not None and ruleset.inputs:
            # Conntrack would let a connection the new rules deny go on for ever (policy.revoke); a full
            # resync sweeps too, so a failed sweep is retried. A failure never undoes the rules just written.
            needed = self.flows.needed(*ruleset.inputs)  # asked every time: it remembers what it was given
            if full or diffs and needed:
                started = time.monotonic()
                try:
                    self.flows.sweep(*ruleset.inputs)
                except DataplaneError as err:
                    LOG.warning("event=policy.revoke_failed error=%s (the next full resync tries again)", err.msg)
                timings["revoke"] = time.monotonic() - started
        return diffs, timings

    def set_nat_outgoing(self, pools, full=False) -> list:
        return self.nat.apply(pools, full=full)


def iptables_backend(mtu: int = 1500, netns: str | None = None) -> IptablesBackend:
    """The backend for one host namespace: ``netns`` a path such as /run/netns/NAME (a test "host"), or None
    for the namespace the agent runs in (the host's), which this process never leaves."""
    where = netns or own_netns()
    return IptablesBackend(
        Dataplane(host_netns=netns, mtu=mtu), PolicyDataplane(where, allow_host_namespace=True), NatOutgoing(where)
    )
