"""A minimal read-only client of dockerd's API over its unix socket (stdlib only).

The remote driver protocol tells us ids, never names or labels: a network's name and labels and the container
behind an endpoint are read here. Every call is short (one GET, a few seconds' timeout) and failures become
``DockerApiError`` so callers can retry or fall back; nothing here ever writes to Docker.
"""

import http.client
import json
import socket
import urllib.parse

from netplugin.errors import NetpluginError


class DockerApiError(NetpluginError):
    """dockerd's API could not be asked (no socket, refused, timed out) or answered an error."""


class NotInDocker(DockerApiError):
    """dockerd answered 404: it does not (or not yet) know the object."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DockerApi:
    def __init__(self, socket_path, timeout=3.0):
        if socket_path.startswith("unix://"):
            socket_path = socket_path[len("unix://") :]
        self.socket_path = socket_path
        self.timeout = timeout

    def get(self, path, query=None):
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("GET", url, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        except OSError as e:
            raise DockerApiError(f"failed to ask dockerd at {self.socket_path} for {path}: {e}") from None
        finally:
            conn.close()
        if resp.status == 404:
            raise NotInDocker(f"dockerd does not know {path}")
        if resp.status != 200:
            raise DockerApiError(f"dockerd answered {resp.status} to {path}: {body[:200].decode(errors='replace')}")
        try:
            return json.loads(body)
        except ValueError:
            raise DockerApiError(f"dockerd answered {path} with something that is not JSON") from None

    def network(self, network_id):
        """The network as ``docker network inspect`` shows it (Name, Labels, Options, IPAM, Containers)."""
        return self.get(f"/networks/{urllib.parse.quote(network_id, safe='')}")

    def container(self, container_id):
        return self.get(f"/containers/{urllib.parse.quote(container_id, safe='')}/json")

    def container_of_endpoint(self, network_id, endpoint_id):
        """The id of the container whose attachment to the network is ``endpoint_id``, or None (not yet)."""
        for cid, info in (self.network(network_id).get("Containers") or {}).items():
            if (info or {}).get("EndpointID") == endpoint_id:
                return cid
        return None
