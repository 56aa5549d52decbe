"""``netctl node ...``."""

import click

from netplugin.cli.output import emit, output_option
from netplugin.datastore import keys
from netplugin.nodes import NodeRegistry


@click.group()
def node():
    """Hosts of the cluster."""


@node.command("list")
@output_option
@click.pass_obj
def node_list(obj, fmt):
    """Every registered node, whether it is alive, its BGP address (autodetected or set) and AS."""
    reg = NodeRegistry(obj.ds)
    alive = reg.alive()
    dead = {keys.last_segment(kv.key): kv.value for kv in obj.ds.list(keys.DEAD)}
    rows = []
    for n in reg.list():
        addr = n.address or ""
        if n.address and n.address_autodetected:
            addr += " (autodetected)"
        rows.append(
            {
                "name": n.name,
                "alive": n.name in alive,
                "address": addr,
                "address6": n.address6,
                "as": n.as_number,
                "route_reflector": n.route_reflector,
                "labels": n.labels,
                "dead_since": (dead.get(n.name) or {}).get("since"),
            }
        )
    emit(rows, fmt, ["name", "alive", "address", "address6", "as", "route_reflector", "labels"], empty="no nodes")


COMMANDS = [node]
