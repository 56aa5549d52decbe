"""The policy model: Policy -> Rules -> Peers, validated from plain dicts and serialized back to them.

A policy selects endpoints by labels and, for each direction it declares in ``types``, replaces the default
(see ``policy.compiler`` for the full semantics). ``Policy.from_dict`` accepts exactly what ``to_dict`` emits
(and what users write in YAML), so the same code validates CLI input and records read back from etcd.

Resource shape::

    apiVersion: netplugin/v1
    kind: Policy
    metadata: {name: web-allow}
    spec:
      order: 100                  # lower first; default 1000
      selector: {matchLabels: {app: web}}
      types: [Ingress, Egress]    # default: Ingress, plus Egress when egress rules are present
      ingress: [{action: allow, protocol: tcp, ports: [80, "8000:8080"], from: [{selector: {...}}]}]
      egress:  [{action: deny, to: [{cidr: 192.0.2.0/24, notCIDR: [192.0.2.0/28]}]}]
"""

import ipaddress
import re
from dataclasses import dataclass, field

from policy.selector import Selector, parse_selector
from policy.validation import FieldError, Problems, expect_list, expect_mapping, expect_str, reject_unknown, show

API_VERSION = "netplugin/v1"
KIND = "Policy"
DEFAULT_ORDER = 1000
ACTIONS = ("allow", "deny", "log")
DIRECTIONS = ("Ingress", "Egress")

# Protocol names we accept, with their IP protocol numbers; numbers with a name are stored as the name.
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
PORT_PROTOCOLS = ("tcp", "udp", "sctp")

_POLICY_NAME = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_PORT_RANGE = re.compile(r"^\s*(\d{1,5})\s*(?::\s*(\d{1,5})\s*)?$")


@dataclass(frozen=True)
class Endpoint:
    """A container interface as the compiler sees it.

    ``host_ifname`` is the host side of the veth (``np`` + 11 hex) and only matters for local endpoints;
    ``addresses`` are plain IPs ('10.0.0.5', 'fd00::5'; a '/32' or '/128' suffix is accepted).
    """

    id: str
    host_ifname: str
    addresses: list
    network: str
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Peer:
    """One source/destination: exactly one of selector, network, cidr (cidr may carry notCIDR exceptions)."""

    selector: Selector = None
    network: str = None
    cidr: str = None
    not_cidr: tuple = ()

    def to_dict(self):
        if self.selector is not None:
            return {"selector": self.selector.to_dict()}
        if self.network is not None:
            return {"network": self.network}
        out = {"cidr": self.cidr}
        if self.not_cidr:
            out["notCIDR"] = list(self.not_cidr)
        return out


@dataclass(frozen=True)
class Rule:
    """``peers`` None means any peer; ``ports`` is a tuple of (low, high) destination-port ranges."""

    action: str
    protocol: object = None
    ports: tuple = ()
    peers: tuple = None

    def to_dict(self, direction):
        out = {"action": self.action}
        if self.protocol is not None:
            out["protocol"] = self.protocol
        if self.ports:
            out["ports"] = [lo if lo == hi else f"{lo}:{hi}" for lo, hi in self.ports]
        if self.peers is not None:
            out["from" if direction == "Ingress" else "to"] = [p.to_dict() for p in self.peers]
        return out


@dataclass(frozen=True)
class Policy:
    name: str
    selector: Selector
    order: object = DEFAULT_ORDER
    types: tuple = ("Ingress",)
    ingress: tuple = ()
    egress: tuple = ()

    def rules(self, direction):
        return self.ingress if direction == "Ingress" else self.egress

    def to_dict(self):
        spec = {"order": self.order, "selector": self.selector.to_dict(), "types": list(self.types)}
        if self.ingress or "Ingress" in self.types:
            spec["ingress"] = [r.to_dict("Ingress") for r in self.ingress]
        if self.egress or "Egress" in self.types:
            spec["egress"] = [r.to_dict("Egress") for r in self.egress]
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": self.name}, "spec": spec}

    @classmethod
    def from_dict(cls, doc):
        """Validate a whole resource dict; raises PolicyValidationError listing every bad field."""
        problems = Problems()
        policy = parse_policy(doc, (), problems)
        problems.raise_if_any()
        return policy


