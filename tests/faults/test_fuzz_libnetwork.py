"""Fuzzing the Docker plugin of a live agent: libnetwork requests as dockerd sends them, then mutated.

One real agent (``--docker-socket``) runs in a test host namespace against the session's etcd; the test talks
HTTP over its unix socket exactly as dockerd does. Each generated example is a short sequence of calls drawn
against what earlier calls created (pools, addresses, networks, endpoints, joins), in any order and repeated,
each body either valid or mutated: fields dropped or replaced by junk of any JSON type, huge strings, lone
surrogates, bad CIDRs, addresses, MACs, options and ids, invalid JSON, non-UTF-8 bytes, deep nesting, odd
Content-Types and HTTP methods.

Every answer must be well formed: JSON of the method's shape, or ``{"Err": one line}`` (HTTP 200 for a call
that cannot be done, 400 for a body that is not a JSON object, 404/405 for a wrong path or method), never a
500 and never a traceback in the agent's log. Afterwards everything that succeeded is undone in dockerd's
order, and then ``netctl ipam check`` is clean and no veth, route or etcd record of ours is left.

The number of requests is ``NETPLUGIN_FUZZ_EXAMPLES`` (tests/faults/conftest.py): a short run by default,
10,000 for the long one; the agent is restarted halfway. ``NETPLUGIN_FUZZ_DEBUG=1`` prints every error answer
(to see what the generator reaches).
"""

import json
import os
import time

import netaddr
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from netplugin.datastore import keys
from netplugin.docker.app import MEDIA_TYPE
from netplugin.docker.dockerapi import _UnixConnection
from netplugin.ipam.allocator import IPAM
from netplugin.routing.constants import ROUTE_PROTO
from tests.functional.test_docker import ipam_check, our_links
from netplugin.lab.netns import nsexec
from tests.waiting import poll

pytestmark = pytest.mark.functional

POOL4, POOL6 = "10.77.0.0/16", "fd77::/64"  # made before the run; fuzzed subnets mostly lie inside
ERR_MAX = 600  # an error is one line an operator reads, not an echo of a megabyte of input

# --- talking to the plugin -----------------------------------------------------------------------------------------


class Plugin:
    """The live agent's plugin socket; ``call`` returns (status, content type, raw body)."""

    def __init__(self, path):
        self.path = path
        self.requests = 0
        self.outcomes = {}  # method -> [answers, errors]
        self.failures = {}  # (method, status, answer start) -> what was wrong, for each distinct bad answer

    def call(self, path, body=b"", method="POST", content_type=MEDIA_TYPE):
        conn = _UnixConnection(self.path, timeout=60)
        headers = {"Accept": MEDIA_TYPE}
        if content_type is not None:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.requests += 1
        return resp.status, resp.getheader("Content-Type"), data

    def json(self, method, body):
        """A well-formed call whose answer is checked; returns the decoded answer."""
        status, ctype, data = self.call(f"/{method}", json.dumps(body).encode())
        return check_answer(method, status, ctype, data, "POST")


# --- what a well-formed answer is -----------------------------------------------------------------------------------


def _is_cidr(value):
    try:
        return isinstance(value, str) and "/" in value and netaddr.IPNetwork(value) is not None
    except (netaddr.AddrFormatError, ValueError):
        return False


SHAPES = {
    "Plugin.Activate": lambda a: a == {"Implements": ["NetworkDriver", "IpamDriver"]},
    "NetworkDriver.GetCapabilities": lambda a: a == {"Scope": "local", "ConnectivityScope": "global"},
    "IpamDriver.GetCapabilities": lambda a: (
        set(a) == {"RequiresMACAddress", "RequiresRequestReplay"} and all(isinstance(v, bool) for v in a.values())
    ),
    "IpamDriver.GetDefaultAddressSpaces": lambda a: (
        a == {"LocalDefaultAddressSpace": "netplugin", "GlobalDefaultAddressSpace": "netplugin"}
    ),
    "IpamDriver.RequestPool": lambda a: (
        set(a) == {"PoolID", "Pool", "Data"}
        and isinstance(a["PoolID"], str)
        and _is_cidr(a["Pool"])
        and isinstance(a["Data"], dict)
    ),
    "IpamDriver.RequestAddress": lambda a: (
        set(a) == {"Address", "Data"} and _is_cidr(a["Address"]) and isinstance(a["Data"], dict)
    ),
    "NetworkDriver.EndpointOperInfo": lambda a: set(a) == {"Value"} and isinstance(a["Value"], dict),
    "NetworkDriver.CreateEndpoint": lambda a: a in ({}, {"Interface": {}}),
    "NetworkDriver.AllocateNetwork": lambda a: a == {"Options": {}},
    "NetworkDriver.Join": lambda a: (
        set(a) == {"InterfaceName", "StaticRoutes", "DisableGatewayService"}
        and isinstance(a["InterfaceName"].get("SrcName"), str)
        and a["InterfaceName"].get("DstPrefix") == "eth"
        and all(_is_cidr(r.get("Destination")) and r.get("RouteType") in (0, 1) for r in a["StaticRoutes"])
    ),
}


