#!/usr/bin/python3 -IS
"""netplugin's CNI plugin: the runtime-facing binary, a thin client of the local netplugin agent.

It speaks CNI spec 1.1.0 (ADD, DEL, CHECK, STATUS, GC, VERSION) and accepts configs of 0.3.0 to 1.1.0. It checks
the environment and the network config itself, forwards the request to the agent over HTTP/1.1 on a unix socket,
and shapes the agent's answer for the config's cniVersion. All the real work (IPAM, veths, routes, etcd) happens
in the agent.

Why one self-contained stdlib-only file: it is copied to ``/opt/cni/bin/netplugin`` and run by the runtime with
``python3 -IS`` for every container, so it must start fast (no site, no third-party imports) and must not depend
on our packages being importable. HTTP is spoken by hand (http.client's imports alone cost about 25 ms), JSON
through the stdlib's C codec ``_json`` (``import json`` costs 8 ms and more: re, enum) and the socket through
``_socket`` (``import socket`` costs 4 ms: enum, selectors); heavier modules (ipaddress) are imported only on the
paths that need them, so VERSION stays near bare interpreter start-up.

Agent unreachable (socket missing, refused, or no sign of life within CONNECT_TIMEOUT) is answered with code 11
("try again later"; code 50 for STATUS) in well under two seconds. The request is sent with
``Expect: 100-continue`` and the body only follows the agent's ``100 Continue``: that is how we tell a live agent
from a socket nobody accepts on (a unix ``connect()`` succeeds as soon as the listener's backlog has room). Once
the agent has answered, the real call may take up to ``agent_timeout`` seconds (default 120).
"""

import sys

JSON_SPACE = " \t\n\r"  # what JSON calls whitespace
SPEC_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_AGENT_SOCKET = "/run/netplugin/agent.sock"
AGENT_SOCKET_ENV = "NETPLUGIN_AGENT_SOCKET"  # overrides the config's agent_socket (tests, odd layouts)
AGENT_PATH = "/v1/cni"
CONNECT_TIMEOUT = 1.5  # seconds for connect + the agent's 100 Continue, all together
DEFAULT_AGENT_TIMEOUT = 120.0
MAX_DEPTH = 64  # levels of nesting a network config may have (real ones have about six)
MAX_MESSAGE = 1000  # characters of an error's msg and details

# Well-known CNI error codes (spec section "Error"), plus 999 for our own bugs, as libcni does.
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_PLUGIN_UNAVAILABLE = 50
E_INTERNAL = 999

# Environment each command needs (spec section 2). CNI_PATH is optional for us everywhere: we never exec
# delegate plugins.
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "STATUS": (),
    "GC": (),
}
# Oldest config version in which each command exists.
MIN_VERSION = {"CHECK": (0, 4, 0), "STATUS": (1, 1, 0), "GC": (1, 1, 0)}

# Result fields each version knows; anything else is dropped when shaping a result for that version.
_IFACE_KEYS_1_1 = ("name", "mac", "mtu", "sandbox", "socketPath", "pciID")
_IFACE_KEYS_OLD = ("name", "mac", "sandbox")
_ROUTE_KEYS_1_1 = ("dst", "gw", "mtu", "advmss", "priority", "table", "scope")
_ROUTE_KEYS_OLD = ("dst", "gw")
_DNS_KEYS = ("nameservers", "domain", "search", "options")

# Labels we derive from Kubernetes' CNI_ARGS, so policy can select pods by namespace and name.
LABEL_NAMESPACE = "netplugin.io/namespace"
LABEL_POD = "netplugin.io/pod"

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class CniError(Exception):
    """An answer for the runtime: printed as the spec's error object, exit status 1."""

    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


# ------------------------------------------------------------------------------------------------------ JSON


