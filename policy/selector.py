"""Kubernetes-style label selectors: ``matchLabels`` plus ``matchExpressions`` (In, NotIn, Exists, DoesNotExist).

All requirements must hold; the empty selector ``{}`` selects every endpoint. ``NotIn`` and ``DoesNotExist``
match endpoints that lack the key, as in Kubernetes. A selector has one canonical form (``key()``): ``matchLabels
{a: x}`` and ``matchExpressions [{key: a, operator: In, values: [x]}]`` are the same selector, so they share one
ipset.
"""

import functools
import json
import re
from dataclasses import dataclass

from policy.validation import FieldError, Problems, expect_list, expect_mapping, expect_str, reject_unknown, show

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def check_label_key(key, path):
    """``[prefix/]name`` as in Kubernetes: prefix a DNS subdomain (<= 253), name <= 63 alphanumerics, '-_.'."""
    expect_str(key, path, "a label key")
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise FieldError(path, f"{show(key)} is not a valid label key: bad prefix {show(prefix)}")
    if not name or len(name) > 63 or not _NAME.match(name):
        raise FieldError(
            path,
            f"{show(key)} is not a valid label key (at most 63 letters, digits, '-', '_', '.',"
            " starting and ending with a letter or digit, optionally after 'prefix/')",
        )
    return key


def check_label_value(value, path):
    expect_str(value, path, "a string label value")
    if value and (len(value) > 63 or not _NAME.match(value)):
        raise FieldError(
            path,
            f"{show(value)} is not a valid label value (at most 63 letters, digits, '-', '_',"
            " '.', starting and ending with a letter or digit)",
        )
    return value


@dataclass(frozen=True, order=True)
class Requirement:
    key: str
    operator: str
    values: tuple = ()

    def matches(self, labels):
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present

    def to_dict(self):
        out = {"key": self.key, "operator": self.operator}
        if self.operator in ("In", "NotIn"):
            out["values"] = list(self.values)
        return out

    def __str__(self):
        if self.operator == "Exists":
            return f"has({self.key})"
        if self.operator == "DoesNotExist":
            return f"!has({self.key})"
        op = "in" if self.operator == "In" else "not in"
        return f"{self.key} {op} {{{','.join(self.values)}}}"


@dataclass(frozen=True)
class Selector:
    """Immutable and hashable; ``match_labels`` is a sorted tuple of (key, value) pairs."""

    match_labels: tuple = ()
    match_expressions: tuple = ()

    @classmethod
    def from_dict(cls, value):
        """Validate a plain dict (e.g. from etcd); raises PolicyValidationError naming each bad field."""
        problems = Problems()
        sel = parse_selector(value, ("selector",), problems)
        problems.raise_if_any()
        return sel

    @classmethod
    def of(cls, labels=None, expressions=()):
        return cls(tuple(sorted((labels or {}).items())), tuple(sorted(expressions)))

    @functools.cached_property
    def _requirements(self):
        reqs = {Requirement(k, "In", (v,)) for k, v in self.match_labels}
        reqs.update(self.match_expressions)
        return tuple(sorted(reqs))

    def requirements(self):
        """The canonical requirement list: matchLabels become single-value ``In``; sorted, no duplicates."""
        return self._requirements

    def key(self):
        """Canonical text of the selector, for hashing into ipset names and for equality across spellings."""
        return json.dumps([r.to_dict() for r in self.requirements()], sort_keys=True, separators=(",", ":"))

    def matches(self, labels):
        labels = labels or {}
        return all(req.matches(labels) for req in self._requirements)

    def selects_all(self):
        return not self.match_labels and not self.match_expressions

    def merged(self, other):
        """Both selectors must hold (AND). Used to scope Kubernetes selectors to a namespace."""
        labels = dict(self.match_labels)
        exprs = set(self.match_expressions)
        for k, v in other.match_labels:
            if k in labels and labels[k] != v:
                # Contradiction: keep both as expressions so the result selects nothing, as it should.
                exprs.add(Requirement(k, "In", (v,)))
            else:
                labels[k] = v
        exprs.update(other.match_expressions)
        return Selector.of(labels, exprs)

    def to_dict(self):
        out = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [r.to_dict() for r in self.match_expressions]
        return out

    def __str__(self):
        return " && ".join(str(r) for r in self.requirements()) or "all()"


def parse_selector(value, path, problems):
    """A selector mapping at ``path`` -> Selector, or None after recording problems."""
    path = tuple(path)
    before = len(problems.items)
    if value is None:
        value = {}
    if problems.attempt(expect_mapping, value, path) is None:
        return None
    problems.items.extend(reject_unknown(value, ("matchLabels", "matchExpressions"), path))
    labels = {}
    raw_labels = value.get("matchLabels") or {}
    if problems.attempt(expect_mapping, raw_labels, path + ("matchLabels",)) is not None:
        for key, val in raw_labels.items():
            kpath = path + ("matchLabels", key)
            if (
                problems.attempt(check_label_key, key, kpath)
                and problems.attempt(check_label_value, val, kpath) is not None
            ):
                labels[key] = val
    exprs = []
    raw_exprs = value.get("matchExpressions") or []
    if problems.attempt(expect_list, raw_exprs, path + ("matchExpressions",)) is not None:
        for i, raw in enumerate(raw_exprs):
            req = problems.attempt(_parse_requirement, raw, path + ("matchExpressions", i))
            if req is not None:
                exprs.append(req)
    if len(problems.items) != before:
        return None
    return Selector.of(labels, exprs)


def _parse_requirement(raw, path):
    expect_mapping(raw, path)
    unknown = reject_unknown(raw, ("key", "operator", "values"), path)
    if unknown:
        raise unknown[0]
    if "key" not in raw:
        raise FieldError(path + ("key",), "required")
    key = check_label_key(raw["key"], path + ("key",))
    op = raw.get("operator")
    if op not in OPERATORS:
        raise FieldError(path + ("operator",), f"{show(op)} is not one of {', '.join(OPERATORS)}")
    values = raw.get("values")
    if op in ("In", "NotIn"):
        if not values:
            raise FieldError(path + ("values",), f"operator {op} needs at least one value")
        expect_list(values, path + ("values",))
        for i, v in enumerate(values):
            check_label_value(v, path + ("values", i))
        return Requirement(key, op, tuple(sorted(set(values))))
    if values:
        raise FieldError(path + ("values",), f"operator {op} takes no values")
    return Requirement(key, op, ())
