"""The netfilter writer against the real iptables of a throwaway namespace, for every table and family we own:
apply twice and the second diff is empty; others' chains and rules stay as they were; drift is repaired."""

import pytest

from netplugin.kernel.netfilter import NetfilterTable
from netplugin.kernel.netns import NamespaceCommand
from netplugin.lab.netns import nsexec

pytestmark = pytest.mark.functional

NET = {4: "10.99.0.0/24", 6: "fd99::/64"}
TABLES = {
    "filter": (
        {"np-t-fw": ("-p tcp --dport 9 -j DROP", "-j RETURN"), "np-t-in": ("-j RETURN",)},
        {"FORWARD": "np-t-fw", "INPUT": "-i np+ -j np-t-in"},
    ),
    "nat": ({"np-t-post": ("-d {net} -j RETURN", "-s {net} -j MASQUERADE")}, {"POSTROUTING": "np-t-post"}),
    "raw": ({"np-t-raw": ("-m rpfilter --invert -j DROP",)}, {"PREROUTING": "-i np+ -j np-t-raw"}),
}
SAVE = {4: "iptables-save", 6: "ip6tables-save"}
TOOL = {4: "iptables", 6: "ip6tables"}


def wanted(table, family):
    chains, hooks = TABLES[table]
    return {name: tuple(s.format(net=NET[family]) for s in specs) for name, specs in chains.items()}, hooks


def foreign_rules(ns, table, family):
    """Everything in the table that is not ours, as iptables-save prints it."""
    lines = nsexec(ns, [SAVE[family], "-t", table]).stdout.splitlines()
    return [line for line in lines if not line.startswith("#") and "np-t-" not in line and "[" not in line]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("table", sorted(TABLES))
def test_converges_twice_with_an_empty_second_diff(namespaces, table, family):
    ns = namespaces.add()
    builtin = next(iter(TABLES[table][1]))
    nsexec(ns, [TOOL[family], "-w", "-t", table, "-N", "KUBE-FOREIGN"])
    nsexec(ns, [TOOL[family], "-w", "-t", table, "-A", builtin, "-j", "KUBE-FOREIGN"])
    before = foreign_rules(ns, table, family)
    writer = NetfilterTable(NamespaceCommand(ns), family, table=table)
    chains, hooks = wanted(table, family)

    first = writer.converge(chains, hooks)
    assert not first.empty() and len(first.rewrite) == len(chains) and len(first.hook_add) == len(hooks)
    second = writer.plan(chains, hooks, writer.read())
    assert second.empty() and second.notes == [], second.notes
    assert writer.converge(chains, hooks).empty()
    assert foreign_rules(ns, table, family) == before
    rules = nsexec(ns, [TOOL[family], "-w", "-t", table, "-S", builtin]).stdout.splitlines()
    assert rules[1].endswith(f"-j {TABLES[table][1][builtin].split()[-1]}")  # our hook first, once
    assert sum("np-t-" in r for r in rules) == 1

    # Drift: someone flushes our chain and deletes our hook; the next converge repairs it, then nothing again.
    name = next(iter(chains))
    nsexec(ns, [TOOL[family], "-w", "-t", table, "-F", name])
    nsexec(ns, [TOOL[family], "-w", "-t", table, "-D", builtin, "1"])
    repaired = writer.converge(chains, hooks)
    assert repaired.rewrite == [name] and [b for b, _ in repaired.hook_add] == [builtin]
    assert writer.plan(chains, hooks, writer.read()).empty()

    # Nothing wanted any more: our chains and hooks go, the foreign ones stay.
    assert not writer.converge({}, {}).empty()
    assert writer.plan({}, {}, writer.read()).empty()
    assert foreign_rules(ns, table, family) == before
    assert "np-t-" not in nsexec(ns, [SAVE[family], "-t", table]).stdout