def parse_policy(doc, path, problems):
    """A ``kind: Policy`` document at ``path`` -> Policy, or None after recording problems."""
    path = tuple(path)
    before = len(problems.items)
    if problems.attempt(expect_mapping, doc, path) is None:
        return None
    problems.items.extend(reject_unknown(doc, ("apiVersion", "kind", "metadata", "spec"), path))
    if doc.get("apiVersion") != API_VERSION:
        problems.add(path + ("apiVersion",), f"{show(doc.get('apiVersion'))} is not {API_VERSION}")
    if doc.get("kind") != KIND:
        problems.add(path + ("kind",), f"{show(doc.get('kind'))} is not {KIND}")
    name = problems.attempt(_parse_metadata, doc.get("metadata"), path + ("metadata",))
    spec = doc.get("spec")
    spath = path + ("spec",)
    if spec is None:
        problems.add(spath, "required")
        return None
    if problems.attempt(expect_mapping, spec, spath) is None:
        return None
    problems.items.extend(reject_unknown(spec, ("order", "selector", "types", "ingress", "egress"), spath))
    order = problems.attempt(_parse_order, spec.get("order", DEFAULT_ORDER), spath + ("order",))
    if "selector" not in spec:
        problems.add(spath + ("selector",), "required (use {} to select every endpoint)")
        selector = None
    else:
        selector = parse_selector(spec["selector"], spath + ("selector",), problems)
    rules = {}
    for direction, key in (("Ingress", "ingress"), ("Egress", "egress")):
        raw = spec.get(key)
        rules[direction] = ()
        if raw is None:
            continue
        if problems.attempt(expect_list, raw, spath + (key,)) is None:
            continue
        parsed = [parse_rule(r, direction, spath + (key, i), problems) for i, r in enumerate(raw)]
        rules[direction] = tuple(parsed)
    types = problems.attempt(_parse_types, spec, spath)
    if len(problems.items) != before:
        return None
    return Policy(
        name=name, selector=selector, order=order, types=types, ingress=rules["Ingress"], egress=rules["Egress"]
    )


def _parse_metadata(meta, path):
    if meta is None:
        raise FieldError(path, "required (with a name)")
    expect_mapping(meta, path)
    unknown = reject_unknown(meta, ("name",), path)
    if unknown:
        raise unknown[0]
    return check_policy_name(meta.get("name"), path + ("name",))


def check_policy_name(name, path):
    if name is None:
        raise FieldError(path, "required")
    expect_str(name, path)
    if len(name) > 253 or not _POLICY_NAME.match(name):
        raise FieldError(
            path,
            f"{show(name)} is not a valid name (lower-case letters, digits, '-', '.', '_';"
            " starting and ending with a letter or digit; at most 253)",
        )
    return name


