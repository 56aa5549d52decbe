"""What this agent remembers of its Docker endpoints between libnetwork's calls.

The protocol repeats nothing: CreateEndpoint alone carries the addresses and MAC, Join alone the sandbox, and
later calls only ids. Keeping these in memory keeps etcd reads off Join's path (deciding whether a sandbox
already has a netplugin interface, answering EndpointOperInfo). After an agent restart the joined endpoints
are read back once from their etcd records, on first need; an endpoint created but not yet joined when the
agent restarted is lost (its Join fails with a clear error and Docker's retry of the container start works).
"""

import threading
from dataclasses import dataclass, field


@dataclass
class Created:
    network_id: str
    addresses: list
    mac: str | None = None


@dataclass
class Joined:
    sandbox: str
    network: str  # netplugin network name
    host_ifname: str
    addresses: list = field(default_factory=list)


class LocalEndpoints:
    def __init__(self, list_records):
        """``list_records()`` returns this host's Endpoint records (the warm-up after a restart)."""
        self._list_records = list_records
        self._created = {}
        self._joined = {}
        self._warm = False
        self._lock = threading.Lock()

    def created(self, endpoint_id, network_id, addresses, mac):
        with self._lock:
            self._created[endpoint_id] = Created(network_id, list(addresses), mac)

    def pending(self, endpoint_id):
        with self._lock:
            return self._created.get(endpoint_id)

    def joined(self, endpoint_id, sandbox, network, host_ifname, addresses):
        with self._lock:
            self._joined[endpoint_id] = Joined(sandbox, network, host_ifname, list(addresses))

    def forget(self, endpoint_id):
        with self._lock:
            self._created.pop(endpoint_id, None)
            self._joined.pop(endpoint_id, None)

    def _warm_up(self):
        with self._lock:
            if self._warm:
                return
        records = [ep for ep in self._list_records() if ep.orchestrator == "docker"]
        with self._lock:
            for ep in records:
                self._joined.setdefault(ep.id, Joined(ep.netns, ep.network, ep.host_ifname, list(ep.addresses)))
            self._warm = True

    def peers(self, sandbox, endpoint_id):
        """Network names of this sandbox's other netplugin endpoints."""
        self._warm_up()
        with self._lock:
            return [j.network for eid, j in self._joined.items() if j.sandbox == sandbox and eid != endpoint_id]

    def info(self, endpoint_id):
        with self._lock:
            j = self._joined.get(endpoint_id)
            c = self._created.get(endpoint_id)
        if j is not None:
            return {"host_ifname": j.host_ifname, "addresses": ",".join(j.addresses)}
        return {"addresses": ",".join(c.addresses)} if c is not None else None
