"""Translate a Kubernetes ``networking.k8s.io/v1 NetworkPolicy`` into our Policy model.

Mapping (endpoints created for Kubernetes pods are expected to carry the labels on the right):

=================================================  ==========================================================
NetworkPolicy                                      netplugin Policy
=================================================  ==========================================================
metadata.name ``N``, metadata.namespace ``NS``     name ``k8s.NS.N`` (namespace defaults to ``default``)
(no order in Kubernetes)                           order 1000 (the default; lower-order native policies,
                                                   including deny rules, come first)
spec.podSelector ``S``                             selector ``S`` AND ``k8s.namespace=NS``
spec.policyTypes                                   types (same default: Ingress, plus Egress when egress
                                                   rules are present)
each ingress/egress rule                           ``allow`` rules: one per protocol named in ``ports``
                                                   (one protocol-less rule when ``ports`` is absent)
ports ``{protocol: P, port: X, endPort: Y}``       protocol ``p`` (lower case, TCP when absent), port
                                                   ``X`` or range ``"X:Y"``; an entry without ``port``
                                                   opens every port of its protocol. Named ports are
                                                   rejected: endpoints carry no port names.
``from``/``to`` absent or ``[]``                   any peer
peer ``{podSelector: S}``                          selector ``S`` AND ``k8s.namespace=NS``
peer ``{namespaceSelector: T}``                    selector ``T'`` (below): every pod in those namespaces
peer ``{namespaceSelector: T, podSelector: S}``    selector ``S`` AND ``T'``
peer ``{ipBlock: {cidr: C, except: [E...]}}``      ``{cidr: C, notCIDR: [E...]}`` (host bits are cleared)
=================================================  ==========================================================

The CNI plugin records a pod's namespace (``K8S_POD_NAMESPACE``) as the endpoint label ``netplugin.io/namespace``;
``policy_labels`` shows it to selectors as ``k8s.namespace`` as well, so translated policies select CNI pods.

``T'``: namespace label ``kubernetes.io/metadata.name`` becomes ``k8s.namespace``; any other namespace label
``K`` becomes the endpoint label ``k8s.ns.K`` (Calico's ``pcns.`` idea), so the CNI copies namespace labels
onto the endpoint under that prefix. An empty namespaceSelector ``{}`` becomes ``k8s.namespace`` Exists (every
Kubernetes pod). The result has Kubernetes semantics because ours are a superset: a selected endpoint's
declared directions are default-deny, and every translated rule allows.
"""

import ipaddress
import re

from policy.model import DEFAULT_ORDER, DIRECTIONS, Peer, Policy, Rule
from policy.selector import Requirement, Selector, check_label_key, parse_selector
from policy.validation import FieldError, expect_list, expect_mapping, expect_str, reject_unknown, show

API_VERSION = "networking.k8s.io/v1"
KIND = "NetworkPolicy"
NAMESPACE_LABEL = "k8s.namespace"
NAMESPACE_LABEL_PREFIX = "k8s.ns."
CNI_NAMESPACE_LABEL = "netplugin.io/namespace"  # cni/plugin.py LABEL_NAMESPACE
K8S_NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


def policy_labels(labels):
    """An endpoint's labels as selectors see them: the pod namespace the CNI recorded also as ``k8s.namespace``.

    The CNI's label comes from the runtime (kubelet's ``K8S_POD_NAMESPACE``), so it wins over a ``k8s.namespace``
    label given another way.
    """
    out = dict(labels or {})
    namespace = out.get(CNI_NAMESPACE_LABEL)
    if namespace:
        out[NAMESPACE_LABEL] = namespace
    return out


def policy_name(namespace, name):
    return f"k8s.{namespace}.{name}"


