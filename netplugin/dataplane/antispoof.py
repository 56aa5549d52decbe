"""IPv6 anti-spoofing: a container may only send from addresses routed back to its own veth.

IPv4 uses the kernel's strict reverse-path filter (rp_filter=1 on each host veth). IPv6 has no rp_filter, so
one raw-table rule does the same job: ``-m rpfilter --invert -j DROP`` in our chain ``np-antispoof``, reached
from raw PREROUTING by one jump for ``-i np+``. The kernel's netfilter writer (netplugin.kernel.netfilter)
writes both, so applying twice changes nothing and the built-in chain holds that one jump and nothing else of
ours. This is the only writer of the raw table, so every other ``np-`` chain there is stale to it.

If the host runs IPv4 rp_filter loose host-wide (``net.ipv4.conf.all.rp_filter=2``), the kernel uses the
maximum of "all" and the interface value, so our strict per-veth setting would be weakened; then the same
chain is installed for IPv4 too (see ``Dataplane.setup_host``).
"""

from netplugin.kernel.netfilter import NetfilterTable

CHAIN = "np-antispoof"
CHAINS = {CHAIN: ("-m rpfilter --invert -j DROP",)}
HOOKS = {"PREROUTING": f"-i np+ -j {CHAIN}"}


class AntiSpoof:
    """The raw-table chain and hook of both families in one namespace (a ``NamespaceCommand``)."""

    def __init__(self, ns):
        self.tables = {family: NetfilterTable(ns, family, table="raw") for family in (4, 6)}

    def ensure(self, family: int) -> bool:
        """Install chain and hook; returns True when something was written."""
        return not self.tables[family].converge(CHAINS, HOOKS).empty()

    def problems(self, family: int) -> list:
        table = self.tables[family]
        return [f"anti-spoofing: {note}" for note in table.plan(CHAINS, HOOKS, table.read()).notes]
