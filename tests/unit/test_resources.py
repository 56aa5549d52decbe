"""The resource-kind table without etcd: documents -> records -> documents, kind words, similar names, the pool
block-key range guard's prefix."""

import random

import netaddr
import pytest
import yaml

from netplugin.datastore import keys
from netplugin.datastore.models import Node, Pool
from netplugin.errors import InvalidInput
from netplugin.resources.kinds import KINDS, POLICY_KINDS, NodeSettings, kind_named
from netplugin.resources.writer import load_text
from policy.validation import PolicyValidationError

DOCS = [
    {
        "apiVersion": "netplugin/v1",
        "kind": "Pool",
        "metadata": {"name": "10.1.0.0/16"},
        "spec": {"blockSize": 27, "natOutgoing": True, "disabled": False},
    },
    {
        "apiVersion": "netplugin/v1",
        "kind": "BGPPeer",
        "metadata": {"name": "tor"},
        "spec": {"address": "2001:db8::1", "asNumber": 4200000000, "node": "h1", "password": "pw"},
    },
    {
        "apiVersion": "netplugin/v1",
        "kind": "BGPConfig",
        "metadata": {"name": "default"},
        "spec": {"asNumber": 65000, "mesh": False},
    },
    {
        "apiVersion": "netplugin/v1",
        "kind": "Node",
        "metadata": {"name": "h1", "labels": {"rack": "7"}},
        "spec": {"routeReflector": True, "address": "192.0.2.1", "asNumber": 65001},
    },
    {
        "apiVersion": "netplugin/v1",
        "kind": "Policy",
        "metadata": {"name": "p"},
        "spec": {
            "order": 5,
            "selector": {"matchLabels": {"a": "b"}},
            "types": ["Ingress"],
            "ingress": [{"action": "allow", "protocol": "tcp", "ports": [80, "8000:8080"]}],
        },
    },
]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d["kind"])
def test_a_document_comes_back_as_it_went_in(doc):
    [res] = load_text(yaml.safe_dump(doc), "t.yaml").items
    assert res.kind.kind == doc["kind"] and res.kind.document(res.record) == doc


def test_defaults_of_short_documents():
    text = "\n---\n".join(
        f"apiVersion: netplugin/v1\nkind: {kind}\nmetadata: {{name: {name}}}"
        for kind, name in (
            ("Pool", "10.2.0.0/16"),
            ("Pool", "10.3.0.0/28"),
            ("Pool", "'fd00:3::/64'"),
            ("BGPConfig", "default"),
            ("Node", "h1"),
        )
    )
    pools = [r.record for r in load_text(text, "t.yaml").items[:3]]
    assert pools == [Pool("10.2.0.0/16", 26), Pool("10.3.0.0/28", 28), Pool("fd00:3::/64", 122)]
    config, node = (r.kind.document(r.record)["spec"] for r in load_text(text, "t.yaml").items[3:])
    assert config == {"asNumber": 64512, "mesh": True} and node == {"routeReflector": False}


def test_a_kubernetes_policy_is_named_and_shown_as_its_translation():
    text = (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: api, namespace: prod}\n"
        "spec: {podSelector: {}}\n"
    )
    [res] = load_text(text, "np.yaml").items
    assert res.name == "k8s.prod.api" and res.key == keys.policy("k8s.prod.api")
    shown = res.kind.document(res.record)
    assert shown["kind"] == "Policy" and load_text(yaml.safe_dump(shown), "x").items[0].record == res.record


def test_restricted_kinds_and_shapes():
    with pytest.raises(
        PolicyValidationError,
        match=r'p\.yaml:2: kind: "Pool" is not one of: NetworkPolicy, '
        r"Policy \(netctl apply -f takes it\)",
    ):
        load_text(yaml.safe_dump(DOCS[0], sort_keys=True), "p.yaml", POLICY_KINDS)
    with pytest.raises(PolicyValidationError, match=r"x:1: kind: required \(one of: BGPConfig, BGPPeer, "):
        load_text("metadata: {name: a}\n", "x")
    with pytest.raises(PolicyValidationError, match=r"x:3: metadata\.name: required"):
        load_text("apiVersion: netplugin/v1\nkind: Pool\nmetadata: {}\n", "x")
    with pytest.raises(PolicyValidationError, match=r"x:4: spec\.cidr: unknown field"):
        load_text("apiVersion: netplugin/v1\nkind: Pool\nmetadata: {name: 10.0.0.0/8}\nspec: {cidr: x}\n", "x")