def check_answer(method, status, ctype, data, http_method):
    """The decoded answer; fails on anything a runtime could not read or an operator could not act on."""
    where = f"{http_method} /{method} -> {status} {ctype} {data[:200]!r}"
    assert status in (200, 400, 404, 405, 413), where
    if http_method == "HEAD":
        return None
    assert ctype == MEDIA_TYPE, where
    answer = json.loads(data)
    assert isinstance(answer, dict), where
    if "Err" in answer:
        err = answer["Err"]
        assert isinstance(err, str) and err.strip() and "\n" not in err and len(err) <= ERR_MAX, where
        assert answer.get("Error") == err and "Traceback" not in err and "internal error" not in err, where
        return answer
    assert status == 200, where
    shape = SHAPES.get(method, lambda a: a == {})
    assert shape(answer), where
    return answer


# --- the model of what dockerd would have to clean up ----------------------------------------------------------------


class Model:
    def __init__(self, sandboxes):
        self.sandboxes = [f"/run/netns/{s}" for s in sandboxes]
        self.pools = {}  # PoolID -> Pool (CIDR)
        self.addresses = {}  # address (CIDR) -> PoolID
        self.networks = set()
        self.endpoints = {}  # EndpointID -> NetworkID
        self.ids = ["%064x" % i for i in range(1, 7)]  # the ids calls are drawn from: repeats and wrong orders
        self.serial = 0  # numbers the lifecycles' fresh ids

    def learn(self, method, body, answer):
        """Remember what a call that answered without Err made (or undid)."""
        if answer is None or "Err" in answer or not isinstance(body, dict):
            return
        name = method.split(".", 1)[-1]
        if name == "RequestPool":
            self.pools[answer["PoolID"]] = answer["Pool"]
        elif name == "RequestAddress" and not _is_gateway_request(body):
            self.addresses[answer["Address"]] = body.get("PoolID")
        elif name == "ReleaseAddress":
            for address in [a for a in self.addresses if _same_ip(a, body.get("Address"))]:
                self.addresses.pop(address)
        elif method == "NetworkDriver.CreateNetwork":
            self.networks.add(body["NetworkID"])
        elif method == "NetworkDriver.DeleteNetwork":
            self.networks.discard(body["NetworkID"])
        elif method == "NetworkDriver.CreateEndpoint":
            self.endpoints[body["EndpointID"]] = body["NetworkID"]
        elif method == "NetworkDriver.DeleteEndpoint":
            self.endpoints.pop(body["EndpointID"], None)


def _is_gateway_request(body):
    opts = body.get("Options")
    return isinstance(opts, dict) and opts.get("RequestAddressType") == "com.docker.network.gateway"


def _same_ip(a, b):
    try:
        return netaddr.IPNetwork(str(a)).ip == netaddr.IPNetwork(str(b)).ip
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return False


