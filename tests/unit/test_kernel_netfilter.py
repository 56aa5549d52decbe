"""The netfilter writer's pure parts for every table we own: rendering, ownership parsing, validation, and the
numbered lines of a failed batch."""

import pytest

from netplugin.errors import InvalidInput
from netplugin.kernel import netfilter
from netplugin.kernel.netfilter import NetfilterTable, hook_spec, hook_target, parse_save, restore_error, tagged

RAW_CHAINS = {"np-antispoof": ("-m rpfilter --invert -j DROP",)}
RAW_HOOKS = {"PREROUTING": "-i np+ -j np-antispoof"}
NAT_CHAINS = {"np-nat-outgoing": ("-d 10.99.0.0/24 -j RETURN", "-s 10.99.0.0/24 -j MASQUERADE")}
NAT_HOOKS = {"POSTROUTING": "np-nat-outgoing"}


def saved(table, *lines):
    """iptables-save output with a foreign chain and foreign rules around ours, and other tables around it."""
    return (
        "\n".join(
            [
                "*filter",
                ":FORWARD ACCEPT [0:0]",
                ":np-in-filter - [0:0]",
                "COMMIT",
                f"*{table}",
                ":PREROUTING ACCEPT [0:0]",
                ":POSTROUTING ACCEPT [0:0]",
                ":KUBE-X - [0:0]",
                "-A PREROUTING -j KUBE-X",
                "-A POSTROUTING -j KUBE-X",
                *lines,
                "COMMIT",
                "*mangle",
                ":np-in-mangle - [0:0]",
                "COMMIT",
            ]
        )
        + "\n"
    )


def test_hook_is_a_chain_or_a_whole_jump_spec():
    assert hook_spec("np-x") == "-j np-x" and hook_target("np-x") == "np-x"
    assert hook_spec("-i np+ -j np-x") == "-i np+ -j np-x" and hook_target("-i np+ -g np-x") == "np-x"


@pytest.mark.parametrize(
    "table,family,chains,hooks",
    [
        ("raw", 6, RAW_CHAINS, RAW_HOOKS),
        ("raw", 4, RAW_CHAINS, RAW_HOOKS),
        ("nat", 4, NAT_CHAINS, NAT_HOOKS),
        ("nat", 6, NAT_CHAINS, NAT_HOOKS),
    ],
)
def test_fresh_table_gets_one_batch_and_then_nothing(table, family, chains, hooks):
    writer = NetfilterTable(ns=None, family=family, table=table)
    (chain, specs), (builtin, hook) = next(iter(chains.items())), next(iter(hooks.items()))
    plan = writer.plan(chains, hooks, parse_save(saved(table), table))
    assert writer.render(plan, chains) == [f"*{table}", f":{chain} - [0:0]"] + [
        f"-A {chain} {tagged(s)}" for s in specs
    ] + [f"-I {builtin} 1 {tagged(hook_spec(hook))}", "COMMIT"]
    label = f"IPv{family} {table}"
    assert plan.notes == [f"{label} chain {chain}: missing", f"{label} {builtin}: jump to {chain} missing"]
    # What that batch leaves, as iptables-save prints it (our comment moved after the matches): in sync.
    ours = [
        f'-A {builtin} {hook_spec(hook)} -m comment --comment "np:{netfilter.rule_hash(hook_spec(hook))}"',
        f":{chain} - [0:0]",
    ] + [f"-A {chain} {s} -m comment --comment np:{netfilter.rule_hash(s)}" for s in specs]
    again = writer.plan(chains, hooks, parse_save(saved(table, *ours), table))
    assert again.empty() and writer.render(again, chains) == []


