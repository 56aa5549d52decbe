"""Kubernetes NetworkPolicy -> our Policy."""

import textwrap

import pytest

from policy.loader import load_text
from policy.validation import PolicyValidationError

NP = textwrap.dedent("""\
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata:
      name: db
      namespace: prod
      labels: {team: x}
      resourceVersion: "12"
    spec:
      podSelector: {matchLabels: {app: db}}
      policyTypes: [Ingress, Egress]
      ingress:
      - from:
        - podSelector: {matchLabels: {app: api}}
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}
          podSelector: {matchExpressions: [{key: role, operator: Exists}]}
        - namespaceSelector: {matchLabels: {team: blue}}
        - ipBlock: {cidr: 10.0.0.7/8, except: [10.2.0.0/16]}
        ports:
        - port: 5432
        - {protocol: UDP, port: 53, endPort: 54}
        - {protocol: TCP, port: 6432}
      egress:
      - to:
        - namespaceSelector: {}
    """)


def test_translation():
    [p] = load_text(NP)
    assert p.name == "k8s.prod.db" and p.order == 1000 and p.types == ("Ingress", "Egress")
    assert p.selector.to_dict() == {"matchLabels": {"app": "db", "k8s.namespace": "prod"}}
    tcp, udp = p.ingress
    assert (tcp.action, tcp.protocol, tcp.ports) == ("allow", "tcp", ((5432, 5432), (6432, 6432)))
    assert (udp.protocol, udp.ports) == ("udp", ((53, 54),))
    assert tcp.peers == udp.peers
    same_ns, ops, blue, block = (peer.to_dict() for peer in tcp.peers)
    assert same_ns == {"selector": {"matchLabels": {"app": "api", "k8s.namespace": "prod"}}}
    assert ops == {
        "selector": {
            "matchExpressions": [
                {"key": "k8s.namespace", "operator": "In", "values": ["ops"]},
                {"key": "role", "operator": "Exists"},
            ]
        }
    }
    assert blue == {"selector": {"matchExpressions": [{"key": "k8s.ns.team", "operator": "In", "values": ["blue"]}]}}
    assert block == {"cidr": "10.0.0.0/8", "notCIDR": ["10.2.0.0/16"]}
    [egress] = p.egress
    assert egress.protocol is None and egress.peers[0].to_dict() == {
        "selector": {"matchExpressions": [{"key": "k8s.namespace", "operator": "Exists"}]}
    }
    # Selected pods: in the namespace only.
    assert p.selector.matches({"app": "db", "k8s.namespace": "prod"})
    assert not p.selector.matches({"app": "db", "k8s.namespace": "dev"})


def test_defaults_and_empty_rules():
    [deny_all] = load_text(
        textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all}
        spec:
          podSelector: {}
          ingress: []
        """)
    )
    assert deny_all.name == "k8s.default.deny-all" and deny_all.types == ("Ingress",) and deny_all.ingress == ()
    assert deny_all.selector.to_dict() == {"matchLabels": {"k8s.namespace": "default"}}
    [empty_egress] = load_text(
        textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: e}
        spec: {podSelector: {}, egress: []}
        """)
    )
    assert empty_egress.types == ("Ingress",)  # no egress rules: not an egress policy (k8s defaulting)
    [allow_all] = load_text(
        textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow-all, namespace: web}
        spec:
          podSelector: {}
          ingress: [{}]
          egress: [{to: [], ports: [{protocol: SCTP}]}]
        """)
    )
    assert allow_all.types == ("Ingress", "Egress")
    [rule] = allow_all.ingress
    assert rule.peers is None and rule.protocol is None and rule.ports == ()
    [sctp] = allow_all.egress
    assert sctp.protocol == "sctp" and sctp.ports == () and sctp.peers is None


def test_translated_policy_round_trips_as_native():
    from policy.model import Policy

    [p] = load_text(NP)
    assert Policy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "old,new,expected",
    [
        (
            "port: 5432",
            "port: postgres",
            'policy.yaml:19: spec.ingress[0].ports[0].port: named port "postgres" is not supported',
        ),
        (
            "endPort: 54",
            "endPort: 50",
            "policy.yaml:20: spec.ingress[0].ports[1].endPort: 50 must be a port from 53 to 65535",
        ),
        (
            "protocol: UDP",
            "protocol: ICMP",
            'policy.yaml:20: spec.ingress[0].ports[1].protocol: "ICMP" is not TCP, UDP or SCTP',
        ),
        (
            "except: [10.2.0.0/16]",
            "except: [11.2.0.0/16]",
            'policy.yaml:17: spec.ingress[0].from[3].ipBlock.except[0]: "11.2.0.0/16" is not inside 10.0.0.0/8',
        ),
        (
            "- ipBlock: {",
            "- podSelector: {}\n      ipBlock: {",
            "policy.yaml:17: spec.ingress[0].from[3]: ipBlock cannot be combined",
        ),
        (
            "namespace: prod",
            "namespace: Prod",
            'policy.yaml:5: metadata.namespace: "Prod" is not a valid Kubernetes namespace',
        ),
        ("podSelector: {matchLabels: {app: db}}", "podSelecter: {}", "policy.yaml:9: spec.podSelecter: unknown field"),
        (
            "policyTypes: [Ingress, Egress]",
            "policyTypes: [Both]",
            'policy.yaml:10: spec.policyTypes[0]: "Both" is not Ingress or Egress',
        ),
        (
            "networking.k8s.io/v1",
            "networking.k8s.io/v1beta1",
            'policy.yaml:1: apiVersion: "networking.k8s.io/v1beta1" is not networking.k8s.io/v1',
        ),
    ],
)
def test_errors_name_field_and_line(old, new, expected):
    assert old in NP
    with pytest.raises(PolicyValidationError) as err:
        load_text(NP.replace(old, new, 1), "policy.yaml")
    assert any(str(problem).startswith(expected) for problem in err.value.problems), err.value.details


def test_mixed_documents():
    native = (
        "apiVersion: netplugin/v1\nkind: Policy\nmetadata: {name: native}\n"
        "spec: {order: 10, selector: {}, ingress: [{action: deny, protocol: icmp}]}\n"
    )
    policies = load_text(native + "---\n" + NP)
    assert [p.name for p in policies] == ["native", "k8s.prod.db"]