# --- strategies ----------------------------------------------------------------------------------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
huge = st.sampled_from("a/:é\x00\n%\ud800").flatmap(lambda c: st.integers(200, 200_000).map(lambda n: c * n))
weird_text = st.one_of(
    st.text(max_size=40),
    huge,
    st.sampled_from(
        ["", " ", "\ud800", "\udcff", "../../etc", "a/b", "10.77.0.0/16\n", "null", "%s%n", "\x00", "é" * 3]
    ),
)
cidr4 = st.builds(
    lambda a, b, plen: f"10.77.{a}.{b}/{plen}",
    st.integers(0, 255),
    st.sampled_from([0, 64, 128]),
    st.sampled_from([16, 24, 25, 26, 30, 32]),
)
bad_cidr = st.sampled_from(
    [
        "10.77.0.0/33",
        "10.77.0.5/16",
        "10.77.0.0",
        "300.1.1.1/8",
        "::/200",
        "fd77::/64x",
        "10.77.0.0/-1",
        "10.77.0.0/016",
        " 10.77.0.0/24",
        "10.77.0.0/24 ",
        "1e1.0.0.0/8",
        "0x0a.0.0.0/8",
        "10.77/16",
        "fd77::/64/64",
        "10.78.0.0/24",
        "10.76.0.0/15",
    ]
)
reserved_cidr = st.sampled_from(
    [
        "0.0.0.0/0",
        "::/0",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "169.254.1.0/24",
        "224.0.0.0/4",
        "fe80::/64",
        "ff00::/8",
        "255.255.255.255/32",
        "0.0.0.0/8",
    ]
)
subnet = st.one_of(
    cidr4.map(lambda c: str(netaddr.IPNetwork(c).cidr)),
    st.just(POOL4),
    st.just(POOL6),
    st.just("fd77::/80"),
    st.just("fd77:0:0:0:1::/80"),
    bad_cidr,
    reserved_cidr,
)
mac = st.one_of(
    st.just("02:42:0a:4d:00:07"),
    st.just(""),
    st.sampled_from(
        [
            "zz:zz:zz:zz:zz:zz",
            "02:42:0a",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "02-42-0a-4d-00-07",
            "0242.0a4d.0007",
            "02:42:0a:4d:00:07:08",
        ]
    ),
    st.text(max_size=20),
)
sandbox_like = st.sampled_from(
    [
        "",
        "relative/path",
        "/",
        "/nonexistent/netns",
        "/proc/self/ns/net",
        "/dev/null",
        "/etc/passwd",
        "/run/netns/",
        "/run/netns/../../etc",
    ]
)
mtu = st.one_of(
    st.sampled_from(["1500", "1400", "68", "67", "65536", "0", "-1", "1e3", " 1500", "1500.0", "", "9000", "1279"]),
    st.integers(-10, 70000),
)


def chance(draw, p):
    """True with about probability ``p``. Hypothesis favours extreme integers (0, 1, the maximum), so the draw is
    scrambled first; a plain ``integers(0, 9) == 9`` would be true far more often than one time in ten."""
    x = draw(st.integers(0, 2**16 - 1))
    return (x * 40503 + 32768) % 65536 < p * 65536


def pick(draw, seq):
    """One of ``seq``, drawn so that the choices hypothesis records never depend on the agent's state (the model
    grows as calls succeed; a draw bounded by its size would make replays inconsistent)."""
    return seq[draw(st.integers(0, 2**16)) % len(seq)]


def _pool_id(draw, model):
    known = pick(draw, sorted(model.pools) or ["10.77.0.0/16|10.77.0.0/16|"])
    return pick(
        draw,
        [known] * 6
        + [
            known.replace("|", "|x", 1),
            draw(weird_text),
            pick(
                draw,
                [
                    "",
                    "|",
                    "||",
                    "a|b|c",
                    "10.77.0.0/16|10.78.0.0/24|",
                    "fd77::/64|fd77::/64|",
                    "10.77.0.0/16|10.77.0.0/16|10.77.1.0/24|",
                ],
            ),
        ],
    )


def _address(draw, model):
    known = pick(draw, sorted(model.addresses) or ["10.77.0.5/32"])
    return pick(
        draw,
        [known] * 6
        + [
            f"10.77.{draw(st.integers(0, 255))}.{draw(st.integers(0, 255))}",
            draw(weird_text),
            pick(
                draw,
                [
                    "",
                    "fd77::5",
                    "10.77.0.5/16",
                    "169.254.1.1",
                    "10.78.0.1",
                    "10.77.0.0",
                    "10.77.255.255",
                    "::",
                    "not-an-ip",
                    "10.77.0.5/33",
                    "1.2.3",
                ],
            ),
        ],
    )


