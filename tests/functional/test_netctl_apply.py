"""``netctl apply -f`` / ``delete -f`` / ``get`` and ``policy delete -f/-n`` through the installed console script
against a real etcd: every kind in one file and one transaction, round trips through ``get``, and every refusal
as one line on stderr with the whole /netplugin/ tree exactly as it was."""

import json
import os
import subprocess
import sysconfig

import pytest
import yaml

from netplugin.datastore import keys
from netplugin.datastore.models import BgpPeer, ClusterConfig, Node, Pool
from netplugin.errors import InUse
from netplugin.ipam.allocator import IPAM
from netplugin.nodes import NodeRegistry
from netplugin.resources import writer

pytestmark = pytest.mark.functional

NETCTL = os.path.join(sysconfig.get_path("scripts"), "netctl")

EVERY_KIND = """\
apiVersion: netplugin/v1
kind: Pool
metadata: {name: 10.30.0.0/16}
spec: {blockSize: 28, natOutgoing: true}
---
apiVersion: netplugin/v1
kind: Pool
metadata: {name: "fd00:30::/112"}
---
apiVersion: netplugin/v1
kind: BGPPeer
metadata: {name: tor1}
spec: {address: 192.0.2.254, asNumber: 65000, node: h1, password: s3cret}
---
apiVersion: netplugin/v1
kind: BGPConfig
metadata: {name: default}
spec: {asNumber: 64600, mesh: false}
---
apiVersion: netplugin/v1
kind: Node
metadata:
  name: h1
  labels: {rack: r7, zone: a}
spec: {routeReflector: true, asNumber: 65101, address: 192.0.2.11}
---
apiVersion: netplugin/v1
kind: Policy
metadata: {name: deny-bad}
spec:
  order: 10
  selector: {}
  ingress: [{action: deny, from: [{cidr: 198.51.100.0/24}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-allow, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: 80}]}]
"""
NAMES = [
    "pool 10.30.0.0/16",
    "pool fd00:30::/112",
    "peer tor1",
    "bgpconfig default",
    "node h1",
    "policy deny-bad",
    "policy k8s.prod.web-allow",
]


@pytest.fixture
def netctl(etcd_server):
    def _run(*args, stdin=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("NETPLUGIN_ETCD_")}
        env["NETPLUGIN_ETCD_ENDPOINTS"] = etcd_server.endpoint
        return subprocess.run([NETCTL, *args], env=env, input=stdin, capture_output=True, text=True, timeout=30)

    return _run


@pytest.fixture
def run(netctl):
    def _run(*args, stdin=None):
        res = netctl(*args, stdin=stdin)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        return res.stdout

    return _run


def state(etcd):
    """Every key under /netplugin/ with its value and mod-revision."""
    kvs, _ = etcd.get_prefix("/netplugin/")
    return {kv.key: (kv.value, kv.mod_revision) for kv in kvs}


@pytest.fixture
def fails(etcd, netctl):
    """A command that must be refused: non-zero, one line on stderr, nothing on stdout, etcd untouched."""

    def _fails(*args, match, stdin=None):
        before = state(etcd)
        res = netctl(*args, stdin=stdin)
        assert res.returncode != 0, res.stdout
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.startswith("netctl: error: ")
        assert match in res.stderr, res.stderr
        assert res.stdout == ""
        assert state(etcd) == before
        return res.stderr.strip()

    return _fails


@pytest.fixture
def nodes(etcd):
    reg = NodeRegistry(etcd)
    reg.register(Node(name="h1", address="192.0.2.1", address_autodetected=True, labels={"old": "x"}))
    reg.register(Node(name="h2", address="192.0.2.2", address6="2001:db8::2"))
    etcd.put(keys.CLUSTER_CONFIG, ClusterConfig(reclaim_grace=30.0).to_dict())
    return reg


def lines(out):
    return out.strip().splitlines()


# --- apply -----------------------------------------------------------------------------------------------------------


