"""Policy YAML validation: every error names the field path and the file line; the model round-trips."""

import json
import textwrap

import pytest

from netplugin.errors import InvalidInput
from policy.loader import load_file, load_text
from policy.model import Policy
from policy.validation import PolicyValidationError

GOOD = textwrap.dedent("""\
    apiVersion: netplugin/v1
    kind: Policy
    metadata: {name: web-allow}
    spec:
      order: 100
      selector: {matchLabels: {app: web}, matchExpressions: [{key: tier, operator: In, values: [a, b]}]}
      types: [Ingress, Egress]
      ingress:
        - action: allow
          protocol: tcp
          ports: [80, "8000:8080"]
          from:
            - selector: {matchLabels: {role: client}}
            - network: frontend
            - cidr: 10.0.0.0/8
              notCIDR: [10.1.0.0/16]
      egress:
        - action: deny
          to: [{cidr: 192.0.2.0/24}]
    """)


def errors_of(text, source="policy.yaml"):
    with pytest.raises(PolicyValidationError) as err:
        load_text(text, source)
    return [str(p) for p in err.value.problems]


def one_error(text):
    errs = errors_of(text)
    assert len(errs) == 1, errs
    return errs[0]


def test_good_policy_parses_with_defaults_and_round_trips():
    [p] = load_text(GOOD)
    assert p.name == "web-allow" and p.order == 100 and p.types == ("Ingress", "Egress")
    rule = p.ingress[0]
    assert rule.action == "allow" and rule.protocol == "tcp" and rule.ports == ((80, 80), (8000, 8080))
    assert [peer.to_dict() for peer in rule.peers] == [
        {"selector": {"matchLabels": {"role": "client"}}},
        {"network": "frontend"},
        {"cidr": "10.0.0.0/8", "notCIDR": ["10.1.0.0/16"]},
    ]
    stored = json.loads(json.dumps(p.to_dict()))  # what etcd keeps
    assert Policy.from_dict(stored) == p
    assert Policy.from_dict(stored).to_dict() == stored


def test_defaults_order_and_types():
    [p] = load_text(GOOD.replace("  order: 100\n", "").replace("  types: [Ingress, Egress]\n", ""))
    assert p.order == 1000 and p.types == ("Ingress", "Egress")
    [q] = load_text(GOOD.split("  egress:")[0].replace("  types: [Ingress, Egress]\n", ""))
    assert q.types == ("Ingress",) and q.egress == ()


def test_the_example_error_from_the_brief():
    text = GOOD.replace('ports: [80, "8000:8080"]', 'ports: [80, "80x"]')
    assert one_error(text) == 'policy.yaml:11: spec.ingress[0].ports[1]: "80x" is not a port or range'


