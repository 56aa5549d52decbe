"""The agent's local API for the CNI binary: ``POST /v1/cni`` on ``<run-dir>/agent.sock``.

The binary (cni/plugin.py) validates the runtime's environment and config and shapes results per cniVersion;
this side turns a request into service calls and answers 1.1.0-shaped results or ``{"error": {code, msg}}``.
Handlers only parse and validate, then call the EndpointService (STYLE.md #8).
"""
import logging

import netaddr
from flask import Flask, jsonify, request

from netplugin.errors import InvalidInput, NetpluginError
from netplugin.service.endpoints import WorkloadRequest, endpoint_id, gateways

LOG = logging.getLogger(__name__)
CNI_COMMANDS = {"ADD", "DEL", "CHECK", "STATUS", "GC"}


def _error(code, msg, details=""):
    return jsonify({"error": {"code": code, "msg": msg, "details": details}})


def _workload(body):
    config = body.get("config") or {}
    if not isinstance(config, dict):
        raise InvalidInput("config must be a JSON object")
    network = config.get("name")
    if not network or not isinstance(network, str):
        raise InvalidInput("network config has no name")
    ipam = config.get("ipam") or {}
    pools = ipam.get("pools") or []
    if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
        raise InvalidInput("ipam.pools must be a list of CIDRs")
    want6 = bool(ipam.get("assign_ipv6", any(":" in p for p in pools)))
    want4 = bool(ipam.get("assign_ipv4", True))
    addresses = []
    for raw in body.get("ips") or []:
        try:
            addresses.append(str(netaddr.IPNetwork(str(raw)).ip))
        except (netaddr.AddrFormatError, ValueError):
            raise InvalidInput(f"requested address {raw!r} is not an IP address") from None
    mtu = config.get("mtu")
    if mtu is not None and (not isinstance(mtu, int) or not 576 <= mtu <= 65535):
        raise InvalidInput(f"mtu {mtu!r} must be an integer from 576 to 65535")
    labels = body.get("labels") or {}
    if not isinstance(labels, dict):
        raise InvalidInput("labels must be an object")
    return WorkloadRequest(network=network, container_id=body.get("container_id") or "",
                           netns=body.get("netns") or "", ifname=body.get("ifname") or "eth0",
                           addresses=addresses, labels={str(k): str(v) for k, v in labels.items()},
                           pools=pools, ipv4=want4, ipv6=want6, mtu=mtu, orchestrator="cni")


def result_of(ep):
    """A CNI 1.1.0 result for an endpoint (the binary converts it to older shapes)."""
    ips, routes = [], []
    for addr, gw in zip(ep.addresses, gateways(ep.addresses)):
        ips.append({"address": addr, "gateway": gw, "interface": 0})
        default = "0.0.0.0/0" if netaddr.IPNetwork(addr).version == 4 else "::/0"
        if not any(r["dst"] == default for r in routes):
            routes.append({"dst": default, "gw": gw})
    return {"cniVersion": "1.1.0", "interfaces": [{"name": ep.ifname, "mac": ep.mac, "sandbox": ep.netns}],
            "ips": ips, "routes": routes, "dns": {}}


def create_cni_app(service, status_check, health=None):
    """``status_check()`` raises NetpluginError when the agent cannot serve (etcd down, no pool); ``health()``
    returns the agent's health answer (a dict with ``ok``), served with status 503 when not ok."""
    app = Flask("netplugin-cni")

    @app.post("/v1/cni")
    def cni():
        body = request.get_json(silent=True)
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
            LOG.warning("CNI %s %s failed: %s", command, body.get("container_id", ""), e.msg)
            return _error(code, e.msg, e.details)

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
    req = _workload(body)
    if not req.container_id:
        raise InvalidInput("no container id")
    ep_id = endpoint_id(req.network, req.container_id, req.ifname)
    if command == "ADD":
        return result_of(service.add(req))
    if command == "DEL":
        service.delete(ep_id, req.netns or None, req.ifname)
        return {}
    # CHECK: compare with what the runtime was told (prevResult) and with the kernel.
    prev = body.get("prev_result") or {}
    expected = [ip["address"] for ip in prev.get("ips", []) if isinstance(ip, dict) and "address" in ip]
    problems = service.check(ep_id, req.netns or None, expected or None)
    if problems:
        raise InvalidInput("; ".join(problems))
    return {}


def _gc(service, body):
    config = body.get("config") or {}
    network = config.get("name")
    if not network:
        raise InvalidInput("network config has no name")
    valid = {(a.get("containerID"), a.get("ifname")) for a in body.get("valid_attachments") or []
             if isinstance(a, dict)}
    removed = []
    for ep in service.list(service.host):
        if ep.network == network and ep.orchestrator == "cni" and (ep.container_id, ep.ifname) not in valid:
            service.delete(ep.id, ep.netns, ep.ifname)
            removed.append(ep.id)
    if removed:
        LOG.info("CNI GC for %s removed %d stale endpoint(s)", network, len(removed))
    return {}