def test_ownership_is_by_prefix_per_table_and_by_comment_per_rule():
    text = saved(
        "raw",
        ":np-antispoof - [0:0]",
        "-A np-antispoof -m rpfilter --invert -j DROP",
        "-A PREROUTING -i np+ -j np-antispoof",
        "-A PREROUTING -i eth0 -j np-antispoof",
    )
    state = parse_save(text, "raw")
    assert state.chains == {"np-antispoof": (None,)}  # not np-in-filter, not np-in-mangle; untagged rule: None
    assert [(target, h) for _, target, h in state.hooks["PREROUTING"]] == [("np-antispoof", None)] * 2
    assert "KUBE-X" not in state.chains and "POSTROUTING" not in state.hooks
    writer = NetfilterTable(ns=None, family=6, table="raw")
    plan = writer.plan(RAW_CHAINS, RAW_HOOKS, state)
    assert plan.rewrite == ["np-antispoof"] and plan.stale == []
    assert plan.hook_del == [("PREROUTING", "-i np+ -j np-antispoof"), ("PREROUTING", "-i eth0 -j np-antispoof")]
    assert plan.hook_add == [("PREROUTING", "-i np+ -j np-antispoof")]
    batch = writer.render(plan, RAW_CHAINS)
    assert not [line for line in batch if "KUBE-X" in line]  # others' chains and rules are never named


def test_chains_no_longer_wanted_are_removed_with_their_hooks():
    writer = NetfilterTable(ns=None, family=4, table="nat")
    tagged_hook = f"-A POSTROUTING {tagged('-j np-nat-outgoing')}"
    state = parse_save(saved("nat", ":np-nat-outgoing - [0:0]", tagged_hook), "nat")
    plan = writer.plan({}, {}, state)
    assert writer.render(plan, {}) == [
        "*nat",
        ":np-nat-outgoing - [0:0]",
        f"-D POSTROUTING {tagged('-j np-nat-outgoing')}",
        "-X np-nat-outgoing",
        "COMMIT",
    ]


@pytest.mark.parametrize(
    "chains,hooks,words",
    [
        ({"KUBE-MINE": ("-j RETURN",)}, {}, "is not ours"),
        (RAW_CHAINS, {"FORWARD": "np-antispoof"}, "built-in chain of the raw table"),
        (RAW_CHAINS, {"PREROUTING": "np-elsewhere"}, "one of the chains written with it"),
    ],
)
def test_plans_that_would_touch_what_is_not_ours_are_refused(chains, hooks, words):
    with pytest.raises(InvalidInput, match=words):
        NetfilterTable(ns=None, family=6, table="raw").plan(chains, hooks, parse_save("", "raw"))


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"table": "mangle"}, "not one of filter, nat, raw"),
        ({"family": 5}, "not 4 or 6"),
        ({"backend": "iptables"}, "backend"),
    ],
)
def test_unknown_tables_families_and_backends_are_refused(kwargs, words):
    with pytest.raises(InvalidInput, match=words):
        NetfilterTable(**{"ns": None, "family": 4, **kwargs})


@pytest.mark.parametrize(
    "stderr",
    [
        "iptables-restore: line 4 failed\n",  # nf_tables backend
        "iptables-restore v1.8.9 (legacy): Couldn't load match `nope'\n\nError occurred at line: 4\n"
        "Try `iptables-restore -h' or 'iptables-restore --help' for more information.\n",
    ],
)
def test_a_failed_batch_names_its_line_and_shows_the_numbered_lines_around_it(stderr):
    lines = ["*raw", ":np-a - [0:0]", "-A np-a -j RETURN", "-A np-a -m nope -j DROP", "-A np-a -j ACCEPT", "COMMIT"]
    err = restore_error("ip6tables-restore (IPv6 raw) in netns x", lines, stderr)
    assert "failed at line 4: -A np-a -m nope -j DROP" in err.msg and "previous rules stay in force" in err.msg
    numbered = err.details.splitlines()[1:]
    assert numbered[0] == "      1: *raw" and ">     4: -A np-a -m nope -j DROP" in numbered
    assert numbered[-1] == "      6: COMMIT" and "Try `" not in err.details