@pytest.mark.parametrize(
    "old,new,expected",
    [
        (
            "action: allow",
            "action: permit",
            'policy.yaml:9: spec.ingress[0].action: "permit" is not one of allow, deny, log',
        ),
        ("protocol: tcp", "protocol: gre-ish", 'policy.yaml:10: spec.ingress[0].protocol: "gre-ish" is not a protocol'),
        ("protocol: tcp", "protocol: 256", "policy.yaml:10: spec.ingress[0].protocol: 256 is not a protocol"),
        ("protocol: tcp", "protocol: 0", "policy.yaml:10: spec.ingress[0].protocol: 0 means every protocol"),
        (
            "protocol: tcp",
            "protocol: icmp",
            'policy.yaml:11: spec.ingress[0].ports: only apply to tcp, udp or sctp, not "icmp"',
        ),
        (
            '"8000:8080"',
            '"9000:8080"',
            'policy.yaml:11: spec.ingress[0].ports[1]: "9000:8080": the range\'s start is above',
        ),
        ('"8000:8080"', "70000", "policy.yaml:11: spec.ingress[0].ports[1]: 70000 is out of range 1-65535"),
        ("order: 100", "order: -1", "policy.yaml:5: spec.order: -1 is not a non-negative number"),
        ("order: 100", "order: high", 'policy.yaml:5: spec.order: "high" is not a non-negative number'),
        (
            "cidr: 10.0.0.0/8",
            "cidr: 10.0.0.1/8",
            'policy.yaml:15: spec.ingress[0].from[2].cidr: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)',
        ),
        (
            "cidr: 10.0.0.0/8",
            "cidr: 10.0.0.0/33",
            'policy.yaml:15: spec.ingress[0].from[2].cidr: "10.0.0.0/33" is not a CIDR',
        ),
        (
            "notCIDR: [10.1.0.0/16]",
            "notCIDR: [11.1.0.0/16]",
            'policy.yaml:16: spec.ingress[0].from[2].notCIDR[0]: "11.1.0.0/16" is not inside 10.0.0.0/8',
        ),
        (
            "network: frontend",
            "network: front end",
            'policy.yaml:14: spec.ingress[0].from[1].network: "front end" is not a valid network name',
        ),
        (
            "- network: frontend",
            "- {network: frontend, cidr: 10.0.0.0/8}",
            "policy.yaml:14: spec.ingress[0].from[1]: needs exactly one of selector, network, cidr (has network, cidr)",
        ),
        (
            "operator: In",
            "operator: Like",
            'policy.yaml:6: spec.selector.matchExpressions[0].operator: "Like" is not one of In, NotIn, Exists, DoesNotExist',
        ),
        (
            "values: [a, b]",
            "values: []",
            "policy.yaml:6: spec.selector.matchExpressions[0].values: operator In needs at least one value",
        ),
        (
            "{role: client}",
            "{role: yes}",
            "policy.yaml:13: spec.ingress[0].from[0].selector.matchLabels.role: must be a string label value, not true (quote it)",
        ),
        (
            "{role: client}",
            '{"-bad": x}',
            'policy.yaml:13: spec.ingress[0].from[0].selector.matchLabels.-bad: "-bad" is not a valid label key',
        ),
        (
            "types: [Ingress, Egress]",
            "types: [Ingress]",
            "policy.yaml:7: spec.types: egress rules are present but Egress is not in types",
        ),
        (
            "types: [Ingress, Egress]",
            "types: [Inbound]",
            'policy.yaml:7: spec.types[0]: "Inbound" is not Ingress or Egress',
        ),
        (
            "      from:",
            "      form:",
            "policy.yaml:12: spec.ingress[0].form: unknown field (expected one of: action, from, ports, protocol)",
        ),
        (
            "      to: [",
            "      from: [",
            "policy.yaml:19: spec.egress[0].from: egress rules name their peers under 'to'",
        ),
        (
            "metadata: {name: web-allow}",
            "metadata: {name: Web_Allow}",
            'policy.yaml:3: metadata.name: "Web_Allow" is not a valid name',
        ),
        (
            "apiVersion: netplugin/v1",
            "apiVersion: netplugin/v2",
            'policy.yaml:1: apiVersion: "netplugin/v2" is not netplugin/v1',
        ),
        ("kind: Policy", "kind: Policies", 'policy.yaml:2: kind: "Policies" is not Policy or NetworkPolicy'),
    ],
)
def test_each_error_names_field_and_line(old, new, expected):
    assert old in GOOD
    assert one_error(GOOD.replace(old, new, 1)).startswith(expected)


def test_missing_fields_point_at_the_enclosing_line():
    text = GOOD.replace(
        "  selector: {matchLabels: {app: web}, matchExpressions: [{key: tier, operator: In, values: [a, b]}]}\n", ""
    )
    assert one_error(text) == "policy.yaml:4: spec.selector: required (use {} to select every endpoint)"
    assert (
        one_error("apiVersion: netplugin/v1\nkind: Policy\nmetadata: {}\nspec: {selector: {}}\n")
        == "policy.yaml:3: metadata.name: required"
    )