def valid_body(draw, model, method):
    """A body dockerd could send for ``method``, its ids and values drawn from what earlier calls made."""
    net_id = pick(draw, [pick(draw, sorted(model.networks) or model.ids)] * 3 + [pick(draw, model.ids)])
    ep_id = pick(draw, [pick(draw, sorted(model.endpoints) or model.ids)] * 2 + [pick(draw, model.ids)])
    if chance(draw, 0.7):
        net_id = model.endpoints.get(ep_id, net_id)
    name = method.split(".", 1)[1]
    if name == "CreateNetwork":
        known = sorted(set(model.pools.values())) or [POOL4]
        pools = st.integers(0, 3).flatmap(lambda i: subnet if i == 0 else st.just(pick(draw, known)))
        v4 = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"AddressSpace": st.just("netplugin"), "Pool": pools, "Gateway": st.just("169.254.1.1/32")},
                    optional={"AuxAddresses": st.just({})},
                ),
                min_size=draw(st.integers(0, 3)) and 1,
                max_size=2,
            )
        )
        v6 = draw(st.lists(st.fixed_dictionaries({"AddressSpace": st.just("netplugin"), "Pool": pools}), max_size=1))
        generic = draw(
            st.fixed_dictionaries({}, optional={"com.docker.network.driver.mtu": mtu, "color": st.text(max_size=5)})
        )
        return {
            "NetworkID": net_id,
            "Options": {"com.docker.network.generic": generic, "com.docker.network.enable_ipv6": bool(v6)},
            "IPv4Data": v4,
            "IPv6Data": v6,
        }
    if name in ("DeleteNetwork", "AllocateNetwork", "FreeNetwork"):
        return {"NetworkID": net_id}
    if name == "CreateEndpoint":
        iface = {
            "Address": _address(draw, model),
            "AddressIPv6": draw(st.sampled_from(["", "fd77::9/64"])),
            "MacAddress": draw(mac),
        }
        return {"NetworkID": net_id, "EndpointID": ep_id, "Interface": iface, "Options": {}}
    if name == "Join":
        key = draw(sandbox_like) if chance(draw, 0.2) else pick(draw, model.sandboxes)
        return {"NetworkID": net_id, "EndpointID": ep_id, "SandboxKey": key, "Options": {}}
    if name == "DiscoverNew" or name == "DiscoverDelete":
        return {"DiscoveryType": 1, "DiscoveryData": {"Address": "10.99.0.2", "self": False}}
    if name == "RequestPool":
        pool = draw(subnet)
        return {
            "AddressSpace": "netplugin",
            "Pool": draw(st.sampled_from([pool, ""])),
            "SubPool": draw(st.sampled_from(["", "10.77.1.128/25", "10.77.1.0/24", pool])),
            "Options": {},
            "V6": ":" in pool,
        }
    if name == "ReleasePool":
        return {"PoolID": _pool_id(draw, model)}
    if name == "RequestAddress":
        opts = draw(
            st.sampled_from(
                [
                    {},
                    {"RequestAddressType": "com.docker.network.gateway"},
                    {"com.docker.network.endpoint.macaddress": draw(mac)},
                ]
            )
        )
        return {
            "PoolID": _pool_id(draw, model),
            "Address": draw(st.sampled_from(["", _address(draw, model)])),
            "Options": opts,
        }
    if name == "ReleaseAddress":
        return {"PoolID": _pool_id(draw, model), "Address": _address(draw, model)}
    if name in ("GetCapabilities", "GetDefaultAddressSpaces", "Activate"):
        return draw(st.sampled_from([None, {}]))
    return {"NetworkID": net_id, "EndpointID": ep_id}


