"""Leader election on one key: whoever creates it leads while the key lasts.

The key rides on the candidate's liveness lease (netplugin.nodes.Liveness), so the one keep-alive per beat that
keeps the host alive also keeps its leadership, and a host whose liveness lapses (dead to its peers) loses the
leadership with it: it must not reclaim. A campaign is one transaction; the leader needs none to stay leader.
"""

import logging

from netplugin.datastore import keys
from netplugin.datastore.client import absent, get_op, put_op
from netplugin.errors import NetpluginError

LOG = logging.getLogger(__name__)


class Election:
    def __init__(self, datastore, role, me, liveness):
        self.ds = datastore
        self.key = keys.leader(role)
        self.me = me
        self.liveness = liveness
        self.held_on = None  # the liveness lease our key was created on, while we hold it
        self.error = None  # why the last campaign could not ask etcd (None: it could)

    def campaign(self):
        """Take the key if nobody holds it; True while this process is the leader. One transaction."""
        lease = self.liveness.lease
        self.error = None
        if lease is None:
            return False
        try:
            res = self.ds.txn([absent(self.key)], [put_op(self.key, {"holder": self.me}, lease)], [get_op(self.key)])
        except NetpluginError as e:
            LOG.warning("leader election for %s: %s", self.key, e)
            self.error = e.msg
            return False
        if res.succeeded:
            LOG.info("became leader for %s", self.key)
            self.held_on = lease
        else:
            current = res.kvs(0)
            self.held_on = lease if current and current[0].lease == lease else None
        return self.held_on is not None

    def still_leading(self):
        """No request: our key's lease is the liveness lease and its beat confirmed it recently enough."""
        return self.held_on is not None and self.liveness.holds(self.held_on)
