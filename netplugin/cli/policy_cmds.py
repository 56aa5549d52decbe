"""``netctl policy ...`` and ``netctl endpoint list``.

``policy apply/delete -f`` are ``netctl apply/delete -f`` restricted to Policy and NetworkPolicy documents; a
NetworkPolicy is stored as ``k8s.<namespace>.<name>``, which ``-n NAMESPACE NAME`` names.
"""

import click

from netplugin.errors import InvalidInput

from netplugin.cli.output import emit, output_option
from netplugin.datastore import keys
from netplugin.datastore.models import Endpoint as EndpointRecord
from netplugin.resources import writer
from netplugin.resources.kinds import POLICY_KINDS
from policy import store
from policy.k8s import policy_labels

POLICY = POLICY_KINDS[0]
namespace_option = click.option(
    "-n", "--namespace", default=None, help="Kubernetes namespace: NAME is the NetworkPolicy's (stored as k8s.NS.NAME)."
)


@click.group()
def policy():
    """Allow/deny rules between containers."""


@policy.command("apply")
@click.option(
    "-f",
    "--filename",
    "--file",
    "path",
    required=True,
    help="YAML file ('-' for stdin): netplugin Policy or Kubernetes NetworkPolicy documents.",
)
@click.pass_obj
def policy_apply(obj, path):
    """Validate every document, then store them all in one transaction."""
    for res, _ in writer.apply(obj.ds, writer.load(path, POLICY_KINDS)):
        click.echo(f"policy {res.name} applied")


@policy.command("list")
@output_option
@click.pass_obj
def policy_list(obj, fmt):
    rows = []
    for p in sorted(store.list_policies(obj.ds), key=lambda p: (p.order, p.name)):
        rows.append(
            {
                "name": p.name,
                "order": p.order,
                "selector": p.selector.to_dict(),
                "types": list(p.types),
                "ingress_rules": len(p.ingress),
                "egress_rules": len(p.egress),
            }
        )
    emit(rows, fmt, ["name", "order", "types", "ingress_rules", "egress_rules", "selector"], empty="no policies")


@policy.command("get")
@click.argument("name")
@namespace_option
@click.option("-o", "--output", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.pass_obj
def policy_get(obj, name, namespace, fmt):
    """One policy as the document 'policy apply -f' takes back."""
    emit(writer.get(obj.ds, POLICY, name, namespace)[0], fmt)


@policy.command("delete")
@click.argument("name", required=False)
@namespace_option
@click.option(
    "-f",
    "--filename",
    "--file",
    "path",
    default=None,
    help="Delete every policy this YAML file defines ('-' for stdin), as kubectl delete -f.",
)
@click.option("--ignore-not-found", is_flag=True, help="Not an error when a policy does not exist.")
@click.pass_obj
def policy_delete(obj, name, namespace, path, ignore_not_found):
    """Delete a policy by name, or every policy of a file (all or none)."""
    if (name is None) == (path is None):
        raise InvalidInput("give a policy NAME or -f FILE")
    if path is not None:
        if namespace is not None:
            raise InvalidInput("-n/--namespace goes with a NAME; a file's documents carry their own namespace")
        results = writer.delete(obj.ds, writer.load(path, POLICY_KINDS), ignore_not_found)
    else:
        results = writer.delete_named(obj.ds, POLICY, [POLICY.full_name(name, namespace)], ignore_not_found)
    for res, verb in results:
        click.echo(f"policy {res.name} {verb}")


@click.group()
def endpoint():
    """Container interfaces known to the cluster."""


@endpoint.command("list")
@click.option("--host", default=None, help="Only this host's endpoints.")
@output_option
@click.pass_obj
def endpoint_list(obj, host, fmt):
    """Endpoints with their labels and the policies that select each."""
    policies = store.list_policies(obj.ds)
    prefix = keys.endpoint_prefix(host) if host else keys.ENDPOINTS
    rows = []
    for kv in obj.ds.list(prefix):
        ep = EndpointRecord.from_dict(kv.value)
        labels = policy_labels(ep.labels)
        selected = [p.name for p in sorted(policies, key=lambda p: (p.order, p.name)) if p.selector.matches(labels)]
        rows.append(
            {
                "host": ep.host,
                "network": ep.network,
                "id": ep.id,
                "addresses": ep.addresses,
                "labels": ep.labels,
                "policies": selected,
                "host_ifname": ep.host_ifname,
            }
        )
    emit(rows, fmt, ["host", "network", "addresses", "labels", "policies", "id"], empty="no endpoints")


COMMANDS = [policy, endpoint]