def test_all_problems_are_reported_sorted_by_line():
    text = (
        GOOD.replace("action: allow", "action: permit")
        .replace('"8000:8080"', '"x"')
        .replace("cidr: 192.0.2.0/24", "cidr: nope")
    )
    errs = errors_of(text)
    assert [e.split(":")[1] for e in errs] == ["9", "11", "19"]
    with pytest.raises(PolicyValidationError) as err:
        load_text(text, "policy.yaml")
    assert str(err.value).endswith("(and 2 more problems)") and err.value.details.count("\n") == 2
    assert isinstance(err.value, InvalidInput)


def test_multiple_documents_lines_are_absolute_and_names_unique():
    second = GOOD.replace("web-allow", "second").replace('"8000:8080"', '"8000-8080"')
    text = GOOD + "---\n" + second + "---\n" + GOOD
    errs = errors_of(text)
    n = GOOD.count("\n")
    assert errs == [
        f'policy.yaml:{n + 1 + 11}: spec.ingress[0].ports[1]: "8000-8080" is not a port or range',
        f'policy.yaml:{2 * n + 2 + 3}: metadata.name: "web-allow" is defined twice (first at line 3)',
    ]
    assert [p.name for p in load_text(GOOD + "---\n" + GOOD.replace("web-allow", "two") + "---\n")] == [
        "web-allow",
        "two",
    ]


def test_yaml_traps_are_closed():
    # Unquoted 22:25 is a YAML 1.1 sexagesimal integer (1345); here it is the range it looks like.
    [p] = load_text(GOOD.replace('"8000:8080"', "22:25"))
    assert p.ingress[0].ports == ((22, 25), (80, 80))
    dup = GOOD.replace("  order: 100\n", "  order: 100\n  order: 5\n")
    assert one_error(dup) == "policy.yaml:6: spec.order: duplicate key (first at line 5)"


def test_yaml_syntax_error_and_unreadable_file(tmp_path):
    with pytest.raises(InvalidInput, match=r"^policy.yaml:3: invalid YAML"):
        load_text("a: b\nc: [d\ne: f\n", "policy.yaml")
    with pytest.raises(InvalidInput, match="cannot read policy file .*missing.yaml: No such file"):
        load_file(tmp_path / "missing.yaml")
    f = tmp_path / "p.yaml"
    f.write_text(GOOD.replace("80,", "80x,"))
    with pytest.raises(PolicyValidationError, match=rf"^{f}:11: spec.ingress\[0\].ports\[0\]"):
        load_file(f)


def test_non_mapping_documents_and_lists():
    assert one_error("- a\n- b\n").startswith("policy.yaml:1: <document>: must be a mapping")
    items = "apiVersion: v1\nkind: List\nitems:\n" + "\n".join(
        "- " + line if i == 0 else "  " + line for i, line in enumerate(GOOD.splitlines())
    )
    [p] = load_text(items)
    assert p.name == "web-allow"
    assert one_error(items.replace("80,", "80x,")).startswith("policy.yaml:14: items[0].spec.ingress[0].ports[0]")


def test_from_dict_errors_have_paths_without_lines():
    doc = {
        "apiVersion": "netplugin/v1",
        "kind": "Policy",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "ingress": [{"action": "allow", "ports": [80]}]},
    }
    with pytest.raises(PolicyValidationError) as err:
        Policy.from_dict(doc)
    assert str(err.value) == "spec.ingress[0].ports: need a protocol: tcp, udp or sctp"


def test_empty_peer_lists_and_ports_are_rejected_not_guessed():
    assert (
        one_error(GOOD.replace("to: [{cidr: 192.0.2.0/24}]", "to: []"))
        == "policy.yaml:19: spec.egress[0].to: is empty (omit it to match any peer)"
    )
    assert "is empty (omit it to match every port)" in one_error(GOOD.replace('[80, "8000:8080"]', "[]"))


def test_protocol_numbers_with_names_are_stored_by_name():
    [p] = load_text(GOOD.replace("protocol: tcp", "protocol: 6"))
    assert p.ingress[0].protocol == "tcp"
    [q] = load_text(GOOD.replace("protocol: tcp", "protocol: 47").replace('ports: [80, "8000:8080"]', ""))
    assert q.ingress[0].protocol == 47 and q.to_dict()["spec"]["ingress"][0]["protocol"] == 47