def _parse_order(value, path):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise FieldError(path, f"{show(value)} is not a non-negative number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def _parse_types(spec, spath):
    path = spath + ("types",)
    raw = spec.get("types")
    if raw is None:
        return ("Ingress", "Egress") if spec.get("egress") else ("Ingress",)
    expect_list(raw, path)
    if not raw:
        raise FieldError(path, "must list Ingress, Egress or both (omit it for the default)")
    for i, t in enumerate(raw):
        if t not in DIRECTIONS:
            raise FieldError(path + (i,), f"{show(t)} is not Ingress or Egress")
    if len(set(raw)) != len(raw):
        raise FieldError(path, "lists a direction twice")
    for direction, key in (("Ingress", "ingress"), ("Egress", "egress")):
        if spec.get(key) and direction not in raw:
            raise FieldError(path, f"{key} rules are present but {direction} is not in types")
    return tuple(d for d in DIRECTIONS if d in raw)


def parse_rule(raw, direction, path, problems):
    """One ingress/egress rule. Ingress rules name peers under ``from``, egress rules under ``to``."""
    path = tuple(path)
    if problems.attempt(expect_mapping, raw, path) is None:
        return None
    peer_key = "from" if direction == "Ingress" else "to"
    wrong_key = "to" if direction == "Ingress" else "from"
    if wrong_key in raw:
        problems.add(path + (wrong_key,), f"{direction.lower()} rules name their peers under '{peer_key}'")
    problems.items.extend(
        reject_unknown(
            {k: v for k, v in raw.items() if k != wrong_key}, ("action", "protocol", "ports", peer_key), path
        )
    )
    action = raw.get("action")
    if action is None:
        problems.add(path + ("action",), f"required ({', '.join(ACTIONS)})")
    elif action not in ACTIONS:
        problems.add(path + ("action",), f"{show(action)} is not one of {', '.join(ACTIONS)}")
    before = len(problems.items)
    protocol = problems.attempt(parse_protocol, raw.get("protocol"), path + ("protocol",))
    ports = ()
    if raw.get("ports") is not None and len(problems.items) == before:  # no second error for a bad protocol
        ports = problems.attempt(_parse_ports, raw["ports"], protocol, raw.get("protocol"), path)
    peers = None
    if peer_key in raw:
        peers = _parse_peers(raw[peer_key], path + (peer_key,), problems)
    return Rule(action=action, protocol=protocol, ports=ports or (), peers=peers)


def parse_protocol(value, path):
    if value is None:
        return None
    if isinstance(value, bool):
        raise FieldError(path, f"{show(value)} is not a protocol")
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in PROTOCOLS:
            return lowered
        if lowered.isdigit():
            value = int(lowered)
        else:
            raise FieldError(path, f"{show(value)} is not a protocol ({', '.join(PROTOCOLS)} or a number 1-255)")
    if not isinstance(value, int) or not 0 <= value <= 255:
        raise FieldError(path, f"{show(value)} is not a protocol ({', '.join(PROTOCOLS)} or a number 1-255)")
    if value == 0:
        # iptables reads "-p 0" as "every protocol": a rule meant for HOPOPT would silently match everything.
        raise FieldError(path, "0 means every protocol to iptables; omit protocol to match every protocol")
    for name, number in PROTOCOLS.items():
        if number == value:
            return name
    return value


def _parse_ports(raw, protocol, raw_protocol, path):
    ppath = path + ("ports",)
    expect_list(raw, ppath)
    if not raw:
        raise FieldError(ppath, "is empty (omit it to match every port)")
    if protocol not in PORT_PROTOCOLS:
        if raw_protocol is None:
            raise FieldError(ppath, "need a protocol: tcp, udp or sctp")
        raise FieldError(ppath, f"only apply to tcp, udp or sctp, not {show(raw_protocol)}")
    out = []
    for i, item in enumerate(raw):
        out.append(parse_port(item, ppath + (i,)))
    return tuple(sorted(set(out)))


def parse_port(item, path):
    """80, "80" or "8000:8080" -> (low, high); ports are 1-65535."""
    bad = FieldError(path, f"{show(item)} is not a port or range")
    if isinstance(item, bool):
        raise bad
    if isinstance(item, int):
        lo = hi = item
    elif isinstance(item, str):
        m = _PORT_RANGE.match(item)
        if not m:
            raise bad
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
    else:
        raise bad
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        raise FieldError(path, f"{show(item)} is out of range 1-65535")
    if lo > hi:
        raise FieldError(path, f"{show(item)}: the range's start is above its end")
    return (lo, hi)


def _parse_peers(raw, path, problems):
    if problems.attempt(expect_list, raw, path) is None:
        return None
    if not raw:
        problems.add(path, "is empty (omit it to match any peer)")
        return None
    peers = []
    for i, item in enumerate(raw):
        peer = _parse_peer(item, path + (i,), problems)
        if peer is not None:
            peers.append(peer)
    return tuple(peers)


def _parse_peer(raw, path, problems):
    if problems.attempt(expect_mapping, raw, path) is None:
        return None
    problems.items.extend(reject_unknown(raw, ("selector", "network", "cidr", "notCIDR"), path))
    kinds = [k for k in ("selector", "network", "cidr") if k in raw]
    if len(kinds) != 1:
        problems.add(
            path, "needs exactly one of selector, network, cidr" + (f" (has {', '.join(kinds)})" if kinds else "")
        )
        return None
    if "notCIDR" in raw and kinds != ["cidr"]:
        problems.add(path + ("notCIDR",), "only goes with cidr")
        return None
    if kinds == ["selector"]:
        sel = parse_selector(raw["selector"], path + ("selector",), problems)
        return None if sel is None else Peer(selector=sel)
    if kinds == ["network"]:
        net = problems.attempt(check_network_name, raw["network"], path + ("network",))
        return None if net is None else Peer(network=net)
    cidr = problems.attempt(parse_cidr, raw["cidr"], path + ("cidr",))
    excepts = []
    raw_ex = raw.get("notCIDR") or []
    if problems.attempt(expect_list, raw_ex, path + ("notCIDR",)) is not None:
        for i, item in enumerate(raw_ex):
            ex = problems.attempt(parse_cidr, item, path + ("notCIDR", i))
            if ex is None or cidr is None:
                continue
            a, b = ipaddress.ip_network(cidr), ipaddress.ip_network(ex)
            if a.version != b.version or not b.subnet_of(a):
                problems.add(path + ("notCIDR", i), f"{show(item)} is not inside {cidr}")
                continue
            excepts.append(ex)
    if cidr is None or len(excepts) != len(raw_ex):
        return None
    ordered = sorted({ipaddress.ip_network(e) for e in excepts})
    return Peer(cidr=cidr, not_cidr=tuple(str(e) for e in ordered))


def check_network_name(name, path):
    expect_str(name, path, "a network name")
    if len(name) > 253 or not _NETWORK_NAME.match(name):
        raise FieldError(path, f"{show(name)} is not a valid network name")
    return name


def parse_cidr(value, path):
    """'10.0.0.0/8', '10.0.0.1' (a host) or an IPv6 network -> canonical text. Host bits set is an error."""
    expect_str(value, path, "a CIDR")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError:
        try:
            net = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise FieldError(path, f"{show(value)} is not a CIDR") from None
        raise FieldError(path, f"{show(value)} has host bits set (did you mean {net}?)") from None
