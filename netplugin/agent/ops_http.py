"""The operator's HTTP listener (``--metrics-listen ADDR:PORT``): ``/metrics`` for Prometheus, ``/livez`` and
``/readyz`` for probes.

Both probes read the agent's one health answer (``Agent.health``, also served as ``/v1/health`` on the agent's
socket and shown by ``netctl node health``): ``/readyz`` is its ``ok`` (synced, etcd reachable, BIRD up),
``/livez`` is whether every agent thread is still alive (``threads_dead`` empty). 200 when true, 503 when not,
the health answer as the JSON body. Served by the standard library's WSGI server, one thread per request on a
thread of its own: a slow scrape never touches the agent's loops or its CNI socket.
"""

import json
import logging
import socket
import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from netplugin.errors import InvalidInput

LOG = logging.getLogger(__name__)


def parse_listen(value):
    """'ADDR:PORT' (IPv6 as '[ADDR]:PORT') -> (addr, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"--metrics-listen {value!r} must be ADDR:PORT (e.g. 127.0.0.1:9469 or [::1]:9469)")
    return host.strip("[]") or "0.0.0.0", int(port)


def create_ops_app(registry, health):
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/livez", "/readyz"):
            answer = health()
            ok = not answer.get("threads_dead") if path == "/livez" else answer["ok"]
            body = json.dumps(dict(answer, probe=path[1:], probe_ok=ok), default=str).encode()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return metrics(environ, start_response)

    return app


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):  # one line per scrape would drown the agent's log
        pass


class OpsServer:
    """``/metrics``, ``/livez`` and ``/readyz`` on ``listen`` in a daemon thread; ``close()`` stops it."""

    def __init__(self, listen, registry, health):
        addr, port = parse_listen(listen)
        server_class = _Server
        if ":" in addr:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            self._httpd = make_server(
                addr, port, create_ops_app(registry, health), server_class=server_class, handler_class=_QuietHandler
            )
        except OSError as e:
            raise InvalidInput(f"cannot listen for metrics on {listen}: {e.strerror}") from None
        self.url = f"http://{listen}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self):
        self._thread.start()
        LOG.info("event=api.listening name=metrics url=%s", self.url)
        return self

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()