def test_every_problem_of_a_document_is_counted():
    doc = (
        "apiVersion: netplugin/v1\nkind: BGPPeer\nmetadata: {name: t}\n"
        "spec: {address: nowhere, asNumber: true, colour: red}\n"
    )
    with pytest.raises(PolicyValidationError) as err:
        load_text(doc, "b.yaml")
    assert [str(p) for p in err.value.problems] == [
        "b.yaml:4: spec.colour: unknown field (expected one of: address, asNumber, node, password)",
        "b.yaml:4: spec.address: peer address 'nowhere' is not an IP address",
        "b.yaml:4: spec.asNumber: must be a whole number, not true",
    ]


def test_kind_words():
    for words, kind in (
        (("policy", "Policies", "POL"), "Policy"),
        (("networkpolicy", "netpol"), "NetworkPolicy"),
        (("pool", "pools", "IPPool"), "Pool"),
        (("bgppeer", "peers"), "BGPPeer"),
        (("bgpconfig", "BGPConfiguration"), "BGPConfig"),
        (("node", "Nodes"), "Node"),
    ):
        assert {kind_named(w).kind for w in words} == {kind}
    with pytest.raises(InvalidInput, match="unknown kind 'pods'"):
        kind_named("pods")


def test_similar_names_name_the_kubernetes_form_first():
    policy = KINDS[0]
    names = ["k8s.prod.web", "k8s.dev.web", "web-allow", "k8s.prod.webx", "db"]
    assert policy.similar("web", names) == ["k8s.prod.web (-n prod web)", "k8s.dev.web (-n dev web)"]
    assert policy.similar("web-alow", names) == ["web-allow"]
    assert policy.similar("zzz", names) == []
    assert policy.full_name("web", "prod") == "k8s.prod.web" and policy.full_name("web", None) == "web"
    assert KINDS[1].full_name("web", None) == "k8s.default.web"
    with pytest.raises(InvalidInput, match="pool names have no namespace"):
        kind_named("pool").full_name("10.0.0.0/8", "prod")


def test_node_settings_leave_what_the_agent_owns():
    registered = Node(
        name="h1",
        address="192.0.2.1",
        address6="2001:db8::1",
        address_autodetected=True,
        labels={"old": "x"},
        as_number=65001,
    )
    merged = NodeSettings(name="h1", labels={"new": "y"}).merged_into(registered)
    assert merged == Node(
        name="h1", address="192.0.2.1", address6="2001:db8::1", address_autodetected=True, labels={"new": "y"}
    )
    pinned = NodeSettings(name="h1", address="192.0.2.9").merged_into(registered)
    assert (pinned.address, pinned.address_autodetected) == ("192.0.2.9", False)
    assert registered.labels == {"old": "x"}  # merging copies


def test_pool_blocks_prefix_covers_every_block_of_the_pool():
    rnd = random.Random(7)
    for _ in range(2000):
        version = rnd.choice((4, 6))
        bits = 32 if version == 4 else 128
        if version == 4:
            value = rnd.getrandbits(32)
        else:  # zero groups are where IPv6 text compresses
            value = 0
            for _ in range(8):
                value = (value << 16) | rnd.choice((0, 0, 1, 0xFD00, rnd.getrandbits(16)))
        pool = netaddr.IPNetwork((value, rnd.randint(0, bits)), version=version).cidr
        prefix = keys.pool_blocks_prefix(str(pool))
        size = rnd.randint(pool.prefixlen, bits)
        for _ in range(4):
            block = netaddr.IPNetwork(f"{netaddr.IPAddress(rnd.randint(pool.first, pool.last), version)}/{size}")
            assert keys.block(str(block.cidr)).startswith(prefix), (pool, prefix, block)
    assert keys.pool_blocks_prefix("10.10.0.0/16") == keys.BLOCKS + "10.10."
    assert keys.pool_blocks_prefix("fd00:10::/112") == keys.BLOCKS + "fd00:10:"