def mutate(draw, body):
    """Drop, replace or add fields, at the top or one level down; or replace the whole body."""
    replace_all = chance(draw, 0.1)
    if not isinstance(body, dict) or not body or replace_all:
        return draw(junk)
    body = json.loads(json.dumps(body))
    for _ in range(draw(st.integers(1, 3))):
        target = body
        nested = [k for k, v in body.items() if isinstance(v, dict) and v]
        nested += [k for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if draw(st.booleans()) and nested:
            key = pick(draw, sorted(nested))
            target = body[key] if isinstance(body[key], dict) else body[key][0]
        keys_ = sorted(target)
        action = draw(st.sampled_from(["drop", "replace", "replace", "text", "add"]))
        if action == "add" or not keys_:
            target[draw(st.text(max_size=10))] = draw(junk)
            continue
        key = pick(draw, keys_)
        if action == "drop":
            del target[key]
        elif action == "text":
            target[key] = draw(weird_text)
        else:
            target[key] = draw(junk)
    return body


def encode(draw, body, broken):
    """Bytes on the wire: JSON, or (``broken``) JSON broken in the ways a buggy or hostile client breaks it."""
    text = json.dumps(body, ensure_ascii=draw(st.booleans()), allow_nan=True)
    raw = text.encode("utf-8", "surrogatepass")
    kinds = ["truncated", "bytes", "non-utf8", "deep", "empty", "nan", "huge"]
    kind = draw(st.sampled_from(kinds)) if broken else "json"
    cut = draw(st.integers(0, 1000)) * len(raw) // 1000
    if kind == "truncated" and len(raw) > 1:
        return raw[: max(1, min(cut, len(raw) - 1))]
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "non-utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"]))
        return raw[:cut] + bad + raw[cut:]
    if kind == "deep":
        depth = draw(st.integers(500, 100_000))
        return draw(st.sampled_from([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth]))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"null", b" ", b"\n", b"{}", b"[]", b'""', b"0"]))
    if kind == "huge" and isinstance(body, dict):  # a valid body beside megabytes of padding
        padded = {**body, "padding": "x" * draw(st.integers(1, 8)) * 1_000_000}
        return json.dumps(padded).encode("utf-8", "surrogatepass")
    if kind == "nan":
        return draw(
            st.sampled_from(
                [
                    b"NaN",
                    b'{"NetworkID": NaN}',
                    b'{"V6": Infinity, "AddressSpace": "netplugin"}',
                    b'{"PoolID": -Infinity}',
                ]
            )
        )
    return raw


METHODS = (
    ["Plugin.Activate"]
    + [
        f"NetworkDriver.{m}"
        for m in (
            "GetCapabilities",
            "CreateNetwork",
            "DeleteNetwork",
            "AllocateNetwork",
            "FreeNetwork",
            "CreateEndpoint",
            "EndpointOperInfo",
            "DeleteEndpoint",
            "Join",
            "Leave",
            "DiscoverNew",
            "DiscoverDelete",
            "ProgramExternalConnectivity",
            "RevokeExternalConnectivity",
        )
    ]
    + [
        f"IpamDriver.{m}"
        for m in (
            "GetCapabilities",
            "GetDefaultAddressSpaces",
            "RequestPool",
            "ReleasePool",
            "RequestAddress",
            "ReleaseAddress",
        )
    ]
)
# The calls that make state come up more often, so sequences reach deep (create -> endpoint -> join).
WEIGHTED = (
    METHODS
    + [
        "IpamDriver.RequestPool",
        "IpamDriver.RequestAddress",
        "NetworkDriver.CreateNetwork",
        "NetworkDriver.CreateEndpoint",
        "NetworkDriver.Join",
        "NetworkDriver.CreateEndpoint",
        "NetworkDriver.Join",
        "IpamDriver.RequestAddress",
        "NetworkDriver.DeleteEndpoint",
        "IpamDriver.ReleaseAddress",
    ]
    * 2
)
ODD_PATHS = [
    "/",
    "/Plugin.Activate/x",
    "/NetworkDriver.Teleport",
    "/IpamDriver.",
    "/%ff%fe",
    "/a" * 500,
    "/NetworkDriver.Join?x=1",
    "//NetworkDriver.Join",
    "/networkdriver.join",
    "/NetworkDriver.Join/",
]
CONTENT_TYPES = [MEDIA_TYPE] * 6 + [
    None,
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
    "text/html; charset=utf-16",
]


def one_call(draw, plugin, model):
    """Any method, its body drawn from what exists (ids, pools, addresses), often mutated."""
    method = draw(st.sampled_from(WEIGHTED))
    return send(draw, plugin, model, method, valid_body(draw, model, method), fuzz_rate=0.6)


LIFECYCLE = [
    "RequestPool",
    "CreateNetwork",
    "RequestAddress",
    "CreateEndpoint",
    "Join",
    "EndpointOperInfo",
    "Leave",
    "DeleteEndpoint",
    "ReleaseAddress",
    "ReleasePool",
    "DeleteNetwork",
]