def translate(doc, path, problems):
    """A NetworkPolicy document at ``path`` -> Policy, or None after recording problems."""
    path = tuple(path)
    before = len(problems.items)
    problems.items.extend(reject_unknown(doc, ("apiVersion", "kind", "metadata", "spec", "status"), path))
    if doc.get("apiVersion") != API_VERSION:
        problems.add(path + ("apiVersion",), f"{show(doc.get('apiVersion'))} is not {API_VERSION}")
    meta = problems.attempt(_metadata, doc.get("metadata"), path + ("metadata",))
    spec = doc.get("spec")
    spath = path + ("spec",)
    if problems.attempt(expect_mapping, spec, spath) is None:
        return None
    problems.items.extend(reject_unknown(spec, ("podSelector", "policyTypes", "ingress", "egress"), spath))
    if meta is None:
        return None
    name, namespace = meta
    in_namespace = Selector.of({NAMESPACE_LABEL: namespace})
    if "podSelector" not in spec:
        problems.add(spath + ("podSelector",), "required (use {} for every pod in the namespace)")
        return None
    pods = parse_selector(spec["podSelector"], spath + ("podSelector",), problems)
    rules = {}
    for direction, key, peer_key in (("Ingress", "ingress", "from"), ("Egress", "egress", "to")):
        rules[direction] = []
        raw = spec.get(key)
        if raw is None or problems.attempt(expect_list, raw, spath + (key,)) is None:
            continue
        for i, item in enumerate(raw):
            translated = problems.attempt(_rule, item, peer_key, in_namespace, namespace, spath + (key, i), problems)
            rules[direction].extend(translated or [])
    types = problems.attempt(_types, spec, spath + ("policyTypes",))
    if len(problems.items) != before or pods is None:
        return None
    return Policy(
        name=policy_name(namespace, name),
        selector=pods.merged(in_namespace),
        order=DEFAULT_ORDER,
        types=types,
        ingress=tuple(rules["Ingress"]),
        egress=tuple(rules["Egress"]),
    )


def _metadata(meta, path):
    expect_mapping(meta, path)
    name = meta.get("name")
    if name is None:
        raise FieldError(path + ("name",), "required")
    namespace = meta.get("namespace", "default")
    expect_str(name, path + ("name",))
    expect_str(namespace, path + ("namespace",))
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise FieldError(path + ("name",), f"{show(name)} is not a valid Kubernetes name")
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise FieldError(path + ("namespace",), f"{show(namespace)} is not a valid Kubernetes namespace")
    if len(policy_name(namespace, name)) > 253:
        raise FieldError(path + ("name",), "namespace and name together are too long (over 253)")
    return name, namespace


def _types(spec, path):
    raw = spec.get("policyTypes")
    if raw is None:
        return ("Ingress", "Egress") if spec.get("egress") else ("Ingress",)  # as the API server defaults
    expect_list(raw, path)
    for i, t in enumerate(raw):
        if t not in DIRECTIONS:
            raise FieldError(path + (i,), f"{show(t)} is not Ingress or Egress")
    if not raw:
        raise FieldError(path, "is empty")
    return tuple(d for d in DIRECTIONS if d in raw)


def _rule(raw, peer_key, in_namespace, namespace, path, problems):
    """One Kubernetes rule -> our allow rules (one per protocol)."""
    if raw is None:
        raw = {}
    expect_mapping(raw, path)
    unknown = reject_unknown(raw, (peer_key, "ports"), path)
    if unknown:
        raise unknown[0]
    peers = None
    raw_peers = raw.get(peer_key)
    if raw_peers:
        expect_list(raw_peers, path + (peer_key,))
        peers = tuple(_peer(p, in_namespace, path + (peer_key, i), problems) for i, p in enumerate(raw_peers))
        if any(p is None for p in peers):
            return None
    by_protocol = {}
    raw_ports = raw.get("ports")
    if raw_ports:
        expect_list(raw_ports, path + ("ports",))
        for i, entry in enumerate(raw_ports):
            proto, rng = _port(entry, path + ("ports", i))
            ranges = by_protocol.setdefault(proto, set())
            if rng is None:
                ranges.add(None)  # every port of this protocol
            else:
                ranges.add(rng)
    if not by_protocol:
        return [Rule(action="allow", peers=peers)]
    out = []
    for proto in sorted(by_protocol):
        ranges = by_protocol[proto]
        ports = () if None in ranges else tuple(sorted(ranges))
        out.append(Rule(action="allow", protocol=proto, ports=ports, peers=peers))
    return out


