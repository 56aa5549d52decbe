"""Label selectors: matching semantics, canonical form, validation."""

import pytest

from policy.selector import Requirement, Selector
from policy.validation import PolicyValidationError


def sel(d):
    return Selector.from_dict(d)


@pytest.mark.parametrize(
    "selector,labels,expected",
    [
        ({}, {}, True),
        ({}, {"any": "thing"}, True),
        ({"matchLabels": {"app": "web"}}, {"app": "web", "x": "y"}, True),
        ({"matchLabels": {"app": "web"}}, {"app": "db"}, False),
        ({"matchLabels": {"app": "web"}}, {}, False),
        ({"matchLabels": {"app": "web", "tier": "a"}}, {"app": "web"}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}, {"tier": "b"}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}, {"tier": "c"}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]}, {}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {"tier": "b"}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {"tier": "a"}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {}, True),  # as in k8s
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {"tier": ""}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, {}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, {"tier": "a"}, False),
        (
            {
                "matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}],
            },
            {"app": "web", "env": "prod"},
            True,
        ),
        (
            {
                "matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}],
            },
            {"app": "web", "env": "dev"},
            False,
        ),
    ],
)
def test_matching(selector, labels, expected):
    assert sel(selector).matches(labels) is expected


def test_canonical_form_merges_spellings():
    a = sel({"matchLabels": {"app": "web"}})
    b = sel({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]})
    assert a.key() == b.key() and a != b
    c = sel(
        {
            "matchExpressions": [
                {"key": "t", "operator": "In", "values": ["b", "a", "b"]},
                {"key": "app", "operator": "Exists"},
            ]
        }
    )
    d = sel(
        {
            "matchExpressions": [
                {"key": "app", "operator": "Exists"},
                {"key": "t", "operator": "In", "values": ["a", "b"]},
            ]
        }
    )
    assert c == d and c.key() == d.key()
    assert sel({}).key() == "[]" and sel({}).selects_all()


def test_round_trip_and_string():
    raw = {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}
    s = sel(raw)
    assert sel(s.to_dict()) == s and s.to_dict() == raw
    assert str(s) == "app in {web} && !has(env)"
    assert str(sel({})) == "all()"


def test_merged_is_and():
    s = sel({"matchLabels": {"app": "web"}}).merged(Selector.of({"k8s.namespace": "prod"}))
    assert s.matches({"app": "web", "k8s.namespace": "prod"})
    assert not s.matches({"app": "web", "k8s.namespace": "dev"})
    contradiction = Selector.of({"ns": "a"}).merged(Selector.of({"ns": "b"}))
    assert not contradiction.matches({"ns": "a"}) and not contradiction.matches({"ns": "b"})


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"matchLabels": {"app": 1}}, "selector.matchLabels.app: must be a string label value, not 1 (quote it)"),
        ({"matchLabels": {"a" * 64: "x"}}, "is not a valid label key"),
        ({"matchLabels": {"Bad_Prefix/app": "x"}}, 'is not a valid label key: bad prefix "Bad_Prefix"'),
        ({"matchLabels": {"app": "-x"}}, 'selector.matchLabels.app: "-x" is not a valid label value'),
        (
            {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
            "selector.matchExpressions[0].values: operator Exists takes no values",
        ),
        ({"matchExpressions": [{"operator": "Exists"}]}, "selector.matchExpressions[0].key: required"),
        ({"matchExpressions": {"key": "a"}}, "selector.matchExpressions: must be a list"),
        ({"matchLabel": {"a": "b"}}, "selector.matchLabel: unknown field"),
        ("app=web", 'selector: must be a mapping, not "app=web"'),
    ],
)
def test_validation(raw, message):
    with pytest.raises(PolicyValidationError) as err:
        sel(raw)
    assert message in str(err.value)


def test_prefixed_keys_are_fine():
    s = sel({"matchLabels": {"example.com/team": "a", "k8s.namespace": "prod", "k8s.ns.kubernetes.io/x": ""}})
    assert s.matches({"example.com/team": "a", "k8s.namespace": "prod", "k8s.ns.kubernetes.io/x": ""})
    assert Requirement("a", "In", ("x",)).matches({"a": "x"})
