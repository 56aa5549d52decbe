"""Policies in etcd and ``netctl policy``: stored as validated JSON, all-or-nothing per file.

Runs against the session's real etcd (a loopback process, no root needed); the CLI runs in-process via click's
CliRunner, exactly as ``netctl`` dispatches it.
"""

import json
import re

import pytest
from click.testing import CliRunner

from netplugin.cli.main import cli
from netplugin.datastore import keys
from netplugin.datastore.models import Endpoint as EndpointRecord
from netplugin.errors import InvalidInput, NotFound
from policy import store
from policy.loader import load_text
from policy.model import Policy
from policy.validation import PolicyValidationError

WEB = """apiVersion: netplugin/v1
kind: Policy
metadata: {name: web}
spec:
  order: 10
  selector: {matchLabels: {app: web}}
  ingress:
    - {action: allow, protocol: tcp, ports: [80, "8000:8080"], from: [{selector: {matchLabels: {role: client}}}]}
    - {action: deny, from: [{cidr: 10.0.0.0/8, notCIDR: [10.1.0.0/16]}]}
"""
K8S = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{from: [{podSelector: {}}], ports: [{port: 443}]}]
"""


def run(etcd_server, *args, stdin=None):
    result = CliRunner().invoke(cli, ["--etcd-endpoints", etcd_server.endpoint, *args], input=stdin)
    return result.exit_code, result.output


@pytest.fixture
def web():
    return load_text(WEB)[0]


def test_apply_stores_the_validated_resource_and_reads_it_back(etcd, web):
    assert store.apply_policies(etcd, [web]) == ["web"]
    stored = etcd.get(keys.policy("web")).value
    assert stored == json.loads(json.dumps(web.to_dict()))
    assert stored["spec"]["ingress"][0]["ports"] == [80, "8000:8080"]
    assert store.get_policy(etcd, "web") == web
    assert store.list_policies(etcd) == [web]


def test_apply_replaces_and_is_idempotent(etcd, web):
    store.apply_policies(etcd, [web])
    rev = etcd.revision()
    store.apply_policies(etcd, [web])
    assert etcd.revision() == rev + 1  # one transaction
    wider = load_text(WEB.replace("order: 10", "order: 5"))[0]
    store.apply_policies(etcd, [wider])
    assert store.get_policy(etcd, "web").order == 5
    assert [kv.key for kv in etcd.list(keys.POLICIES)] == [keys.policy("web")]


def test_a_file_is_one_transaction(etcd, web):
    policies = load_text(WEB + "---\n" + K8S)
    rev = etcd.revision()
    assert store.apply_policies(etcd, policies) == ["web", "k8s.prod.api"]
    assert etcd.revision() == rev + 1
    kvs = etcd.list(keys.POLICIES)
    assert len({kv.mod_revision for kv in kvs}) == 1


def test_too_many_policies_store_nothing(etcd, web):
    many = [Policy(name=f"p{i}", selector=web.selector) for i in range(store.MAX_PER_TXN + 1)]
    with pytest.raises(InvalidInput, match=r"at most 100 policies per apply \(got 101\)"):
        store.apply_policies(etcd, many)
    assert etcd.list(keys.POLICIES) == []
    assert store.apply_policies(etcd, []) == []


def test_get_and_delete_missing_policy(etcd):
    with pytest.raises(NotFound, match="policy nope does not exist"):
        store.get_policy(etcd, "nope")
    with pytest.raises(NotFound, match="policy nope does not exist"):
        store.delete_policy(etcd, "nope")


def test_a_hand_written_bad_record_is_named(etcd, web):
    store.apply_policies(etcd, [web])
    etcd.put(
        keys.policy("broken"),
        {
            "apiVersion": "netplugin/v1",
            "kind": "Policy",
            "metadata": {"name": "broken"},
            "spec": {"selector": {}, "ingress": [{"action": "drop"}]},
        },
    )
    with pytest.raises(PolicyValidationError, match=r"stored policy broken is invalid: spec\.ingress\[0\]\.action"):
        store.list_policies(etcd)
    with pytest.raises(PolicyValidationError, match=r"stored policy broken is invalid"):
        store.get_policy(etcd, "broken")
    store.delete_policy(etcd, "broken")
    assert store.list_policies(etcd) == [web]


def test_cli_apply_get_list_delete(etcd, etcd_server, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(WEB + "---\n" + K8S)
    code, out = run(etcd_server, "policy", "apply", "-f", str(path))
    assert code == 0, out
    assert out.splitlines() == ["policy web applied", "policy k8s.prod.api applied"]
    code, out = run(etcd_server, "policy", "list", "-o", "json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["name"], r["order"], r["ingress_rules"]) for r in rows] == [("web", 10, 2), ("k8s.prod.api", 1000, 1)]
    code, out = run(etcd_server, "policy", "get", "web", "-o", "json")
    assert code == 0 and json.loads(out) == etcd.get(keys.policy("web")).value
    code, out = run(etcd_server, "policy", "delete", "web")
    assert (code, out) == (0, "policy web deleted\n")
    code, out = run(etcd_server, "policy", "delete", "web")
    assert code == 1 and "netctl: error: policy web does not exist" in out


def test_cli_apply_from_stdin(etcd, etcd_server):
    code, out = run(etcd_server, "policy", "apply", "-f", "-", stdin=WEB)
    assert (code, out) == (0, "policy web applied\n")
    assert store.get_policy(etcd, "web").name == "web"


@pytest.mark.parametrize(
    "text, error",
    [
        ("spec: [", r"<stdin>:1: invalid YAML"),
        (
            WEB.replace('"8000:8080"', '"8080:8000"'),
            r"<stdin>:8: spec\.ingress\[0\]\.ports\[1\]: \"8080:8000\": the range",
        ),
        (
            WEB + "---\n" + K8S.replace("port: 443", "port: https"),
            r"<stdin>:16: spec\.ingress\[0\]\.ports\[0\]\.port: named port \"https\" is not supported",
        ),
        (WEB + "---\n" + WEB, r"<stdin>:13: metadata\.name: \"web\" is defined twice \(first at line 3\)"),
    ],
)
def test_cli_refuses_bad_input_and_changes_nothing(etcd, etcd_server, text, error):
    store.apply_policies(etcd, load_text(K8S))
    before = etcd.dump("/netplugin/")
    code, out = run(etcd_server, "policy", "apply", "-f", "-", stdin=text)
    assert code == 1
    assert out.startswith("netctl: error: ") and "Traceback" not in out
    assert re.search(error, out), out
    assert etcd.dump("/netplugin/") == before


def test_endpoint_list_shows_selecting_policies_with_cni_namespace_labels(etcd, etcd_server):
    store.apply_policies(etcd, load_text(WEB + "---\n" + K8S))
    for host, ep_id, labels in (
        ("h1", "a", {"app": "web"}),
        ("h2", "b", {"app": "api", "netplugin.io/namespace": "prod"}),
        ("h2", "c", {"app": "api", "netplugin.io/namespace": "dev"}),
    ):
        rec = EndpointRecord(
            id=ep_id,
            host=host,
            network="blue",
            container_id=ep_id,
            netns="/x",
            ifname="eth0",
            host_ifname="np00000000000",
            addresses=["10.0.0.1/32"],
            labels=labels,
        )
        etcd.put(keys.endpoint(host, ep_id), rec.to_dict())
    code, out = run(etcd_server, "endpoint", "list", "-o", "json")
    assert code == 0, out
    assert {r["id"]: r["policies"] for r in json.loads(out)} == {"a": ["web"], "b": ["k8s.prod.api"], "c": []}
    code, out = run(etcd_server, "endpoint", "list", "--host", "h1", "-o", "json")
    assert [r["id"] for r in json.loads(out)] == ["a"]


class _NoKernel:
    """Stands in for the dataplane backend: these tests look at what the agent compiles, never touch a kernel."""

    def apply_policy(self, *args, **kw):
        raise AssertionError("no kernel here")


def test_agent_parses_only_the_stored_policies_that_select_its_endpoints(etcd, web, monkeypatch, caplog):

    from netplugin.agent import policy as agent_policy
    from netplugin.agent.view import read_view

    parsed = []
    real = Policy.from_dict
    monkeypatch.setattr(
        agent_policy.Policy,
        "from_dict",
        classmethod(lambda cls, doc: parsed.append(doc["metadata"]["name"]) or real(doc)),
    )
    store.apply_policies(etcd, load_text(WEB + "---\n" + K8S))
    etcd.put(
        keys.policy("broken"),
        {
            "apiVersion": "netplugin/v1",
            "kind": "Policy",
            "metadata": {"name": "broken"},
            "spec": {"selector": {}, "ingress": [{"action": "drop"}]},
        },
    )
    rec = EndpointRecord(
        id="a",
        host="h1",
        network="blue",
        container_id="a",
        netns="/x",
        ifname="eth0",
        host_ifname="np00000000a01",
        addresses=["10.0.0.1/32"],
        labels={"app": "web"},
    )
    etcd.put(keys.endpoint("h1", "a"), rec.to_dict())
    reconciler = agent_policy.PolicyReconciler("h1", _NoKernel())
    rs = reconciler._ruleset(read_view(etcd))
    assert sorted(parsed) == ["broken", "web"]  # k8s.prod.api selects nothing on h1: selector only
    assert "event=policy.invalid name=broken" in caplog.text
    assert any(name.startswith("np-pi-") for name in rs.chains[4])
    # Unchanged records are not parsed again, and an unchanged input is not compiled again.
    assert reconciler._ruleset(read_view(etcd)) is rs
    assert sorted(parsed) == ["broken", "broken", "web"]  # the invalid one is retried (and logged) each time
    # A pod of prod's namespace appears on h1: now the Kubernetes policy is parsed, once.
    rec2 = EndpointRecord(
        id="b",
        host="h1",
        network="blue",
        container_id="b",
        netns="/y",
        ifname="eth0",
        host_ifname="np00000000b02",
        addresses=["10.0.0.2/32"],
        labels={"app": "api", "netplugin.io/namespace": "prod"},
    )
    etcd.put(keys.endpoint("h1", "b"), rec2.to_dict())
    rs2 = reconciler._ruleset(read_view(etcd))
    assert parsed.count("k8s.prod.api") == 1 and parsed.count("web") == 1
    assert len([c for c in rs2.chains[4] if c.startswith("np-pi-")]) == 2
