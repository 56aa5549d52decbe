"""``netctl apply -f``, ``delete -f`` and ``get``: every resource kind as YAML documents, kubectl's way.

Kinds: Policy, NetworkPolicy (Kubernetes), Pool, BGPPeer, BGPConfig, Node (see ``netplugin.resources.kinds``).
``get KIND [NAME] -o yaml`` prints what ``apply -f`` takes back unchanged.
"""

import click

from netplugin.cli.output import emit
from netplugin.resources import writer
from netplugin.resources.kinds import kind_named

_file_option = click.option(
    "-f", "--filename", "path", required=True, metavar="FILE", help="Multi-document YAML ('-' for stdin)."
)


def _report(results):
    for res, verb in results:
        click.echo(f"{res.kind.label} {res.name} {verb}")


@click.command("apply")
@_file_option
@click.pass_obj
def apply_cmd(obj, path):
    """Create or update every resource of FILE (Policy, NetworkPolicy, Pool, BGPPeer, BGPConfig, Node): all are
    validated first, then written in one transaction, or nothing is."""
    _report(writer.apply(obj.ds, writer.load(path)))


@click.command("delete")
@_file_option
@click.option("--ignore-not-found", is_flag=True, help="Skip resources that do not exist.")
@click.pass_obj
def delete_cmd(obj, path, ignore_not_found):
    """Delete every resource FILE defines, in one transaction (a pool still in use refuses the whole file).
    Nodes are kept: their records belong to their agents."""
    _report(writer.delete(obj.ds, writer.load(path), ignore_not_found))


@click.command("get")
@click.argument("kind")
@click.argument("name", required=False)
@click.option(
    "-n", "--namespace", default=None, help="Kubernetes namespace (policies; NAME is then the NetworkPolicy's)."
)
@click.option("-o", "--output", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.pass_obj
def get_cmd(obj, kind, name, namespace, fmt):
    """Resources of KIND (policy, networkpolicy, pool, bgppeer, bgpconfig, node; plurals too) as documents:
    one for NAME, else a List. 'apply -f' takes the output back unchanged."""
    doc, bad = writer.get(obj.ds, kind_named(kind), name, namespace)
    emit(doc, fmt)
    if bad:
        click.echo(
            f"netctl: warning: skipped {len(bad)} stored record(s) that do not decode: {', '.join(bad)}", err=True
        )


COMMANDS = [apply_cmd, delete_cmd, get_cmd]