class _DecoderDefaults:
    """What ``_json``'s scanner reads of a decoder: the settings ``json.loads`` uses by default."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def json_loads(text):
    """``json.loads(text)`` through the C scanner alone. Any failure (bad input, a Python without ``_json``) is
    handed to ``json.loads`` itself, which gives the answer and words the error exactly as it always has: the
    C scanner needs ``json.decoder`` loaded to raise its own errors."""
    try:
        from _json import make_scanner

        start = len(text) - len(text.lstrip(JSON_SPACE))
        value, end = make_scanner(_DecoderDefaults)(text, start)
        if end == len(text) or not text[end:].strip(JSON_SPACE):
            return value
    except Exception:  # noqa: BLE001 - json.loads below decides and explains
        pass
    import json

    return json.loads(text)


def _unencodable(value):
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def json_dumps(value):
    """``json.dumps(value)`` (same separators, ASCII, NaN allowed, circular check) through the C encoder."""
    try:
        from _json import encode_basestring_ascii, make_encoder
    except ImportError:
        import json

        return json.dumps(value)
    encode = make_encoder({}, _unencodable, encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return "".join(encode(value, 0))


# ---------------------------------------------------------------------------------------------- input checks


def _cut(text, limit):
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value, limit=80):
    """``value`` as repr, cut to ``limit`` characters: error messages quote input, which may be huge."""
    return _cut(repr(value), limit)


def nesting_depth(value):
    """How deeply lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, depth = todo.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


def parse_version(text):
    """'1.0.0' -> (1, 0, 0); None when it is not a plain x.y.z version."""
    parts = text.split(".") if isinstance(text, str) else []
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def valid_name(text):
    """The spec's rule for container ids and network names: alphanumeric first, then [alnum _ . -]."""
    return (
        isinstance(text, str)
        and text != ""
        and text.isascii()
        and text[0].isalnum()
        and all(c in _NAME_CHARS for c in text)
    )


def ifname_problem(name):
    """Why ``name`` cannot be a Linux interface name (the spec's rules), or None."""
    if name in (".", ".."):
        return "must not be '.' or '..'"
    if len(name.encode("utf-8", "surrogateescape")) > 15:  # IFNAMSIZ counts bytes
        return "must be shorter than 16 bytes"
    if any(c in "/:" or c.isspace() for c in name):
        return "must not contain '/', ':' or whitespace"
    return None


def _utf8(text):
    try:
        text.encode("utf-8")  # os.environ keeps undecodable bytes as lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def netns_problem(path):
    """Why ``path`` cannot name a network namespace, or None. Whether it really is one (an nsfs inode) is for
    the agent to check when it opens it."""
    if not _utf8(path):
        return "it is not UTF-8 text"
    if not path.startswith("/"):
        return "it must be an absolute path"
    if len(path) > 4095:
        return "it is longer than PATH_MAX"
    return None