def test_apply_every_kind_in_one_transaction(etcd, nodes, run, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(EVERY_KIND)
    before = state(etcd)
    assert lines(run("apply", "-f", str(path))) == [
        f"{n} {v}" for n, v in zip(NAMES, ["created"] * 3 + ["configured"] * 2 + ["created"] * 2)
    ]
    assert Pool.from_dict(etcd.get(keys.pool("10.30.0.0/16")).value) == Pool("10.30.0.0/16", 28, nat_outgoing=True)
    assert Pool.from_dict(etcd.get(keys.pool("fd00:30::/112")).value) == Pool("fd00:30::/112", 122)
    assert BgpPeer.from_dict(etcd.get(keys.bgp_peer("tor1")).value) == BgpPeer(
        "tor1", "192.0.2.254", 65000, "h1", "s3cret"
    )
    assert ClusterConfig.from_dict(etcd.get(keys.CLUSTER_CONFIG).value) == ClusterConfig(64600, False, 30.0)
    h1 = nodes.get("h1")
    assert (h1.labels, h1.route_reflector, h1.as_number, h1.address, h1.address_autodetected) == (
        {"rack": "r7", "zone": "a"},
        True,
        65101,
        "192.0.2.11",
        False,
    )
    assert nodes.get("h2") == Node(name="h2", address="192.0.2.2", address6="2001:db8::2")
    assert etcd.get(keys.policy("k8s.prod.web-allow")).value["spec"]["selector"] == {
        "matchLabels": {"app": "web", "k8s.namespace": "prod"}
    }
    # One transaction: everything that changed changed at one revision.
    after = state(etcd)
    changed = {key for key in after if after[key] != before.get(key)}
    assert len(changed) == 7 and len({after[key][1] for key in changed}) == 1
    # Applying again changes nothing at all, not even a revision.
    assert lines(run("apply", "-f", str(path))) == [f"{n} unchanged" for n in NAMES]
    assert state(etcd) == after


def test_apply_reads_stdin_and_lists(etcd, nodes, run):
    listed = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": list(yaml.safe_load_all(EVERY_KIND))[:2]})
    assert lines(run("apply", "-f", "-", stdin=listed)) == ["pool 10.30.0.0/16 created", "pool fd00:30::/112 created"]
    assert [p["metadata"]["name"] for p in yaml.safe_load(run("get", "pools"))["items"]] == [
        "10.30.0.0/16",
        "fd00:30::/112",
    ]


# --- get: what apply takes back unchanged -------------------------------------------------------------------------

KINDS = ["policies", "pools", "bgppeers", "bgpconfig", "nodes"]


def test_get_apply_get_round_trip(etcd, nodes, run, tmp_path):
    """State made by the classic commands, shown by get, taken back by apply: no change, identical output."""
    run("pool", "add", "10.31.0.0/24", "--block-size", "27")
    run("pool", "set", "10.31.0.0/24", "--disable")
    run("bgp", "peer", "add", "tor2", "--address", "2001:db8::fe", "--as-number", "65010")
    run("bgp", "config", "--as-number", "65500")
    run("node", "set", "h2", "--label", "rack=r2", "--route-reflector")
    (tmp_path / "p.yaml").write_text(EVERY_KIND.split("---\n", 5)[5])
    run("policy", "apply", "-f", str(tmp_path / "p.yaml"))
    for fmt in ("yaml", "json"):
        before = state(etcd)
        shown = {kind: run("get", kind, "-o", fmt) for kind in KINDS}
        for kind, text in shown.items():
            assert all(verb.endswith(" unchanged") for verb in lines(run("apply", "-f", "-", stdin=text))), kind
            assert run("get", kind, "-o", fmt) == text
        assert state(etcd) == before
    h1 = yaml.safe_load(run("get", "node", "h1"))
    assert h1 == {
        "apiVersion": "netplugin/v1",
        "kind": "Node",
        "metadata": {"name": "h1", "labels": {"old": "x"}},
        "spec": {"routeReflector": False},
    }  # an autodetected address is the agent's, not shown
    assert yaml.safe_load(run("get", "bgpconfig", "default")) == {
        "apiVersion": "netplugin/v1",
        "kind": "BGPConfig",
        "metadata": {"name": "default"},
        "spec": {"asNumber": 65500, "mesh": True},
    }
    assert json.loads(run("get", "pool", "10.31.0.0/24", "-o", "json"))["spec"] == {
        "blockSize": 27,
        "natOutgoing": False,
        "disabled": True,
    }

    # A saved file restores what delete -f removed, record for record.
    saved = "---\n".join(run("get", kind) for kind in KINDS)
    values = {k: v for k, (v, _) in state(etcd).items()}
    (tmp_path / "all.yaml").write_text(saved)
    out = lines(run("delete", "-f", str(tmp_path / "all.yaml")))
    assert "pool 10.31.0.0/24 deleted" in out and "node h1 kept (a node's record belongs to its agent)" in out
    assert etcd.get(keys.pool("10.31.0.0/24")) is None and etcd.list(keys.POLICIES) == []
    assert ClusterConfig.from_dict(etcd.get(keys.CLUSTER_CONFIG).value) == ClusterConfig(reclaim_grace=30.0)
    run("apply", "-f", str(tmp_path / "all.yaml"))
    assert {k: v for k, (v, _) in state(etcd).items()} == values
    assert "---\n".join(run("get", kind) for kind in KINDS) == saved


def test_get_kind_words_and_namespaces(etcd, nodes, run, fails, tmp_path):
    (tmp_path / "c.yaml").write_text(EVERY_KIND)
    run("apply", "-f", str(tmp_path / "c.yaml"))

    def names(out):
        return [d["metadata"]["name"] for d in yaml.safe_load(out)["items"]]

    for word in ("policy", "policies", "Policy", "POLICIES", "pol"):
        assert names(run("get", word)) == ["deny-bad", "k8s.prod.web-allow"]
    for word in ("networkpolicy", "NetworkPolicies", "netpol"):
        assert names(run("get", word)) == ["k8s.prod.web-allow"]
    assert names(run("get", "policy", "-n", "prod")) == ["k8s.prod.web-allow"]
    assert names(run("get", "networkpolicy", "-n", "dev")) == []
    assert names(run("get", "ippool")) == names(run("get", "Pool")) == ["10.30.0.0/16", "fd00:30::/112"]
    assert names(run("get", "bgppeer")) == ["tor1"] and names(run("get", "node")) == ["h1", "h2"]
    one = yaml.safe_load(run("get", "networkpolicy", "web-allow", "-n", "prod"))
    assert (
        one
        == yaml.safe_load(run("get", "policy", "k8s.prod.web-allow"))
        == yaml.safe_load(run("policy", "get", "-n", "prod", "web-allow"))
    )
    fails("get", "pools", "-n", "prod", match="pool names have no namespace")
    fails("get", "widgets", match="unknown kind 'widgets' (one of: Policy, NetworkPolicy, Pool, BGPPeer")
    fails("get", "pool", "10.30.0.1/16", match="has host bits set; did you mean 10.30.0.0/16?")
    fails("get", "pool", "10.3.0.0/16", match="pool 10.3.0.0/16 does not exist; similar names: 10.30.0.0/16")
    fails("get", "node", "h12", match="node h12 is not registered; similar names: h2, h1")
    fails("get", "bgpconfig", "other", match="bgpconfig other does not exist; similar names")


# --- delete -f, -n, not-found ---------------------------------------------------------------------------------------


def test_delete_file_removes_everything_it_defines(etcd, nodes, run, fails, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(EVERY_KIND)
    untouched = state(etcd)
    run("apply", "-f", str(path))
    ipam = IPAM(etcd)
    ipam.auto_assign("c1", "h1")  # claims a block of 10.30.0.0/16 (and its affinity) ...
    ipam.release_handle("c1")  # ... which stays, empty
    assert etcd.list(keys.BLOCKS) and etcd.list(keys.affinity_prefix("h1"))
    assert lines(run("delete", "-f", str(path))) == [
        "pool 10.30.0.0/16 deleted",
        "pool fd00:30::/112 deleted",
        "peer tor1 deleted",
        "bgpconfig default reset to defaults",
        "node h1 kept (a node's record belongs to its agent)",
        "policy deny-bad deleted",
        "policy k8s.prod.web-allow deleted",
    ]
    after = state(etcd)
    assert not etcd.list(keys.BLOCKS) and not etcd.list(keys.AFFINITY)
    assert set(after) == set(untouched)  # only the node records and the cluster config are left
    assert ClusterConfig.from_dict(etcd.get(keys.CLUSTER_CONFIG).value) == ClusterConfig(reclaim_grace=30.0)
    line = fails("delete", "-f", str(path), match="cluster.yaml:3: pool 10.30.0.0/16 does not exist")
    assert line.endswith("(and 4 more that do not exist)")
    assert lines(run("delete", "--ignore-not-found", "-f", str(path))) == [
        "bgpconfig default unchanged",
        "node h1 kept (a node's record belongs to its agent)",
    ]
    assert state(etcd) == after


def test_delete_file_refuses_a_pool_in_use_and_deletes_nothing(etcd, nodes, run, fails, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(EVERY_KIND)
    run("apply", "-f", str(path))
    IPAM(etcd).auto_assign("c1", "h1", version=6)
    fails(
        "delete",
        "-f",
        str(path),
        match="cluster.yaml:8: pool fd00:30::/112 still has 1 allocated address(es); release them first",
    )
    run("ipam", "release", "--handle", "c1")
    assert "pool fd00:30::/112 deleted" in lines(run("delete", "-f", str(path)))


def test_policy_delete_by_file_namespace_and_similar_names(etcd, run, fails, tmp_path):
    np = tmp_path / "np.yaml"
    np.write_text(EVERY_KIND.split("---\n")[-1])
    assert run("policy", "apply", "-f", str(np)) == "policy k8s.prod.web-allow applied\n"
    fails(
        "policy",
        "delete",
        "web-allow",
        match="policy web-allow does not exist; similar names: k8s.prod.web-allow (-n prod web-allow)",
    )
    fails(
        "policy",
        "delete",
        "-n",
        "dev",
        "web-allow",
        match="policy k8s.dev.web-allow does not exist; similar names: k8s.prod.web-allow",
    )
    assert yaml.safe_load(run("policy", "get", "-n", "prod", "web-allow"))["metadata"]["name"] == "k8s.prod.web-allow"
    assert run("policy", "delete", "-n", "prod", "web-allow") == "policy k8s.prod.web-allow deleted\n"
    run("policy", "apply", "-f", str(np))
    assert run("policy", "delete", "-f", str(np)) == "policy k8s.prod.web-allow deleted\n"
    assert etcd.list(keys.POLICIES) == []
    fails("policy", "delete", "-f", str(np), match="np.yaml:3: policy k8s.prod.web-allow does not exist")
    assert run("policy", "delete", "--ignore-not-found", "-f", str(np)) == ""
    assert run("policy", "delete", "--ignore-not-found", "-n", "prod", "web-allow") == ""
    run("policy", "apply", "-f", "-", stdin=EVERY_KIND.split("---\n")[-2])
    fails("policy", "delete", "deny-bda", match="policy deny-bda does not exist; similar names: deny-bad")
    fails("policy", "delete", match="give a policy NAME or -f FILE")
    fails(
        "policy",
        "apply",
        "-f",
        "-",
        stdin=EVERY_KIND.split("---\n")[0],
        match='<stdin>:2: kind: "Pool" is not one of: NetworkPolicy, Policy (netctl apply -f takes it)',
    )


# --- refusals: one line, nothing written ----------------------------------------------------------------------------

DOC1 = "apiVersion: netplugin/v1\nkind: BGPPeer\nmetadata: {name: a}\nspec: {address: 192.0.2.10, asNumber: 65001}\n"
DOC2 = "apiVersion: netplugin/v1\nkind: Pool\nmetadata: {name: 10.40.0.0/24}\n"


@pytest.mark.parametrize(
    "third, error",
    [
        (
            "apiVersion: netplugin/v1\nkind: BGPPeer\nmetadata: {name: b}\nspec: {address: 192.0.2.300, asNumber: 1}\n",
            "f.yaml:13: spec.address: peer address '192.0.2.300' is not an IP address",
        ),
        (
            "apiVersion: netplugin/v1\nkind: BGPPeer\nmetadata: {name: b}\nspec: {address: 192.0.2.3, asNumber: 0}\n",
            "f.yaml:13: spec.asNumber: AS number 0 is out of range 1..4294967295",
        ),
        (
            "apiVersion: netplugin/v1\nkind: BGPPeer\nmetadata: {name: b}\nspec: {address: 192.0.2.3, asNumber: '1'}\n",
            'f.yaml:13: spec.asNumber: must be a whole number, not "1"',
        ),
        (
            "apiVersion: netplugin/v1\nkind: Pool\nmetadata: {name: 10.41.0.1/24}\n",
            "f.yaml:12: metadata.name: pool 10.41.0.1/24 has host bits set; did you mean 10.41.0.0/24?",
        ),
        (
            "apiVersion: netplugin/v1\nkind: Pool\nmetadata: {name: 10.41.0.0/24}\nspec: {blockSize: 8}\n",
            "f.yaml:13: spec.blockSize: block size /8 does not fit pool 10.41.0.0/24 (must be /24../32)",
        ),
        (
            "apiVersion: netplugin/v1\nkind: Pool\nmetadata: {name: 10.40.0.128/25}\n",
            "f.yaml:12: metadata.name: pool 10.40.0.128/25 overlaps existing pool 10.40.0.0/24",
        ),
        (
            "apiVersion: netplugin/v1\nkind: Pool\nmetadata: {name: 10.9.0.0/16}\n",
            "f.yaml:12: metadata.name: pool 10.9.0.0/16 overlaps existing pool 10.9.0.0/24",
        ),
        (
            "apiVersion: netplugin/v1\nkind: Pool\nmetadata: {name: 10.8.0.0/24}\nspec: {blockSize: 28}\n",
            "f.yaml:13: spec.blockSize: pool 10.8.0.0/24 already cuts /26 blocks; remove the pool and add it again",
        ),
        (
            "apiVersion: netplugin/v1\nkind: Node\nmetadata: {name: h9, labels: {a: b}}\n",
            "f.yaml:12: metadata.name: node h9 is not registered (its agent registers it when it starts)",
        ),
        (
            "apiVersion: netplugin/v1\nkind: Node\nmetadata: {name: h1, labels: {a: 1}}\n",
            "f.yaml:12: metadata.labels.a: must be a string, not 1 (quote it)",
        ),
        (
            "apiVersion: netplugin/v1\nkind: Node\nmetadata: {name: h1}\nspec: {reflector: true}\n",
            "f.yaml:13: spec.reflector: unknown field (expected one of: address, asNumber, routeReflector)",
        ),
        (
            "apiVersion: netplugin/v1\nkind: BGPConfig\nmetadata: {name: main}\nspec: {mesh: 'no'}\n",
            'f.yaml:12: metadata.name: "main" is not "default"',
        ),
        (
            "apiVersion: netplugin/v2\nkind: BGPConfig\nmetadata: {name: default}\n",
            'f.yaml:10: apiVersion: "netplugin/v2" is not netplugin/v1',
        ),
        (
            "apiVersion: netplugin/v1\nkind: Widget\nmetadata: {name: w}\n",
            'f.yaml:11: kind: "Widget" is not one of: BGPConfig, BGPPeer, NetworkPolicy, Node, Policy, Pool',
        ),
        (
            "apiVersion: netplugin/v1\nkind: BGPPeer\nmetadata: {name: a}\nspec: {address: 192.0.2.3, asNumber: 2}\n",
            'f.yaml:12: metadata.name: "a" is defined twice (first at line 3)',
        ),
        (
            "apiVersion: netplugin/v1\nkind: Policy\nmetadata: {name: p}\nspec: {selector: {}, ingress: [{action: drop}]}\n",
            'f.yaml:13: spec.ingress[0].action: "drop" is not one of allow, deny, log',
        ),
        ("kind: Pool\nmetadata: {name: [\n", "f.yaml:11: invalid YAML"),
    ],
)
def test_a_bad_third_document_writes_nothing(etcd, nodes, fails, tmp_path, third, error):
    IPAM(etcd).add_pool("10.9.0.0/24")
    IPAM(etcd).add_pool("10.8.0.0/24")
    path = tmp_path / "f.yaml"
    path.write_text(DOC1 + "---\n" + DOC2 + "---\n" + third)
    fails("apply", "-f", str(path), match=error)
    assert etcd.get(keys.bgp_peer("a")) is None and etcd.get(keys.pool("10.40.0.0/24")) is None


def test_unreadable_input_is_one_line(etcd, fails, tmp_path):
    fails("apply", "-f", str(tmp_path / "missing.yaml"), match="cannot read resource file")
    (tmp_path / "latin1.yaml").write_bytes(b"kind: caf\xe9\n")
    fails("delete", "-f", str(tmp_path / "latin1.yaml"), match="not UTF-8 text")
    fails("apply", "-f", "-", stdin="- just\n- a list\n", match="<stdin>:1: <document>: must be a mapping")


def test_more_than_one_transaction_holds_is_refused(etcd, fails):
    peers = "---\n".join(
        f"apiVersion: netplugin/v1\nkind: BGPPeer\nmetadata: {{name: p{i}}}\n"
        f"spec: {{address: 192.0.2.{i}, asNumber: 65000}}\n"
        for i in range(101)
    )
    fails(
        "apply",
        "-f",
        "-",
        stdin=peers,
        match="<stdin>: this needs 101 operations in one transaction, more than the 100 etcd takes: split the file",
    )


def test_get_skips_a_stored_record_that_does_not_decode_and_says_so(etcd, netctl, tmp_path):
    (tmp_path / "p.yaml").write_text(EVERY_KIND.split("---\n")[5])
    netctl("apply", "-f", str(tmp_path / "p.yaml"))
    etcd.put(
        keys.policy("broken"),
        {
            "apiVersion": "netplugin/v1",
            "kind": "Policy",
            "metadata": {"name": "broken"},
            "spec": {"selector": {}, "ingress": [{"action": "drop"}]},
        },
    )
    res = netctl("get", "policies")
    assert res.returncode == 0
    assert [d["metadata"]["name"] for d in yaml.safe_load(res.stdout)["items"]] == ["deny-bad"]
    assert res.stderr == "netctl: warning: skipped 1 stored record(s) that do not decode: broken\n"
    etcd.put(keys.pool("10.99.0.0/24"), {"block_size": 26})  # no cidr: written by something else
    res = netctl("get", "pools")
    assert res.returncode == 0 and yaml.safe_load(res.stdout)["items"] == []
    assert res.stderr == "netctl: warning: skipped 1 stored record(s) that do not decode: 10.99.0.0-24\n"
    res = netctl("get", "pool", "10.99.0.0/24")
    assert res.returncode == 1 and res.stderr.startswith("netctl: error: stored pool 10.99.0.0-24 does not decode")


def test_classic_commands_keep_their_checks(etcd, nodes, fails):
    fails(
        "bgp",
        "peer",
        "add",
        "t",
        "--address",
        "nonsense",
        "--as-number",
        "1",
        match="peer address 'nonsense' is not an IP address",
    )
    fails("bgp", "peer", "add", "t", "--address", "192.0.2.9", "--as-number", "0", match="AS number 0 is out of range")
    fails("bgp", "config", "--as-number", "4294967296", match="out of range 1..4294967295")
    fails("node", "set", "h1", "--address", "192.0.2.999", match="node address '192.0.2.999' is not an IP address")
    fails("pool", "add", "10.50.0.1/24", match="host bits")


# --- races: the guards hold against real concurrent writers -------------------------------------------------------


class _Interleaved:
    """The real datastore, with another writer's change made once between the snapshot and the transaction."""

    def __init__(self, ds, change):
        self.ds, self.change, self.txns = ds, change, 0

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def txn(self, compare, success, failure=()):
        if self.change and success:
            self.change, change = None, self.change
            change()
        self.txns += 1
        return self.ds.txn(compare, success, failure)


def test_a_concurrent_agent_registration_is_merged_not_lost(etcd, nodes):
    node_doc = EVERY_KIND.split("---\n")[4]
    racing = _Interleaved(
        etcd, lambda: nodes.register(Node(name="h1", address="192.0.2.111", address_autodetected=True))
    )
    results = writer.apply(racing, writer.load_text(node_doc, "n.yaml"))
    assert [verb for _, verb in results] == ["configured"] and racing.txns == 2  # the first lost, re-planned
    h1 = nodes.get("h1")
    assert h1.labels == {"rack": "r7", "zone": "a"} and h1.address == "192.0.2.11" and h1.route_reflector


def test_a_block_claimed_during_pool_delete_refuses_it(etcd, nodes):
    pool_doc = "apiVersion: netplugin/v1\nkind: Pool\nmetadata: {name: 10.60.0.0/24}\n"
    writer.apply(etcd, writer.load_text(pool_doc, "p.yaml"))
    racing = _Interleaved(etcd, lambda: IPAM(etcd).auto_assign("late", "h2"))
    with pytest.raises(InUse, match="p.yaml:3: pool 10.60.0.0/24 still has 1 allocated"):
        writer.delete(racing, writer.load_text(pool_doc, "p.yaml"))
    assert etcd.get(keys.pool("10.60.0.0/24")) and IPAM(etcd).get_handle("late")
