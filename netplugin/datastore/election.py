"""Leader election on one key held by a lease: whoever creates it leads until its lease lapses."""
import logging

from netplugin.datastore import keys
from netplugin.datastore.client import absent, get_op, put_op
from netplugin.errors import NetpluginError

LOG = logging.getLogger(__name__)


class Election:
    def __init__(self, datastore, role, me, ttl=10):
        self.ds = datastore
        self.key = keys.leader(role)
        self.me = me
        self.ttl = ttl
        self.lease = None

    def campaign(self):
        """Try to lead (or keep leading); True while this process is the leader. Call every ttl/3 seconds."""
        try:
            if self.lease and self.ds.refresh_lease(self.lease) <= 0:
                self.lease = None
            if self.lease is None:
                self.lease = self.ds.grant_lease(self.ttl)
            res = self.ds.txn([absent(self.key)], [put_op(self.key, {"holder": self.me}, self.lease)],
                              [get_op(self.key)])
            if res.succeeded:
                LOG.info("became leader for %s", self.key)
                return True
            current = res.kvs(0)
            return bool(current) and current[0].lease == self.lease
        except NetpluginError as e:
            LOG.warning("leader election for %s: %s", self.key, e)
            return False
