"""The Docker plugin API: libnetwork's remote NetworkDriver and IpamDriver protocols over HTTP on a unix socket.

Every call is ``POST /<Interface>.<Method>`` with a JSON body (possibly empty) and answers JSON with the
plugin media type. Handlers only parse and validate the payload, then call the DockerDriver (STYLE.md #8).

Errors: an operation that cannot be done answers ``{"Err": "<one line>"}`` (HTTP 200, as the protocol asks;
libnetwork shows the text to the user; the same text is also under ``Error``, the key IPAM answers use); a
body that is not a JSON object answers 400 and an unknown method 404 (libnetwork reads 404 as "not
implemented"), both with ``Err`` too; a bug answers 500 with ``Err`` and logs the traceback.

The payload is checked before any handler runs: a JSON object of valid Unicode (no lone surrogates, which
etcd keys and log lines cannot carry), not nested absurdly deep; ids are Docker-id-like words. The text of
an error is one line of bounded length, however much of the input it quotes.
"""

import json
import logging
import re

from flask import Flask, Response, request

from netplugin.errors import InvalidInput, NetpluginError

LOG = logging.getLogger(__name__)
MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"
IMPLEMENTS = ["NetworkDriver", "IpamDriver"]
ERR_HEAD, ERR_TAIL = 240, 160  # an error quoting a huge input keeps its start and its end (the hint)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # Docker's ids are 64 hex digits


def _reply(body, status=200):
    return Response(json.dumps(body), status=status, mimetype=MEDIA_TYPE)


def one_line(msg):
    """``msg`` as one line an operator can read, however much input it quotes."""
    msg = " ".join(str(msg).splitlines())
    if len(msg) > ERR_HEAD + ERR_TAIL:
        msg = f"{msg[:ERR_HEAD]} ...({len(msg) - ERR_HEAD - ERR_TAIL} characters cut)... {msg[-ERR_TAIL:]}"
    return msg


def _error(msg, status=200):
    # NetworkDriver answers decode the message from "Err", IpamDriver answers from "Error" (libnetwork's two
    # api.Response types); Go's decoder ignores the other key, so both are sent.
    msg = one_line(msg)
    return _reply({"Err": msg, "Error": msg}, status)


def _decode(method, raw):
    """The request body as a dict, or the error message saying why it is not one."""
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        return None, f"{method}: the request body is not valid JSON ({e})"
    except RecursionError:
        return None, f"{method}: the request body is nested too deeply"
    if body is None:
        body = {}  # Docker sends "null" to methods without arguments
    if not isinstance(body, dict):
        return None, f"{method}: the request body must be a JSON object, not {type(body).__name__}"
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return None, f"{method}: the request body holds text that is not valid Unicode (a lone surrogate escape)"
    except RecursionError:
        return None, f"{method}: the request body is nested too deeply"
    return body, None


# --- payload checks ------------------------------------------------------------------------------------------------


def _field(body, key, kind, required=False, default=None):
    value = body.get(key)
    if value is None:
        if required:
            raise InvalidInput(f"{key} is missing")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = {str: "a string", dict: "an object", list: "a list", bool: "true or false"}.get(kind, kind.__name__)
        raise InvalidInput(f"{key} must be {want}")
    if kind is str and required and not value:
        raise InvalidInput(f"{key} is empty")
    return value


def _id(body, key):
    value = _field(body, key, str, required=True)
    if not ID_PATTERN.fullmatch(value):
        raise InvalidInput(f"{key} {value!r} is not a Docker id (letters, digits, '_', '.', '-'; at most 128)")
    return value


def _ids(body, endpoint=True):
    out = [_id(body, "NetworkID")]
    if endpoint:
        out.append(_id(body, "EndpointID"))
    return out


def _ip_data(body, key):
    data = _field(body, key, list, default=[])
    if not all(isinstance(d, dict) for d in data):
        raise InvalidInput(f"{key} must be a list of objects")
    return data


def _options(body):
    opts = _field(body, "Options", dict, default={})
    return opts


# --- the methods ---------------------------------------------------------------------------------------------------


