"""``netctl policy ...`` and ``netctl endpoint list``."""
import sys

import click

from netplugin.cli.output import emit, output_option
from netplugin.datastore import keys
from netplugin.datastore.models import Endpoint as EndpointRecord
from netplugin.errors import InvalidInput
from policy import store
from policy.k8s import policy_labels
from policy.loader import load_file, load_text


@click.group()
def policy():
    """Allow/deny rules between containers."""


@policy.command("apply")
@click.option("-f", "--file", "path", required=True, help="YAML file ('-' for stdin): netplugin Policy or "
              "Kubernetes NetworkPolicy documents.")
@click.pass_obj
def policy_apply(obj, path):
    """Validate every document, then store them all in one transaction."""
    if path == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as err:
            raise InvalidInput(f"cannot read policy from stdin: not UTF-8 text ({err.reason})") from None
        policies = load_text(text, "<stdin>")
    else:
        policies = load_file(path)
    names = store.apply_policies(obj.ds, policies)
    for name in names:
        click.echo(f"policy {name} applied")


@policy.command("list")
@output_option
@click.pass_obj
def policy_list(obj, fmt):
    rows = []
    for p in sorted(store.list_policies(obj.ds), key=lambda p: (p.order, p.name)):
        rows.append({"name": p.name, "order": p.order, "selector": p.selector.to_dict(), "types": list(p.types),
                     "ingress_rules": len(p.ingress), "egress_rules": len(p.egress)})
    emit(rows, fmt, ["name", "order", "types", "ingress_rules", "egress_rules", "selector"], empty="no policies")


@policy.command("get")
@click.argument("name")
@click.option("-o", "--output", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.pass_obj
def policy_get(obj, name, fmt):
    emit(store.get_policy(obj.ds, name).to_dict(), fmt)


@policy.command("delete")
@click.argument("name")
@click.pass_obj
def policy_delete(obj, name):
    store.delete_policy(obj.ds, name)
    click.echo(f"policy {name} deleted")


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
        rows.append({"host": ep.host, "network": ep.network, "id": ep.id, "addresses": ep.addresses,
                     "labels": ep.labels, "policies": selected, "host_ifname": ep.host_ifname})
    emit(rows, fmt, ["host", "network", "addresses", "labels", "policies", "id"], empty="no endpoints")


COMMANDS = [policy, endpoint]