def parse_cni_args(text):
    """``CNI_ARGS`` 'K=V;K2=V2' -> dict. Empty pairs (a trailing ';') are ignored."""
    args = {}
    for pair in text.split(";"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CniError(
                E_INVALID_ENV,
                f"invalid CNI_ARGS: {shown(pair)} is not KEY=VALUE",
                "CNI_ARGS must be KEY=VALUE pairs separated by ';'",
            )
        args[key] = value.strip()
    return args


def read_params(command, environ):
    """The per-invocation environment of ``command``, checked as the spec requires (code 4). STATUS and GC
    concern the whole network: the container's variables are neither needed nor looked at."""
    if command in ("STATUS", "GC"):
        return {"container_id": "", "netns": "", "ifname": "", "args": {}}
    missing = [name for name in REQUIRED_ENV[command] if not environ.get(name)]
    if missing:
        raise CniError(E_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    for name in ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_ARGS"):
        if not _utf8(environ.get(name, "")):
            raise CniError(E_INVALID_ENV, f"invalid {name}: it is not UTF-8 text")
    netns = environ.get("CNI_NETNS", "")
    problem = netns_problem(netns) if netns else None
    if problem and command == "DEL":
        netns = ""  # DEL still cleans up: the agent knows the namespace from its record
    elif problem:
        raise CniError(E_INVALID_ENV, f"invalid CNI_NETNS {shown(netns)}: {problem}")
    container_id = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    if container_id and not valid_name(container_id):
        raise CniError(
            E_INVALID_ENV,
            f"invalid CNI_CONTAINERID {shown(container_id)}",
            "it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )
    if ifname:
        problem = ifname_problem(ifname)
        if problem:
            raise CniError(E_INVALID_ENV, f"invalid CNI_IFNAME {shown(ifname)}: {problem}")
    return {
        "container_id": container_id,
        "netns": netns,
        "ifname": ifname,
        "args": parse_cni_args(environ.get("CNI_ARGS", "")),
    }


def read_config(stdin):
    """The network config from stdin, as a dict (code 5 when unreadable, 6 when not a JSON object)."""
    try:
        raw = stdin.read()
    except OSError as err:
        raise CniError(E_IO, f"failed to read the network config from stdin: {err}")
    if not raw.strip():
        raise CniError(E_DECODE, "failed to decode the network config: stdin is empty")
    try:
        # Strict UTF-8 as in Go's encoding/json, which runtimes use: json.loads(bytes) would also take UTF-16,
        # a BOM and encoded surrogates.
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as err:
        raise CniError(E_DECODE, f"failed to decode the network config: it is not UTF-8 (byte {err.start})")
    try:
        conf = json_loads(text)
    except ValueError as err:  # JSONDecodeError; RecursionError is caught below
        raise CniError(E_DECODE, f"failed to decode the network config: {err}")
    except RecursionError:
        raise CniError(E_DECODE, "failed to decode the network config: nested too deeply")
    if not isinstance(conf, dict):
        raise CniError(E_DECODE, "failed to decode the network config: it is not a JSON object")
    if nesting_depth(conf) > MAX_DEPTH:  # it goes on to the agent inside a request, which must encode it
        raise CniError(E_INVALID_CONFIG, f"invalid network config: nested deeper than {MAX_DEPTH} levels")
    return conf


def config_version(conf):
    """The config's cniVersion, if we speak it (code 1 otherwise)."""
    if "cniVersion" not in conf:
        # libcni reads an absent cniVersion as 0.1.0, which we do not speak.
        raise CniError(
            E_INCOMPATIBLE_VERSION,
            "incompatible CNI version: the config has no cniVersion (so 0.1.0)",
            "supported versions: " + ", ".join(SUPPORTED_VERSIONS),
        )
    version = conf["cniVersion"]
    if not isinstance(version, str):
        raise CniError(E_INVALID_CONFIG, f"invalid network config: cniVersion must be a string, not {shown(version)}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            E_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {shown(version)}",
            "supported versions: " + ", ".join(SUPPORTED_VERSIONS),
        )
    return version


def check_config(conf, command, version):
    """Check that ``command`` exists in ``version`` and the fields every command relies on."""
    minimum = MIN_VERSION.get(command)
    if minimum and parse_version(version) < minimum:
        raise CniError(
            E_INCOMPATIBLE_VERSION,
            f"config version {version} does not allow {command}",
            f"{command} needs cniVersion {'.'.join(map(str, minimum))} or later",
        )
    name = conf.get("name")
    if not name:
        raise CniError(E_INVALID_CONFIG, "invalid network config: missing network name")
    if not valid_name(name):
        raise CniError(
            E_INVALID_CONFIG,
            f"invalid network config: invalid network name {shown(name)}",
            "it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )
    plugin_type = conf.get("type")
    if not plugin_type or not isinstance(plugin_type, str):
        raise CniError(E_INVALID_CONFIG, "invalid network config: missing plugin type")
    ipam = conf.get("ipam")
    if ipam is not None:
        if not isinstance(ipam, dict):
            raise CniError(E_INVALID_CONFIG, "invalid network config: ipam must be an object")
        if ipam.get("type") not in (None, "", "netplugin"):
            raise CniError(
                E_UNSUPPORTED_FIELD,
                f"unsupported field ipam.type={shown(ipam['type'])}",
                "netplugin allocates addresses itself; leave ipam.type out",
            )
    for field in ("args", "runtimeConfig"):
        if field in conf and not isinstance(conf[field], dict):
            raise CniError(E_INVALID_CONFIG, f"invalid network config: {field} must be an object")


def agent_settings(conf, environ):
    """(socket path, read timeout) from the config, the environment overriding the socket."""
    path = environ.get(AGENT_SOCKET_ENV) or conf.get("agent_socket") or DEFAULT_AGENT_SOCKET
    if not isinstance(path, str):
        raise CniError(E_INVALID_CONFIG, f"invalid network config: agent_socket must be a path, not {shown(path)}")
    timeout = conf.get("agent_timeout", DEFAULT_AGENT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise CniError(
            E_INVALID_CONFIG,
            f"invalid network config: agent_timeout must be a positive number of seconds, not {shown(timeout)}",
        )
    return path, float(timeout)


# ------------------------------------------------------------------------------------- what we ask the agent


def _check_addresses(values, source, code):
    import ipaddress  # only when addresses were asked for

    for value in values:
        try:
            ipaddress.ip_interface(value)
        except ValueError:
            raise CniError(
                code, f"invalid address {shown(value)} in {source}", "give an IP address or an address/prefix"
            )


def requested_ips(conf, args):
    """Static addresses asked for, first found of: runtimeConfig.ips, args.cni.ips, CNI_ARGS IP=."""
    runtime_ips = conf.get("runtimeConfig", {}).get("ips")
    args_cni = conf.get("args", {}).get("cni")
    cni_ips = args_cni.get("ips") if isinstance(args_cni, dict) else None
    for source, values in (("runtimeConfig.ips", runtime_ips), ("args.cni.ips", cni_ips)):
        if values is None:
            continue
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise CniError(E_INVALID_CONFIG, f"invalid network config: {source} must be a list of strings")
        values = [v.strip() for v in values]
        _check_addresses(values, source, E_INVALID_CONFIG)
        return values
    if args.get("IP"):
        values = [v.strip() for v in args["IP"].split(",") if v.strip()]
        _check_addresses(values, "CNI_ARGS IP", E_INVALID_ENV)
        return values
    return []


def _labels_from(value, source):
    """A label set given either as {key: value} or as the convention's [{"key": k, "value": v}, ...].

    Only the shape is checked here; the agent checks every key and value by the rules policy selectors use
    (one set of rules, in policy/selector.py), before it creates anything. A missing "value" is "", as in
    Mesos' Label protobuf, where only the key is required.
    """
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list) and all(
        isinstance(e, dict) and "key" in e and set(e) <= {"key", "value"} for e in value
    ):
        items = [(e["key"], e.get("value", "")) for e in value]
    else:
        raise CniError(
            E_INVALID_CONFIG,
            f'invalid network config: {source} must be an object or a list of {{"key": ..., "value": ...}}',
        )
    for key, val in items:
        if not isinstance(key, str) or not key or not isinstance(val, str):
            raise CniError(
                E_INVALID_CONFIG,
                f"invalid network config: label {shown(key)}={shown(val)} in {source}",
                "label keys must be non-empty strings and values strings",
            )
    return dict(items)


def _mesos_labels(conf_args):
    """Mesos' network/cni isolator passes the task's NetworkInfo as args."org.apache.mesos".network_info,
    its labels as {"labels": [{"key": k, "value": v}, ...]} (the protobuf's JSON form)."""
    source = 'args."org.apache.mesos".network_info'
    mesos = conf_args.get("org.apache.mesos")
    if mesos is None:
        return {}
    if not isinstance(mesos, dict):
        raise CniError(E_INVALID_CONFIG, 'invalid network config: args."org.apache.mesos" must be an object')
    info = mesos.get("network_info")
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise CniError(E_INVALID_CONFIG, f"invalid network config: {source} must be an object")
    labels = info.get("labels")
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not isinstance(labels.get("labels", []), list):
        raise CniError(
            E_INVALID_CONFIG,
            f'invalid network config: {source}.labels must be {{"labels": [{{"key": ..., "value": ...}}, ...]}}',
        )
    return _labels_from(labels.get("labels", []), source + ".labels.labels")


def endpoint_labels(conf, args):
    """Labels for the endpoint: args.labels, args.cni.labels, Mesos' network labels, then the pod's namespace
    and name. A pod name longer than a label value may be (63) is left out rather than failing the ADD: select
    such pods by namespace or by their own labels."""
    labels = {}
    conf_args = conf.get("args", {})
    if conf_args.get("labels") is not None:
        labels.update(_labels_from(conf_args["labels"], "args.labels"))
    if isinstance(conf_args.get("cni"), dict) and conf_args["cni"].get("labels") is not None:
        labels.update(_labels_from(conf_args["cni"]["labels"], "args.cni.labels"))
    labels.update(_mesos_labels(conf_args))
    if args.get("K8S_POD_NAMESPACE"):
        labels[LABEL_NAMESPACE] = args["K8S_POD_NAMESPACE"]
    if args.get("K8S_POD_NAME") and len(args["K8S_POD_NAME"]) <= 63:
        labels[LABEL_POD] = args["K8S_POD_NAME"]
    return labels


def valid_attachments(conf):
    """GC's list of attachments still in use; missing means refuse, never 'everything is stale'."""
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):  # libcni sends both names
        if key in conf:
            value = conf[key]
            break
    else:
        raise CniError(E_INVALID_CONFIG, "invalid network config: GC needs cni.dev/valid-attachments")
    if not isinstance(value, list):
        raise CniError(E_INVALID_CONFIG, f"invalid network config: {key} must be a list")
    out = []
    for entry in value:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("containerID"), str)
            or not isinstance(entry.get("ifname", ""), str)
        ):
            raise CniError(
                E_INVALID_CONFIG,
                f"invalid network config: bad entry {shown(entry)} in {key}",
                "each entry needs a containerID and an ifname",
            )
        out.append({"containerID": entry["containerID"], "ifname": entry.get("ifname", "")})
    return out


# --------------------------------------------------------------------------------------------- result shapes


def normalize_result(result, what, code):
    """Any version's result -> our internal shape (1.1.0 without cniVersion). Bad shapes raise ``code``."""

    def bad(why):
        return CniError(code, f"malformed {what}: {why}")

    if not isinstance(result, dict):
        raise bad("not an object")
    out = {}
    for key in ("interfaces", "ips", "routes"):
        items = result.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise bad(f"{key} must be a list of objects")
        out[key] = [dict(i) for i in items]
    for iface in out["interfaces"]:
        if not isinstance(iface.get("name"), str):
            raise bad("an interface has no name")
    for ip in out["ips"]:
        ip.pop("version", None)  # 0.x only; 1.x derives the family from the address
        if not isinstance(ip.get("address"), str):
            raise bad("an ips entry has no address")
        index = ip.get("interface")
        if index is not None and (
            isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(out["interfaces"])
        ):
            raise bad(f"ips entry {ip['address']} points at interface {shown(index)}, which does not exist")
    for route in out["routes"]:
        if not isinstance(route.get("dst"), str):
            raise bad("a route has no dst")
    dns = result.get("dns") or {}
    if not isinstance(dns, dict):
        raise bad("dns must be an object")
    out["dns"] = dns
    return out


def shape_result(result, version):
    """Internal result -> the JSON the spec defines for ``version``."""
    new = version == "1.1.0"
    iface_keys = _IFACE_KEYS_1_1 if new else _IFACE_KEYS_OLD
    route_keys = _ROUTE_KEYS_1_1 if new else _ROUTE_KEYS_OLD
    with_family = parse_version(version) < (1, 0, 0)

    def pick(entry, keys):
        return {k: entry[k] for k in keys if entry.get(k) not in (None, "")}

    out = {"cniVersion": version}
    interfaces = [pick(i, iface_keys) for i in result["interfaces"]]
    ips = []
    for ip in result["ips"]:
        shaped = {"version": "6" if ":" in ip["address"] else "4"} if with_family else {}
        shaped.update(pick(ip, ("address", "gateway")))
        if ip.get("interface") is not None:
            shaped["interface"] = ip["interface"]
        ips.append(shaped)
    routes = [pick(r, route_keys) for r in result["routes"]]
    if interfaces:
        out["interfaces"] = interfaces
    if ips:
        out["ips"] = ips
    if routes:
        out["routes"] = routes
    out["dns"] = {k: result["dns"][k] for k in _DNS_KEYS if result["dns"].get(k)}
    return out


def chain_results(prev, ours):
    """Append our interfaces, addresses and routes to an earlier plugin's result, re-pointing our indexes."""
    offset = len(prev["interfaces"])
    ips = [
        dict(ip, interface=ip["interface"] + offset) if ip.get("interface") is not None else dict(ip)
        for ip in ours["ips"]
    ]
    return {
        "interfaces": prev["interfaces"] + ours["interfaces"],
        "ips": prev["ips"] + ips,
        "routes": prev["routes"] + ours["routes"],
        "dns": prev["dns"] or ours["dns"],
    }


# ------------------------------------------------------------------------------------------- agent transport


def call_agent(path, body, read_timeout, connect_timeout=CONNECT_TIMEOUT):
    """POST ``body`` to the agent and return its ``result``; the agent's ``error`` is raised as a CniError.

    HTTP/1.1 is spoken by hand (one request, ``Connection: close``): http.client would cost about 25 ms of
    imports (email, ssl) on every call, more than everything else the plugin does.
    """
    import time

    import _socket

    where = path if len(path) <= 200 else shown(path)

    def unreachable(why):
        return CniError(
            E_TRY_AGAIN,
            f"netplugin agent at {where} is not reachable: {why}",
            "is the netplugin agent running? try again later",
        )

    deadline = time.monotonic() + connect_timeout
    payload = json_dumps(body).encode()
    head = (
        f"POST {AGENT_PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        reader = _HttpReader(sock)
        try:
            sock.settimeout(connect_timeout)
            sock.connect(path)
            sock.sendall(head)
            status, headers = reader.head(deadline)  # 100 Continue, or a final answer straight away
        except TimeoutError:
            raise unreachable(f"no answer within {connect_timeout:g} s")
        except (OSError, ValueError) as err:
            raise unreachable(getattr(err, "strerror", None) or str(err))
        try:
            sock.settimeout(read_timeout)
            if status == 100:
                sock.sendall(payload)
                status, headers = reader.head(None)
                while 100 <= status < 200:  # any further interim answer
                    status, headers = reader.head(None)
            raw = reader.body(headers)
        except TimeoutError:
            raise CniError(
                E_TRY_AGAIN,
                f"netplugin agent at {where} gave no answer within {read_timeout:g} s",
                "raise agent_timeout in the network config if the agent is just slow",
            )
        except (OSError, ValueError) as err:
            raise CniError(E_TRY_AGAIN, f"lost the connection to the netplugin agent at {where}: {err}")
    finally:
        sock.close()
    return _agent_reply(status, raw)


class _HttpReader:
    """Just enough of an HTTP/1.1 response parser for the agent's answers: a status line and headers, then a
    body framed by Content-Length, chunked, or the end of the connection. Malformed input raises ValueError."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self, deadline):
        if deadline is not None:
            import time

            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionResetError(0, "the agent closed the connection")
        self.buf += data

    def head(self, deadline):
        """(status, {lower-case header: value}) of the next response head."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 65536:
                raise ValueError("response head too long")
            self._fill(deadline)
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"malformed status line {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def _exactly(self, n):
        while len(self.buf) < n:
            self._fill(None)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill(None)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def body(self, headers):
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = b""
            while True:
                size = int(self._line().split(b";")[0].strip() or b"x", 16)
                if size == 0:
                    return out
                out += self._exactly(size)
                self._line()
        if "content-length" in headers:
            return self._exactly(int(headers["content-length"]))
        while True:  # no framing: the body runs to the end of the connection
            try:
                self._fill(None)
            except ConnectionResetError:
                data, self.buf = self.buf, b""
                return data


def _agent_reply(status, raw):
    try:
        reply = json_loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict) or not ("result" in reply or "error" in reply):
        raise CniError(
            E_INTERNAL,
            f"netplugin agent answered HTTP {status} without a CNI reply",
            raw[:200].decode("utf-8", "replace"),
        )
    if "error" in reply:
        err = reply["error"]
        if not isinstance(err, dict):
            raise CniError(E_INTERNAL, "netplugin agent sent a malformed error", repr(err)[:200])
        code = err.get("code")
        if isinstance(code, bool) or not isinstance(code, int) or code <= 0:
            code = E_INTERNAL
        raise CniError(code, str(err.get("msg") or "netplugin agent failed"), str(err.get("details") or ""))
    return reply["result"]


# ------------------------------------------------------------------------------------------------- commands


def agent_request(command, params, conf, extra=None):
    body = {
        "command": command,
        "container_id": params["container_id"],
        "netns": params["netns"],
        "ifname": params["ifname"],
        "args": params["args"],
        "config": conf,
    }
    body.update(extra or {})
    return body


def prev_result(conf, required=False, command=""):
    if "prevResult" not in conf or conf["prevResult"] is None:
        if required:
            raise CniError(E_INVALID_CONFIG, f"invalid network config: {command} needs prevResult")
        return None
    return normalize_result(conf["prevResult"], "prevResult in the network config", E_INVALID_CONFIG)


def cmd_add(params, conf, version, agent):
    prev = prev_result(conf)
    extra = {
        "ips": requested_ips(conf, params["args"]),
        "labels": endpoint_labels(conf, params["args"]),
        "prev_result": prev,
    }
    ours = normalize_result(
        agent(agent_request("ADD", params, conf, extra)), "result from the netplugin agent", E_INTERNAL
    )
    if not ours["interfaces"] or not ours["ips"]:
        raise CniError(E_INTERNAL, "malformed result from the netplugin agent: no interface or no address")
    return shape_result(chain_results(prev, ours) if prev else ours, version)


def cmd_del(params, conf, version, agent):
    # Nothing of the config but its name is checked further: a DEL must clean up after an ADD it refused.
    try:
        agent(agent_request("DEL", params, conf))
    except CniError as err:
        if err.code != E_UNKNOWN_CONTAINER:  # already gone: DEL is idempotent
            raise
    return None


def cmd_check(params, conf, version, agent):
    extra = {"prev_result": prev_result(conf, required=True, command="CHECK")}
    agent(agent_request("CHECK", params, conf, extra))
    return None


def cmd_status(params, conf, version, agent):
    try:
        agent(agent_request("STATUS", params, conf))
    except CniError as err:
        if err.code == E_TRY_AGAIN:  # for STATUS, an absent agent means "cannot serve ADD" (spec code 50)
            raise CniError(E_PLUGIN_UNAVAILABLE, err.msg, err.details)
        raise
    return None


def cmd_gc(params, conf, version, agent):
    agent(agent_request("GC", params, conf, {"valid_attachments": valid_attachments(conf)}))
    return None


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}


