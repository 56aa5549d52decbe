"""``netctl bgp ...`` and the BGP side of ``netctl node``: peers, cluster AS and mesh, route reflectors."""

import dataclasses
import os

import click

from netplugin.cli.output import emit, output_option
from netplugin.datastore import keys
from netplugin.datastore.models import BgpPeer, ClusterConfig, Node, check_as_number
from netplugin.errors import InvalidInput, NotFound

# The columns of `netctl node status` (-o json/yaml give every field of BgpStatusRow).
STATUS_COLUMNS = ["peer_address", "peer_type", "state", "since", "info"]


def _cluster(ds):
    kv = ds.get(keys.CLUSTER_CONFIG)
    return ClusterConfig.from_dict(kv.value) if kv else ClusterConfig()


@click.group()
def bgp():
    """BGP: the cluster's AS, the node-to-node mesh, explicit peers (e.g. top-of-rack routers)."""


@bgp.command("config")
@click.option("--as-number", type=int, help="The cluster's default AS.")
@click.option("--mesh/--no-mesh", default=None, help="Node-to-node full mesh (turn off with route reflectors).")
@output_option
@click.pass_obj
def bgp_config(obj, as_number, mesh, fmt):
    """Show or change cluster-wide BGP settings."""
    cfg = _cluster(obj.ds)
    check_as_number(as_number)
    if as_number is not None:
        cfg.as_number = as_number
    if mesh is not None:
        cfg.mesh = mesh
    if as_number is not None or mesh is not None:
        obj.ds.put(keys.CLUSTER_CONFIG, cfg.to_dict())
    emit(cfg.to_dict(), fmt)


@bgp.group("peer")
def peer():
    """Explicit BGP peers, global or for one node."""


@peer.command("add")
@click.argument("name")
@click.option("--address", required=True, help="Peer's IP address.")
@click.option("--as-number", type=int, required=True)
@click.option("--node", default=None, help="Only this node peers with it (default: every node).")
@click.option("--password", default=None, help="TCP MD5 password.")
@click.pass_obj
def peer_add(obj, name, address, as_number, node, password):
    peer = BgpPeer(name=name, address=address, as_number=as_number, node=node, password=password).validate()
    obj.ds.put(keys.bgp_peer(name), peer.to_dict())
    click.echo(f"peer {name} ({address}, AS {as_number}) added for {node or 'every node'}")


@peer.command("list")
@output_option
@click.pass_obj
def peer_list(obj, fmt):
    rows = [BgpPeer.from_dict(kv.value).to_dict() for kv in obj.ds.list(keys.BGP_PEERS)]
    for r in rows:
        r["password"] = "***" if r.get("password") else ""
        r["node"] = r["node"] or "(global)"
    emit(rows, fmt, ["name", "address", "as_number", "node"], empty="no peers")


@peer.command("rm")
@click.argument("name")
@click.pass_obj
def peer_rm(obj, name):
    if not obj.ds.delete(keys.bgp_peer(name)):
        raise NotFound(f"peer {name} does not exist")
    click.echo(f"peer {name} removed")


@click.command("set")
@click.argument("name")
@click.option("--route-reflector/--no-route-reflector", default=None)
@click.option("--as-number", type=int, default=None)
@click.option("--address", default=None, help="The node's BGP address (overrides autodetection).")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE (repeatable).")
@click.pass_obj
def node_set(obj, name, route_reflector, as_number, address, labels):
    """Change a node's BGP role, AS, address or labels."""
    kv = obj.ds.get(keys.node(name))
    if kv is None:
        raise NotFound(f"node {name} is not registered")
    node = Node.from_dict(kv.value)
    check_as_number(as_number)
    if route_reflector is not None:
        node.route_reflector = route_reflector
    if as_number is not None:
        node.as_number = as_number
    if address:
        node.set_address(address)
    for item in labels:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InvalidInput(f"label {item!r} must be KEY=VALUE")
        node.labels[k] = v
    obj.ds.put(keys.node(name), node.to_dict())
    click.echo(f"node {name} updated")


@click.command("status")
@click.option("--run-dir", default="/run/netplugin", show_default=True, help="The local agent's run dir.")
@output_option
def node_status(run_dir, fmt):
    """This host's BGP sessions, read from the local BIRD."""
    from netplugin.routing.bird import bgp_status

    sock = os.path.join(run_dir, "bird", "bird.ctl")
    if not os.path.exists(sock):
        raise NotFound(f"no BIRD control socket at {sock}: is the agent running here in bgp mode?")
    emit([dataclasses.asdict(r) for r in bgp_status(sock)], fmt, STATUS_COLUMNS, empty="no BGP sessions")


COMMANDS = [bgp]
NODE_COMMANDS = [node_set, node_status]