def lifecycle(draw, plugin, model):
    """One container's life as dockerd drives it, with fresh ids; steps sometimes shuffled, skipped, repeated."""
    model.serial += 1
    net_id, ep_id = "%064x" % (0x100000 + model.serial), "%064x" % (0x200000 + model.serial)
    subnet = pick(draw, [f"10.77.{model.serial % 250 + 1}.0/24", POOL4, POOL6, "fd77::/80"])
    steps = list(LIFECYCLE)
    if chance(draw, 0.25):
        steps = draw(st.permutations(steps))
    script = []
    for step in steps:
        script += [step] * (1 if not chance(draw, 0.2) else draw(st.sampled_from([0, 2])))
    ctx = {"PoolID": None, "Address": None}
    for step in script:
        body = _lifecycle_body(draw, model, step, net_id, ep_id, subnet, ctx)
        answer = send(
            draw, plugin, model, ("IpamDriver." if step in IPAM_STEPS else "NetworkDriver.") + step, body, fuzz_rate=0.1
        )
        if answer and "Err" not in answer and step in ("RequestPool", "RequestAddress"):
            ctx.update({k: answer[k] for k in ("PoolID", "Address") if k in answer})


IPAM_STEPS = {"RequestPool", "RequestAddress", "ReleaseAddress", "ReleasePool"}


def _lifecycle_body(draw, model, step, net_id, ep_id, subnet, ctx):
    pool_id = ctx["PoolID"] or f"{subnet}|{subnet}|"
    ids = {"NetworkID": net_id, "EndpointID": ep_id}
    if step == "RequestPool":
        return {"AddressSpace": "netplugin", "Pool": subnet, "SubPool": "", "Options": {}, "V6": ":" in subnet}
    if step == "CreateNetwork":
        data = [{"AddressSpace": "netplugin", "Pool": subnet, "Gateway": "169.254.1.1/32"}]
        v6 = ":" in subnet
        options = {"com.docker.network.generic": {}, "com.docker.network.enable_ipv6": v6}
        return {"NetworkID": net_id, "Options": options, "IPv4Data": [] if v6 else data, "IPv6Data": data if v6 else []}
    if step == "RequestAddress":
        return {"PoolID": pool_id, "Address": "", "Options": {"com.docker.network.endpoint.macaddress": draw(mac)}}
    if step == "CreateEndpoint":
        address = ctx["Address"] or _address(draw, model)
        key = "AddressIPv6" if ":" in address else "Address"
        return {**ids, "Interface": {key: address, "MacAddress": draw(mac)}, "Options": {}}
    if step == "Join":
        return {**ids, "SandboxKey": pick(draw, model.sandboxes), "Options": {}}
    if step == "ReleaseAddress":
        return {"PoolID": pool_id, "Address": ctx["Address"] or _address(draw, model)}
    if step == "ReleasePool":
        return {"PoolID": pool_id}
    if step == "DeleteNetwork":
        return {"NetworkID": net_id}
    return ids


def send(draw, plugin, model, method, body, fuzz_rate):
    """Send ``body`` (with probability ``fuzz_rate`` mutated, broken, or to an odd path or with an odd method),
    check the answer; returns the answer, or None when it was not a plain POST of ``method``."""
    how = None
    if chance(draw, fuzz_rate):
        how = draw(st.sampled_from(["body", "body", "bytes", "both", "path", "method"]))
    if how in ("body", "both"):
        body = mutate(draw, body)
    raw = encode(draw, body, broken=how in ("bytes", "both"))
    path = draw(st.sampled_from(ODD_PATHS)) if how == "path" else f"/{method}"
    http_method = "POST"
    if how == "method":
        http_method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    content_type = MEDIA_TYPE if not chance(draw, 0.3) else draw(st.sampled_from(CONTENT_TYPES))
    status, ctype, data = plugin.call(path, raw, http_method, content_type)
    called = path.split("?")[0].lstrip("/")  # a query string changes nothing: the method is the path
    plain = called == method and http_method == "POST"
    try:
        answer = check_answer(called, status, ctype, data, http_method)
        if plain:
            check_meaning(method, _decoded(raw), answer, model)
    except (AssertionError, ValueError) as e:
        # Kept going: one run lists every distinct malformed answer, not just the first.
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        plugin.failures.setdefault(
            (path, http_method, status, why[:50]), f"{why} <- {http_method} {path} {content_type!r} {raw[:160]!r}"
        )
        return None
    if not plain:
        return None
    counts = plugin.outcomes.setdefault(method, [0, 0])
    counts["Err" in answer] += 1
    if os.environ.get("NETPLUGIN_FUZZ_DEBUG") and "Err" in answer:
        print(method, answer["Err"][:150])
    model.learn(method, _decoded(raw), answer)
    return answer