def _port(entry, path):
    expect_mapping(entry, path)
    unknown = reject_unknown(entry, ("protocol", "port", "endPort"), path)
    if unknown:
        raise unknown[0]
    raw_proto = entry.get("protocol", "TCP")
    if raw_proto not in _PROTOCOLS:
        raise FieldError(path + ("protocol",), f"{show(raw_proto)} is not TCP, UDP or SCTP")
    proto = _PROTOCOLS[raw_proto]
    port = entry.get("port")
    end = entry.get("endPort")
    if port is None:
        if end is not None:
            raise FieldError(path + ("endPort",), "needs port")
        return proto, None
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, str):
        raise FieldError(path + ("port",), f"named port {show(port)} is not supported; use the port number")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise FieldError(path + ("port",), f"{show(port)} is not a port (1-65535)")
    if end is None:
        return proto, (port, port)
    if isinstance(end, bool) or not isinstance(end, int) or not port <= end <= 65535:
        raise FieldError(path + ("endPort",), f"{show(end)} must be a port from {port} to 65535")
    return proto, (port, end)


def _peer(raw, in_namespace, path, problems):
    expect_mapping(raw, path)
    unknown = reject_unknown(raw, ("podSelector", "namespaceSelector", "ipBlock"), path)
    if unknown:
        raise unknown[0]
    if "ipBlock" in raw:
        if len(raw) > 1:
            raise FieldError(path, "ipBlock cannot be combined with podSelector or namespaceSelector")
        return _ip_block(raw["ipBlock"], path + ("ipBlock",))
    if not raw:
        raise FieldError(path, "needs podSelector, namespaceSelector or ipBlock")
    pods = Selector()
    if "podSelector" in raw:
        pods = parse_selector(raw["podSelector"], path + ("podSelector",), problems)
        if pods is None:
            return None
    if "namespaceSelector" not in raw:
        return Peer(selector=pods.merged(in_namespace))
    namespaces = parse_selector(raw["namespaceSelector"], path + ("namespaceSelector",), problems)
    if namespaces is None:
        return None
    return Peer(selector=pods.merged(_namespace_selector(namespaces, path + ("namespaceSelector",))))


def _namespace_selector(sel, path):
    """Namespace labels -> endpoint labels (see the module docstring)."""
    if sel.selects_all():
        return Selector.of(expressions=[Requirement(NAMESPACE_LABEL, "Exists")])
    exprs = []
    for req in sel.requirements():
        key = NAMESPACE_LABEL if req.key == K8S_NAMESPACE_NAME_LABEL else NAMESPACE_LABEL_PREFIX + req.key
        check_label_key(key, path)
        exprs.append(Requirement(key, req.operator, req.values))
    return Selector.of(expressions=exprs)


def _ip_block(raw, path):
    expect_mapping(raw, path)
    unknown = reject_unknown(raw, ("cidr", "except"), path)
    if unknown:
        raise unknown[0]
    cidr = _loose_cidr(raw.get("cidr"), path + ("cidr",))
    excepts = set()
    for i, item in enumerate(expect_list(raw.get("except") or [], path + ("except",))):
        ex = _loose_cidr(item, path + ("except", i))
        if ex.version != cidr.version or not ex.subnet_of(cidr):
            raise FieldError(path + ("except", i), f"{show(item)} is not inside {cidr}")
        excepts.add(ex)
    return Peer(cidr=str(cidr), not_cidr=tuple(str(e) for e in sorted(excepts)))


def _loose_cidr(value, path):
    """Kubernetes accepts host bits in ipBlock; clear them rather than reject existing manifests."""
    if value is None:
        raise FieldError(path, "required")
    expect_str(value, path, "a CIDR")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise FieldError(path, f"{show(value)} is not a CIDR") from None
