"""The agent's local API for the CNI binary: ``POST /v1/cni`` on ``<run-dir>/agent.sock``.

The binary (cni/plugin.py) validates the runtime's environment and config and shapes results per cniVersion;
this side turns a request into service calls and answers 1.1.0-shaped results or ``{"error": {code, msg}}``.
Handlers only parse and validate, then call the EndpointService (STYLE.md #8).
"""

import logging

import netaddr
from flask import Flask, jsonify, request

from cni.plugin import shown
from netplugin.errors import InvalidInput, NetpluginError
from netplugin.service.endpoints import WorkloadRequest, endpoint_id, gateways
from policy.selector import check_label_key, check_label_value
from policy.validation import FieldError

LOG = logging.getLogger(__name__)
CNI_COMMANDS = {"ADD", "DEL", "CHECK", "STATUS", "GC"}
LABEL_RULES = (
    "a label key is [prefix/]name (prefix a DNS subdomain); name and value have at most 63 letters,"
    " digits, '-', '_' or '.', starting and ending with a letter or digit (the value may be empty)"
)


def _error(code, msg, details=""):
    return jsonify({"error": {"code": code, "msg": msg, "details": details}})


def _text(body, field, default=""):
    value = body.get(field)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{field} must be UTF-8 text, not {shown(value)}") from None
    return value


def _flag(ipam, field, default):
    value = ipam.get(field, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"ipam.{field} must be true or false, not {shown(value)}")
    return value


def _labels(raw):
    """The endpoint's labels (args.labels, args.cni.labels and Mesos' network labels, as the binary gathered
    them), each key and value checked by the rules policy selectors use, before anything is created: a label no
    selector can name would be stored but never selected."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise InvalidInput("labels must be an object")
    for key, value in raw.items():
        try:
            check_label_key(key, ())
        except FieldError:
            raise InvalidInput(f"invalid endpoint label {shown(key)}={shown(value)}: bad key", LABEL_RULES) from None
        try:
            check_label_value(value, ())
        except FieldError:
            raise InvalidInput(f"invalid endpoint label {shown(key)}={shown(value)}: bad value", LABEL_RULES) from None
    return dict(raw)


def _network(body):
    config = body.get("config") or {}
    if not isinstance(config, dict):
        raise InvalidInput("config must be a JSON object")
    network = config.get("name")
    if not network or not isinstance(network, str):
        raise InvalidInput("network config has no name")
    return config, network


def _identity(body):
    """(network, container id, ifname, netns): all DEL and CHECK need, so a DEL of a config that ADD refused
    (bad labels, bad pools) still cleans up."""
    _, network = _network(body)
    container_id = _text(body, "container_id")
    if not container_id:
        raise InvalidInput("no container id")
    return network, container_id, _text(body, "ifname", "eth0"), _text(body, "netns")


def _workload(body):
    config, network = _network(body)
    _, container_id, ifname, netns = _identity(body)
    ipam = config.get("ipam") or {}
    if not isinstance(ipam, dict):
        raise InvalidInput("ipam must be an object")
    pools = ipam.get("pools") or []
    if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
        raise InvalidInput("ipam.pools must be a list of CIDRs")
    for pool in pools:
        try:
            netaddr.IPNetwork(pool)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise InvalidInput(f"ipam.pools: {shown(pool)} is not a CIDR") from None
    want6 = _flag(ipam, "assign_ipv6", any(":" in p for p in pools))
    want4 = _flag(ipam, "assign_ipv4", True)
    addresses = []
    ips = body.get("ips") or []
    if not isinstance(ips, list):
        raise InvalidInput("ips must be a list of addresses")
    for raw in ips:
        try:
            addresses.append(str(netaddr.IPNetwork(str(raw)).ip))
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise InvalidInput(f"requested address {shown(raw)} is not an IP address") from None
    mtu = config.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535):
        raise InvalidInput(f"mtu {shown(mtu)} must be an integer from 576 to 65535")
    return WorkloadRequest(
        network=network,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        addresses=addresses,
        labels=_labels(body.get("labels")),
        pools=pools,
        ipv4=want4,
        ipv6=want6,
        mtu=mtu,
        orchestrator="cni",
    )


def result_of(ep):
    """A CNI 1.1.0 result for an endpoint (the binary converts it to older shapes)."""
    ips, routes = [], []
    for addr, gw in zip(ep.addresses, gateways(ep.addresses)):
        ips.append({"address": addr, "gateway": gw, "interface": 0})
        default = "0.0.0.0/0" if netaddr.IPNetwork(addr).version == 4 else "::/0"
        if not any(r["dst"] == default for r in routes):
            routes.append({"dst": default, "gw": gw})
    return {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": ep.ifname, "mac": ep.mac, "sandbox": ep.netns}],
        "ips": ips,
        "routes": routes,
        "dns": {},
    }


def create_cni_app(service, status_check, health=None):
    """``status_check()`` raises NetpluginError when the agent cannot serve (etcd down, no pool); ``health()``
    returns the agent's health answer (a dict with ``ok``), served with status 503 when not ok."""
    app = Flask("netplugin-cni")

    @app.post("/v1/cni")
    def cni():
        try:
            body = request.get_json(silent=True)
        except RecursionError:  # silent=True covers malformed JSON, not JSON nested deeper than our stack
            return _error(6, "request body is nested too deeply")
        if not isinstance(body, dict):
            return _error(6, "request body is not a JSON object")
        command = body.get("command")
        if command not in CNI_COMMANDS:
            return _error(4, f"unknown CNI command {command!r}")
        try:
            return jsonify({"result": _dispatch(service, status_check, command, body)})
        except NetpluginError as e:
            code = e.cni_code
            if command == "STATUS":
                code = 50
            LOG.warning("CNI %s %s failed: %s", command, shown(body.get("container_id", "")), e.msg)
            return _error(code, e.msg, e.details)
        except Exception as e:  # a bug of ours: logged with its traceback, answered in the spec's shape
            LOG.exception("CNI %s %s: internal error", command, shown(body.get("container_id", "")))
            return _error(999, f"internal error in the netplugin agent: {type(e).__name__}: {shown(str(e), 300)}")

    @app.get("/v1/health")
    def health_answer():
        if health is None:
            return jsonify({"ok": True})
        try:
            answer = health()
        except Exception as e:  # noqa: BLE001 - the health answer itself must always answer
            LOG.exception("event=health.failed")
            answer = {"ok": False, "problems": [f"health check failed: {type(e).__name__}: {e}"]}
        return jsonify(answer), (200 if answer.get("ok") else 503)

    return app


