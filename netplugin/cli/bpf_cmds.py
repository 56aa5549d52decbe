"""``netctl bpf``: what the eBPF dataplane holds on this host, read from its pinned maps (no agent needed)."""

import socket

import click

from netplugin.cli.output import emit, output_option
from netplugin.kernel.bpf import loader, maps, records

bpffs_option = click.option(
    "--bpffs",
    default="/sys/fs/bpf/netplugin",
    show_default=True,
    help="The agent's --bpffs: where its programs and maps are pinned.",
)


@click.group("bpf")
def bpf():
    """The eBPF dataplane's maps on this host."""


def _open(pins, name):
    try:
        return pins.map(name)
    except (OSError, maps.BpfError, loader.LoadError) as e:
        raise click.ClickException(
            f"cannot open {pins.maps / name}: {e} (is the agent running with --dataplane bpf and this --bpffs?)"
        ) from None


def _entries(pins, name):
    """(key, value) of every entry of a pinned map, skipping keys deleted while we walk."""
    with _open(pins, name) as m:
        for key in m.keys():
            value = m.lookup(key)
            if value is not None:
                yield key, value


def _ifname(ifindex):
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return "?"


def _policy_rules(pins, ep_id, slot):
    """Rules in each direction's live list ('-': none, so the stack's iptables chains decide)."""
    with _open(pins, "np_pol_rules") as m:
        out = {}
        for direction, d in (("ingress", records.DIR_INGRESS), ("egress", records.DIR_EGRESS)):
            raw = m.lookup(records.rules_key(ep_id, d, slot))
            out[direction] = records.rules_count(raw) if raw else "-"
        return out


def _policy_gen(pins):
    with _open(pins, "np_config") as m:
        raw = m.lookup(records.IFINDEX.pack(0))
        return records.config_gen(raw) if raw else 0


@bpf.command("endpoints")
@bpffs_option
@output_option
def endpoints(bpffs, fmt):
    """Endpoints in np_endpoints (anti-spoofing), the policy rules each has in BPF ('-': the stack's), the slot
    of its live lists and the host's policy generation."""
    pins = loader.Pins(bpffs)
    rows = []
    gen = _policy_gen(pins)
    for key, value in _entries(pins, "np_endpoints"):
        e = records.endpoint_entry(key, value)
        pol = _policy_rules(pins, e["id"], e["slot"])
        rows.append(
            {
                "interface": _ifname(e["ifindex"]),
                "ifindex": e["ifindex"],
                "id": e["id"],
                "addresses": " ".join(e["addresses"]),
                "ingress_rules": pol["ingress"],
                "egress_rules": pol["egress"],
                "slot": e["slot"],
                "policy_gen": gen,
            }
        )
    rows.sort(key=lambda r: r["ifindex"])
    emit(
        rows,
        fmt,
        ["interface", "ifindex", "id", "addresses", "ingress_rules", "egress_rules", "slot", "policy_gen"],
        empty="no endpoint in the BPF maps",
    )


@bpf.command("counters")
@bpffs_option
@output_option
def counters(bpffs, fmt):
    """Per-endpoint packet counters of the programs: allowed, denied, spoofed, logged, to_stack."""
    rows = []
    for key, raw in _entries(loader.Pins(bpffs), "np_counters"):
        (ep_id,) = records.IFINDEX.unpack(key)
        rows.append({"id": ep_id, "interface": _ifname(ep_id), **records.counters(raw)})
    rows.sort(key=lambda r: r["id"])
    emit(rows, fmt, ["interface", "id", *records.COUNTER_NAMES], empty="no counters in the BPF maps")


COMMANDS = [bpf]