def version_info():
    return {"cniVersion": SPEC_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def run(environ, stdin):
    """Do what CNI_COMMAND asks; return (exit status, JSON object to print or None)."""
    error_version = SPEC_VERSION
    try:
        command = environ.get("CNI_COMMAND", "")
        if not command:
            raise CniError(E_INVALID_ENV, "required env variables [CNI_COMMAND] missing")
        if command == "VERSION":
            return 0, version_info()  # stdin is not read: the spec passes nothing we need
        if command not in COMMANDS:
            raise CniError(
                E_INVALID_ENV,
                f"unknown CNI_COMMAND {shown(command)}",
                "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION",
            )
        params = read_params(command, environ)
        conf = read_config(stdin)
        version = error_version = config_version(conf)
        check_config(conf, command, version)
        path, read_timeout = agent_settings(conf, environ)
        result = COMMANDS[command](params, conf, version, lambda body: call_agent(path, body, read_timeout))
        return 0, result
    except CniError as err:
        # Capped: an agent's message may quote input of any size, and a runtime logs this line as it is.
        out = {"cniVersion": error_version, "code": err.code, "msg": _cut(err.msg, MAX_MESSAGE)}
        if err.details:
            out["details"] = _cut(err.details, MAX_MESSAGE)
        return 1, out
    except Exception as err:  # a bug: still answer in the spec's format, with the traceback on stderr
        import traceback

        traceback.print_exc(file=sys.stderr)
        return 1, {"cniVersion": error_version, "code": E_INTERNAL, "msg": f"internal error: {shown(err, 300)}"}


def environment():
    """``os.environ``'s content, without importing ``os`` (2 ms of a CNI call's 15 on a busy host, measured): the
    builtin ``posix`` module holds the environment as bytes, decoded here the way ``os.environ`` decodes it."""
    import posix

    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    return {k.decode(encoding, errors): v.decode(encoding, errors) for k, v in posix.environ.items()}


def main():
    status, out = run(environment(), sys.stdin.buffer)
    if out is not None:
        sys.stdout.write(json_dumps(out) + "\n")
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing is left to clean up (output flushed, the agent socket closed): skip the interpreter's teardown of
    # every module, 1.3 ms of each call (measured against a plain exit).
    import posix

    posix._exit(status)
