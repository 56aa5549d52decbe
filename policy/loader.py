"""Read policy YAML (one or many documents per file) into validated Policy objects, with line numbers.

Documents may be ``netplugin/v1 Policy``, Kubernetes ``networking.k8s.io/v1 NetworkPolicy`` (translated by
``policy.k8s``) or a ``v1 List`` of those (what ``kubectl get -o yaml`` prints). Nothing is returned unless every
document is valid: the error lists every problem as ``file:line: field.path: message``. ``load_resources`` is
the same loop for any kinds of document (``netctl apply -f`` reads pools, peers and nodes with it too).

YAML is composed to nodes (not loaded) so each value keeps its line. Two YAML 1.1 traps are closed on the way:
an unquoted ``22:25`` is a port range here, not the sexagesimal integer 1345, and duplicate keys are errors
instead of the last one silently winning.
"""

import datetime
import sys
from dataclasses import dataclass

import yaml

from netplugin.errors import InvalidInput
from policy import k8s
from policy.model import API_VERSION, KIND, parse_policy
from policy.validation import FieldError, PolicyValidationError, Problem, Problems, line_of, show, to_problems

_MAX_DEPTH = 64


def read_source(path, what="policy"):
    """The text of ``path`` (``-``: stdin) and the name errors give it; ``what`` says what was being read."""
    if path == "-":
        try:
            return sys.stdin.read(), "<stdin>"
        except UnicodeDecodeError as err:
            raise InvalidInput(f"cannot read {what} from stdin: not UTF-8 text ({err.reason})") from None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), str(path)
    except OSError as err:
        raise InvalidInput(f"cannot read {what} file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise InvalidInput(f"cannot read {what} file {path}: not UTF-8 text ({err.reason})") from None


def load_file(path):
    """All policies in a YAML file; raises InvalidInput (PolicyValidationError for content problems)."""
    return load_text(*read_source(path))


def load_text(text, source="<input>"):
    """All policies in YAML text; ``source`` names the input in error messages."""
    return load_resources(text, source, _parse_any, key=lambda p: p.name, name=lambda p: p.name).items


@dataclass
class Loaded:
    """Resources read from one input, with the line of every field so checks made later (against etcd) can
    point at the document too."""

    items: list
    paths: list  # the document path of each item
    marks: dict
    source: str

    def error(self, problems):
        """``problems`` (a Problems) as one PolicyValidationError: ``file:line: field: message``."""
        return _error(problems, self.marks, self.source)


def load_resources(text, source, parse, key, name):
    """Every resource in YAML text, each document (or ``List`` item) given to ``parse(doc, path, problems)``;
    none unless all are valid. Two documents with one ``key`` are an error naming the first one's line."""
    problems = Problems()
    items, paths = [], []
    marks = {}
    seen = {}
    for index, (doc, doc_marks) in enumerate(compose_documents(text, source)):
        marks.update(doc_marks)
        if doc is None:
            continue
        base = (index,)
        for path, item in _items(doc, base, problems):
            resource = parse(item, path, problems)
            if resource is None:
                continue
            if key(resource) in seen:
                problems.add(
                    path + ("metadata", "name"),
                    f"{show(name(resource))} is defined twice (first at line {seen[key(resource)]})",
                )
                continue
            seen[key(resource)] = line_of(marks, path + ("metadata", "name"))
            items.append(resource)
            paths.append(path)
    if problems.items:
        raise _error(problems, marks, source)
    return Loaded(items, paths, marks, source)


def _error(problems, marks, source):
    """Paths start with the document index, which is internal: the line says where, the path says what."""
    found = sorted(to_problems(problems.items, marks, source), key=lambda p: p.line)
    return PolicyValidationError([Problem(p.path[1:], p.msg, p.source, p.line) for p in found])


def _items(doc, base, problems):
    """A document, or each item of a ``kind: List``."""
    if isinstance(doc, dict) and doc.get("kind") in ("List", "PolicyList", "NetworkPolicyList"):
        items = doc.get("items")
        if not isinstance(items, list):
            problems.add(base + ("items",), "must be a list of policies")
            return
        for i, item in enumerate(items):
            yield base + ("items", i), item
    else:
        yield base, doc


def _parse_any(doc, path, problems):
    if not isinstance(doc, dict):
        problems.add(path, f"must be a mapping with apiVersion, kind, metadata and spec, not {show(doc)}")
        return None
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if kind == KIND:
        return parse_policy(doc, path, problems)
    if kind == k8s.KIND:
        return k8s.translate(doc, path, problems)
    if kind is None:
        problems.add(
            path + ("kind",),
            f"required ({KIND} with apiVersion {API_VERSION}, or {k8s.KIND} with apiVersion {k8s.API_VERSION})",
        )
    else:
        problems.add(path + ("kind",), f"{show(kind)} is not {KIND} or {k8s.KIND} (apiVersion {show(api)})")
    return None


def compose_documents(text, source):
    """Yield (plain value, {path: line}) per YAML document; paths start with the document index."""
    try:
        nodes = list(yaml.compose_all(text, Loader=_COMPOSER))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        last = max(1, len(text.splitlines()))  # libyaml puts "unexpected end" on the line after the last
        line = f"{min(mark.line + 1, last)}:" if mark else ""
        raise InvalidInput(f"{source}:{line} invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise InvalidInput(f"{source}: invalid YAML: {err}") from None
    for index, node in enumerate(nodes):
        marks = {}
        problems = Problems()
        value = None if node is None else _to_python(node, (index,), marks, problems, 0)
        if problems.items:
            raise _error(problems, marks, source)
        yield value, marks


_constructor = yaml.SafeLoader("")
# libyaml's parser when PyYAML was built with it (same nodes and marks, about 3x faster on a 10,000-CIDR file).
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"


def _to_python(node, path, marks, problems, depth):
    marks.setdefault(path, node.start_mark.line + 1)
    if depth > _MAX_DEPTH:
        problems.add(path, "nested too deeply (a recursive YAML alias?)")
        return None
    if isinstance(node, yaml.ScalarNode):
        if node.tag == _STR_TAG:
            return node.value  # the common case, without the constructor's bookkeeping
        value = _constructor.construct_object(node, deep=True)
        if not node.style and isinstance(value, (int, float)) and ":" in node.value:  # plain: None, or '' (libyaml)
            return node.value  # YAML 1.1 sexagesimal: "22:25" is a port range to us
        if isinstance(value, (datetime.date, datetime.datetime, bytes)):
            return node.value
        return value
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(child, path + (i,), marks, problems, depth + 1) for i, child in enumerate(node.value)]
    out = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            problems.add(path, f"line {key_node.start_mark.line + 1}: mapping keys must be plain text")
            continue
        key = key_node.value if key_node.tag == "tag:yaml.org,2002:merge" else _constructor.construct_object(key_node)
        if key_node.tag == "tag:yaml.org,2002:merge":
            problems.add(path + (key,), "YAML merge keys ('<<') are not supported")
            continue
        if not isinstance(key, str):
            key = key_node.value  # e.g. "80: x" or "on:" read as text; validation then judges the name
        kpath = path + (key,)
        if key in out:
            problems.items.append(
                FieldError(kpath, f"duplicate key (first at line {marks[kpath]})", line=key_node.start_mark.line + 1)
            )
            continue
        marks[kpath] = key_node.start_mark.line + 1
        out[key] = _to_python(value_node, kpath, marks, problems, depth + 1)
    return out