def _network_methods(driver):
    def create_network(b):
        driver.create_network(*_ids(b, False), _options(b), _ip_data(b, "IPv4Data"), _ip_data(b, "IPv6Data"))
        return {}

    def create_endpoint(b):
        iface = _field(b, "Interface", dict, default={})
        for k in ("Address", "AddressIPv6", "MacAddress"):
            _field(iface, k, str)
        answer = driver.create_endpoint(*_ids(b), iface, _options(b))
        return {"Interface": answer} if answer else {}

    def join(b):
        return driver.join(*_ids(b), _field(b, "SandboxKey", str, required=True), _options(b))

    def oper_info(b):
        return {"Value": driver.endpoint_info(*_ids(b))}

    def simple(fn, endpoint=True):
        def handler(b):
            fn(*_ids(b, endpoint))
            return {}

        return handler

    def nothing(b):
        return {}

    return {
        "GetCapabilities": lambda b: driver.capabilities(),
        "CreateNetwork": create_network,
        "DeleteNetwork": simple(driver.delete_network, endpoint=False),
        "AllocateNetwork": lambda b: {"Options": {}},  # Swarm managers only; we are local-scope
        "FreeNetwork": nothing,
        "CreateEndpoint": create_endpoint,
        "DeleteEndpoint": simple(driver.delete_endpoint),
        "EndpointOperInfo": oper_info,
        "Join": join,
        "Leave": simple(driver.leave),
        "DiscoverNew": nothing,
        "DiscoverDelete": nothing,
        "ProgramExternalConnectivity": nothing,  # no port mappings: containers are routed, not NATed
        "RevokeExternalConnectivity": nothing,
    }


def _ipam_methods(driver):
    def request_pool(b):
        pool_id, pool, data = driver.request_pool(
            _field(b, "AddressSpace", str, required=True),
            _field(b, "Pool", str, default=""),
            _field(b, "SubPool", str, default=""),
            _options(b),
            _field(b, "V6", bool, default=False),
        )
        return {"PoolID": pool_id, "Pool": pool, "Data": data}

    def request_address(b):
        address, data = driver.request_address(
            _field(b, "PoolID", str, required=True), _field(b, "Address", str, default=""), _options(b)
        )
        return {"Address": address, "Data": data}

    def release_address(b):
        driver.release_address(_field(b, "PoolID", str, required=True), _field(b, "Address", str, required=True))
        return {}

    def release_pool(b):
        driver.release_pool(_field(b, "PoolID", str, required=True))
        return {}

    return {
        "GetCapabilities": lambda b: driver.ipam_capabilities(),
        "GetDefaultAddressSpaces": lambda b: driver.address_spaces(),
        "RequestPool": request_pool,
        "ReleasePool": release_pool,
        "RequestAddress": request_address,
        "ReleaseAddress": release_address,
    }


def create_docker_app(driver):
    app = Flask("netplugin-docker")
    methods = {"Plugin.Activate": lambda b: {"Implements": IMPLEMENTS}}
    methods.update({f"NetworkDriver.{k}": v for k, v in _network_methods(driver).items()})
    methods.update({f"IpamDriver.{k}": v for k, v in _ipam_methods(driver).items()})

    # No automatic OPTIONS answer: every answer is the plugin's JSON, also to a method nobody should use.
    @app.route("/<path:method>", methods=["POST", "GET", "PUT", "DELETE"], provide_automatic_options=False)
    def call(method):
        handler = methods.get(method)
        if handler is None:
            return _error(
                f"netplugin does not implement {method!r} (it implements Plugin.Activate, "
                "NetworkDriver.* and IpamDriver.*)",
                404,
            )
        if request.method != "POST":
            return _error(f"{method} must be called with POST, not {request.method}", 405)
        body, why = _decode(method, request.get_data(cache=False))
        if why:
            return _error(why, 400)
        LOG.debug("docker call %s %s", method, body)
        try:
            answer = handler(body)
        except NetpluginError as e:
            LOG.warning("event=docker.call.failed method=%s error=%s", method, one_line(e.msg))
            return _error(e.msg)
        except Exception as e:  # noqa: BLE001 -- a bug: answer something libnetwork can show, keep the trace
            LOG.exception("event=docker.call.crashed method=%s", method)
            return _error(f"netplugin failed on {method}: internal error {type(e).__name__}: {e}", 500)
        LOG.debug("docker answer %s %s", method, answer)
        return _reply(answer)

    @app.errorhandler(404)
    def not_found(_):
        return _error(
            "netplugin does not implement this path (POST /Plugin.Activate, /NetworkDriver.*, /IpamDriver.*)", 404
        )

    @app.errorhandler(405)
    def not_allowed(_):
        return _error("only POST is supported", 405)

    return app