# Never a container's subnet: the gateway every container routes via, loopback, multicast, "this network",
# reserved and IPv4-mapped space.
UNUSABLE = [
    netaddr.IPNetwork(c)
    for c in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "::ffff:0:0/96",
        "fe80::/10",
        "ff00::/8",
    )
]


def check_meaning(method, body, answer, model):
    """Beyond the shape: what a successful answer promises (usable pools, addresses in them, no duplicates)."""
    if "Err" in answer or not isinstance(body, dict):
        return
    if method == "IpamDriver.RequestPool":
        pool = netaddr.IPNetwork(answer["Pool"])
        bad = [str(u) for u in UNUSABLE if u.version == pool.version and u.first <= pool.last and pool.first <= u.last]
        assert not bad, f"RequestPool answered {pool}, which overlaps {', '.join(bad)}"
    if method == "IpamDriver.RequestAddress" and "RequestAddressType" not in (body.get("Options") or {}):
        subnet = netaddr.IPNetwork(str(body.get("PoolID")).split("|")[1])
        ip = netaddr.IPNetwork(answer["Address"])
        assert ip.ip in subnet and ip.prefixlen == (32 if ip.version == 4 else 128), (
            f"RequestAddress answered {ip} for subnet {subnet}"
        )
        assert not any(_same_ip(a, ip) for a in model.addresses), f"RequestAddress handed out {ip} twice"


def _decoded(raw):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


# --- the run -------------------------------------------------------------------------------------------------------


def undo_everything(plugin, model):
    """What dockerd does when the containers and networks go: Leave, DeleteEndpoint, addresses, pools, networks."""
    for ep_id, net_id in sorted(model.endpoints.items()):
        for method in ("NetworkDriver.Leave", "NetworkDriver.DeleteEndpoint"):
            assert "Err" not in plugin.json(method, {"NetworkID": net_id, "EndpointID": ep_id}), (method, ep_id)
    for address, pool_id in sorted(model.addresses.items()):
        answer = plugin.json("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": address})
        assert "Err" not in answer, (address, pool_id, answer)
    for pool_id in sorted(model.pools):
        assert "Err" not in plugin.json("IpamDriver.ReleasePool", {"PoolID": pool_id}), pool_id
    for net_id in sorted(model.networks):
        assert "Err" not in plugin.json("NetworkDriver.DeleteNetwork", {"NetworkID": net_id}), net_id


def health(agent):
    conn = _UnixConnection(agent.socket, timeout=10)
    try:
        conn.request("GET", "/v1/health")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def live_plugin(etcd, host_factory, namespaces, tmp_path):
    IPAM(etcd).add_pool(POOL4)
    IPAM(etcd).add_pool(POOL6)
    sock = str(tmp_path / "np-docker.sock")
    agent = host_factory(extra_args=["--docker-socket", sock])
    poll(lambda: os.path.exists(sock), timeout=20)
    return agent, Plugin(sock), [namespaces.add(), namespaces.add()]


def restart(agent, plugin):
    """The agent restarted between calls, as a package upgrade does: what it kept in memory is gone."""
    agent.stop()
    if os.path.exists(plugin.path):
        os.unlink(plugin.path)
    agent.start()
    assert poll(lambda: os.path.exists(plugin.path), timeout=20), agent.log()


