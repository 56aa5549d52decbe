"""The dataplane as the agent needs it: one interface, filled by the composition root with one implementation.

Today that is iptables (netplugin.agent.backend.IptablesBackend: veths and routes by netlink, policy in the
filter table, NAT-outgoing in the nat table, anti-spoofing in raw); the eBPF dataplane is a second
implementation of the same methods, tested by the same suites. The methods say what is wanted (an endpoint,
a compiled ruleset, the pools to masquerade), never how a kernel table holds it, so the reconcilers and the
front doors do not change with the backend. Every method is idempotent and level-triggered: called again
with the same input it changes nothing, and a full call (``full=True``) reads the kernel back and repairs drift.
"""

from typing import Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    def setup_host(self) -> dict:
        """Host-wide settings (forwarding, the IPv4 anti-spoofing rule when rp_filter is loose); what it did."""

    def enable_ipv6(self, recheck: bool = False) -> dict:
        """Host IPv6 forwarding and the IPv6 anti-spoofing rule, once an IPv6 pool is in use."""

    def add_endpoint(self, spec):
        """Wire a container (an EndpointSpec) or converge its existing wiring; all-or-nothing. EndpointState."""

    def remove_endpoint(self, endpoint_id: str, netns: str | None = None, ifname: str = "eth0") -> None:
        """Unwire an endpoint; gone already is success."""

    def add_docker_endpoint(self, spec):
        """Wire a Docker endpoint, both ends in the host namespace (libnetwork moves one). DockerLink."""

    def remove_docker_endpoint(self, endpoint_id: str) -> bool:
        """Unwire a Docker endpoint wherever its container end is; gone already is success."""

    def check_endpoint(self, spec) -> list:
        """What differs between the kernel and ``spec``, as sentences; [] when it is all there."""

    def reconcile(self, desired: list, blocks: list, deletable=frozenset()) -> dict:
        """Converge every endpoint and owned block of this host; a summary of what changed and what failed."""

    def converge_blocks(self, blocks: list) -> dict:
        """Converge what the owned blocks alone decide (their blackholes); no endpoint is read or touched."""

    def apply_policy(self, ruleset, full: bool = False) -> tuple:
        """Enforce a compiled policy ruleset (policy.compiler), cutting the established connections it now denies
        (policy.revoke on iptables); (changes made, seconds per phase)."""

    def set_nat_outgoing(self, pools, full: bool = False) -> list:
        """Masquerade traffic leaving the pools marked nat_outgoing for outside all pools; the changes made."""