def _dispatch(service, status_check, command, body):
    if command == "STATUS":
        status_check()
        return {}
    if command == "GC":
        return _gc(service, body)
    if command == "ADD":
        return result_of(service.add(_workload(body)))
    network, container_id, ifname, netns = _identity(body)
    ep_id = endpoint_id(network, container_id, ifname)
    if command == "DEL":
        service.delete(ep_id, netns or None, ifname)
        return {}
    # CHECK: compare with what the runtime was told (prevResult) and with the kernel.
    prev = body.get("prev_result") or {}
    ips = prev.get("ips") if isinstance(prev, dict) else None
    expected = [ip["address"] for ip in ips or [] if isinstance(ip, dict) and isinstance(ip.get("address"), str)]
    problems = service.check(ep_id, netns or None, expected or None)
    if problems:
        raise InvalidInput("; ".join(problems))
    return {}


def _gc(service, body):
    _, network = _network(body)
    attachments = body.get("valid_attachments")
    if not isinstance(attachments, list):
        raise InvalidInput("GC needs the list of valid attachments")
    valid = {
        (a.get("containerID"), a.get("ifname"))
        for a in attachments
        if isinstance(a, dict) and isinstance(a.get("containerID"), str) and isinstance(a.get("ifname"), str)
    }
    removed = []
    for ep in service.list(service.host):
        if ep.network == network and ep.orchestrator == "cni" and (ep.container_id, ep.ifname) not in valid:
            service.delete(ep.id, ep.netns, ep.ifname)
            removed.append(ep.id)
    if removed:
        LOG.info("CNI GC for %s removed %d stale endpoint(s)", network, len(removed))
    return {}
