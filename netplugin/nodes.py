"""Node registration and liveness.

A node record (``nodes/<host>``) is permanent configuration; liveness (``liveness/<host>``) is a key bound to an
etcd lease the agent keeps alive. When the agent (or its host) dies the lease lapses, the key vanishes, and the
reclaimer starts the grace clock for that host.
"""

import logging
import socket
import time

from netplugin.datastore import keys
from netplugin.datastore.models import Node
from netplugin.errors import NetpluginError

LOG = logging.getLogger(__name__)


def autodetect_address():
    """The address this namespace would use to reach the outside: a default only, shown by ``netctl node list``."""
    for family, probe in ((socket.AF_INET, "192.0.2.1"),):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.connect((probe, 9))  # UDP connect sends nothing; it only picks a source address
                return s.getsockname()[0]
            except OSError:
                return None
    return None


class NodeRegistry:
    def __init__(self, datastore):
        self.ds = datastore

    def register(self, node):
        """Create or update this node's record, keeping fields an operator set (route reflector, labels)."""
        kv = self.ds.get(keys.node(node.name))
        if kv:
            old = Node.from_dict(kv.value)
            node.route_reflector = node.route_reflector or old.route_reflector
            node.labels = {**old.labels, **node.labels}
            if node.as_number is None:
                node.as_number = old.as_number
        self.ds.put(keys.node(node.name), node.to_dict())
        return node

    def list(self):
        return [n for _, n in Node.from_kvs(self.ds.list(keys.NODES))]

    def get(self, name):
        kv = self.ds.get(keys.node(name))
        return Node.from_dict(kv.value) if kv else None

    def alive(self):
        """Names of hosts whose liveness key exists."""
        return {keys.last_segment(kv.key) for kv in self.ds.list(keys.LIVENESS)}


class Liveness:
    """Holds ``liveness/<host>`` on a lease; ``beat`` is called periodically (every ttl/3). The reclaimer
    leadership's key rides on the same lease (netplugin.datastore.election)."""

    def __init__(self, datastore, host, ttl=10):
        self.ds = datastore
        self.host = host
        self.ttl = ttl
        self.lease = None
        self._alive_until = 0.0  # monotonic: the lease lasts at least until then (from the last good beat)

    def renew(self):
        """Keep (or take anew) the lease and the key on it; raises NetpluginError when etcd does not answer."""
        sent = time.monotonic()
        if self.lease:
            ttl = self.ds.refresh_lease(self.lease)
            if ttl > 0:
                self._alive_until = sent + ttl
                return
        lease = self.ds.grant_lease(self.ttl)
        self.ds.put(keys.liveness(self.host), {"host": self.host}, lease=lease)
        self.lease, self._alive_until = lease, sent + self.ttl  # only once the key is on it
        LOG.info("liveness for %s held on lease %x", self.host, self.lease)

    def holds(self, lease):
        """``lease`` is ours and certainly alive for another third of the TTL: keys on it are still there
        (a beat may be late by up to a third of the TTL before this turns False, well before the lease lapses)."""
        return lease == self.lease and time.monotonic() < self._alive_until - self.ttl / 3.0

    def beat(self):
        """``renew``, logging a failure instead of raising; True when the key is held."""
        try:
            self.renew()
            return True
        except NetpluginError as e:
            LOG.warning("liveness heartbeat for %s failed: %s", self.host, e)
            return False