@pytest.mark.timeout(3600)  # the long run (10,000 requests) takes minutes
def test_fuzz_libnetwork(live_plugin, etcd, etcd_server, fuzz_examples):
    agent, plugin, sandboxes = live_plugin
    model = Model(sandboxes)
    started = time.monotonic()

    # An example is a short sequence (about nine requests); rounds of examples run until the count of requests
    # (NETPLUGIN_FUZZ_EXAMPLES) is reached.
    @settings(
        max_examples=max(5, fuzz_examples // 40),
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def sequences(data):
        if data.draw(st.booleans()):
            lifecycle(data.draw, plugin, model)
        for _ in range(data.draw(st.integers(1, 6))):
            one_call(data.draw, plugin, model)

    while plugin.requests < fuzz_examples // 2:
        sequences()
    restart(agent, plugin)  # halfway: the second half meets networks and endpoints the agent must read back
    while plugin.requests < fuzz_examples:
        sequences()
    fuzzed, took = plugin.requests, time.monotonic() - started
    print(
        f"\nfuzz: {fuzzed} requests in {took:.1f} s; left to undo: {len(model.endpoints)} endpoints, "
        f"{len(model.addresses)} addresses, {len(model.pools)} pools, {len(model.networks)} networks"
    )
    print(
        "answers/errors per method:",
        ", ".join(f"{m.split('.')[-1]} {a}/{e}" for m, (a, e) in sorted(plugin.outcomes.items())),
    )
    assert not plugin.failures, f"{len(plugin.failures)} distinct bad answers:\n" + "\n".join(
        sorted(plugin.failures.values())
    )
    assert fuzzed >= fuzz_examples

    assert agent.proc.poll() is None, agent.log()
    status, answer = health(agent)
    assert (status, answer["ok"], answer["problems"]) == (200, True, []), answer
    undo_everything(plugin, model)
    log = open(agent.log_path).read()
    assert "Traceback" not in log and "Logging error" not in log, log[-6000:]

    check = ipam_check(etcd_server)
    assert check.returncode == 0 and "clean" in check.stdout, check.stdout + check.stderr
    assert our_links(agent.netns) == []
    for family in ("-4", "-6"):  # a host route per address; the blackholes of the host's blocks stay
        assert nsexec(agent.netns, f"ip {family} route show proto {ROUTE_PROTO} type unicast").stdout.strip() == ""
    for prefix in (keys.ENDPOINTS, keys.HANDLES, keys.NETWORKS):
        assert [kv.key for kv in etcd.list(prefix)] == [], prefix


def test_concurrent_containers(live_plugin, etcd, etcd_server):
    """20 containers started and removed at once, as dockerd does on a busy host: every call succeeds, every
    address is distinct, and nothing is left afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    agent, plugin, sandboxes = live_plugin
    net = "%064x" % 0xC0FFEE
    pool = plugin.json("IpamDriver.RequestPool", {"AddressSpace": "netplugin", "Pool": "10.77.9.0/24"})
    assert (
        plugin.json(
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": net,
                "IPv4Data": [{"AddressSpace": "netplugin", "Pool": "10.77.9.0/24", "Gateway": "169.254.1.1/32"}],
                "Options": {},
            },
        )
        == {}
    )

    def start(i):
        ep = {"NetworkID": net, "EndpointID": "%064x" % (0xE000 + i)}
        address = plugin.json("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Options": {}})["Address"]
        assert plugin.json("NetworkDriver.CreateEndpoint", {**ep, "Interface": {"Address": address}}) == {}
        joined = plugin.json("NetworkDriver.Join", {**ep, "SandboxKey": f"/run/netns/{sandboxes[i % 2]}"})
        assert "Err" not in joined, joined
        return address

    def stop(i, address):
        ep = {"NetworkID": net, "EndpointID": "%064x" % (0xE000 + i)}
        for method, body in (
            ("NetworkDriver.Leave", ep),
            ("NetworkDriver.DeleteEndpoint", ep),
            ("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": address}),
        ):
            assert plugin.json(method, body) == {}, method

    with ThreadPoolExecutor(max_workers=8) as workers:
        addresses = list(workers.map(start, range(20)))
        assert len(set(addresses)) == 20
        assert len(our_links(agent.netns)) == 40  # host end and not-yet-moved container end of each
        list(workers.map(stop, range(20), addresses))
    assert plugin.json("NetworkDriver.DeleteNetwork", {"NetworkID": net}) == {}
    assert "Traceback" not in open(agent.log_path).read()
    check = ipam_check(etcd_server)
    assert check.returncode == 0 and "clean" in check.stdout, check.stdout + check.stderr
    assert our_links(agent.netns) == []
    for prefix in (keys.ENDPOINTS, keys.HANDLES, keys.NETWORKS):
        assert [kv.key for kv in etcd.list(prefix)] == [], prefix
