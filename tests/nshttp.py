"""HTTP GET to an address reachable only inside a test's network namespace, without a process per request: the
socket is connected on a short-lived thread that entered the namespace (netplugin.kernel.netns.in_netns)."""

import http.client
import json
import os
import socket
import urllib.parse

from netplugin.kernel.netns import in_netns


def get(ns, host, port, path, timeout=5.0):
    """(status, body text) of ``GET path`` from ``host:port`` as seen from namespace ``ns``."""
    ns_path = f"/run/netns/{ns}"
    fd = os.open(ns_path, os.O_RDONLY)
    try:
        sock = in_netns(fd, ns_path, lambda: socket.create_connection((host, port), timeout=timeout))
    finally:
        os.close(fd)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def promql(ns, port, query):
    """A Prometheus instant query's result vector ([] when nothing matches), asked from inside ``ns``."""
    status, body = get(ns, "127.0.0.1", port, "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", (query, status, body)
    return answer["data"]["result"]
