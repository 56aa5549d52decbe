"""Container labels onto Docker endpoint records, in the background after Join.

Join tells the driver neither the container nor its labels, and dockerd lists the container on the network
only once the container has started, after Join returned. So one daemon thread polls dockerd for each newly
joined endpoint with a short backoff (bounded: ``timeout`` seconds per endpoint), then updates the record with
a compare-and-swap so it never resurrects an endpoint deleted meanwhile. Join itself never waits for this.

Label precedence: the container's labels, then the network's, then ``netplugin.io/network``: a container
cannot claim another network by a label.
"""

import logging
import threading
import time

from netplugin import loops
from netplugin.datastore import keys
from netplugin.datastore.client import mod_is, put_op
from netplugin.datastore.models import Endpoint
from netplugin.errors import NetpluginError

LOG = logging.getLogger(__name__)
BACKOFF = (0.3, 0.2, 0.3, 0.5, 1.0)  # the first try after the container has usually started


class _Pending:
    def __init__(self, network_id, endpoint_id, base_labels, deadline):
        self.network_id = network_id
        self.endpoint_id = endpoint_id
        self.base_labels = base_labels
        self.deadline = deadline
        self.attempt = 0
        self.due = time.monotonic() + BACKOFF[0]


class EndpointLabeler:
    def __init__(self, ds, api, host, timeout=15.0, progress=None):
        self.ds = ds
        self.api = api
        self.host = host
        self.timeout = timeout
        self._pending = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._stop = threading.Event()
        self.progress = progress  # a netplugin.loops.Progress to report to (the agent's health), if any
        self.done = 0  # endpoints labelled (for tests and health)

    def submit(self, network_id, endpoint_id, base_labels):
        if self.api is None:
            return
        with self._lock:
            self._pending[endpoint_id] = _Pending(
                network_id, endpoint_id, dict(base_labels), time.monotonic() + self.timeout
            )
            if self._thread is None:
                self._thread = loops.spawn("docker-labels", self._round, self._stop, 0, self.progress, log=LOG)
        self._wake.set()

    def cancel(self, endpoint_id):
        with self._lock:
            self._pending.pop(endpoint_id, None)

    def stop(self):
        self._stop.set()
        self._wake.set()

    def _round(self):
        """Try every endpoint that is due, then sleep until the next one is (or a new one is submitted)."""
        with self._lock:
            items = list(self._pending.values())
        now = time.monotonic()
        for p in [p for p in items if p.due <= now]:
            self._attempt(p)
        with self._lock:
            nxt = min((p.due for p in self._pending.values()), default=None)
        self._wake.wait(timeout=None if nxt is None else max(0.0, nxt - time.monotonic()))
        self._wake.clear()
        return 0

    def _attempt(self, p):
        try:
            finished = self._label(p)
        except Exception as e:  # noqa: BLE001 - one endpoint's trouble must not end the others' labelling
            finished = False
            why = loops.describe(e)
            if not isinstance(e, NetpluginError) and p.attempt == 0:  # a bug: its traceback, once
                LOG.exception("event=docker.labels.failed endpoint=%s error=%s", p.endpoint_id[:12], why)
            elif p.attempt >= 3:
                LOG.debug("labels of %s not yet: %s", p.endpoint_id[:12], why)
        if finished or time.monotonic() >= p.deadline:
            if not finished:
                LOG.warning("event=docker.labels.gave_up endpoint=%s after=%.0fs", p.endpoint_id[:12], self.timeout)
            with self._lock:
                if self._pending.get(p.endpoint_id) is p:
                    del self._pending[p.endpoint_id]
            return
        p.attempt += 1
        p.due = time.monotonic() + BACKOFF[min(p.attempt, len(BACKOFF) - 1)]

    def _label(self, p):
        """True when done (labelled, or the endpoint is gone); False to try again later."""
        cid = self.api.container_of_endpoint(p.network_id, p.endpoint_id)
        if cid is None:
            return False
        labels = (self.api.container(cid).get("Config") or {}).get("Labels") or {}
        key = keys.endpoint(self.host, p.endpoint_id)
        kv = self.ds.get(key)
        if kv is None:
            return True  # deleted meanwhile: nothing to label
        ep = Endpoint.from_dict(kv.value)
        ep.labels = {**{str(k): str(v) for k, v in labels.items()}, **p.base_labels}
        ep.container_id = cid
        if not self.ds.txn([mod_is(key, kv.mod_revision)], [put_op(key, ep.to_dict())]).succeeded:
            return False  # changed under us: read again next round
        self.done += 1
        LOG.info("event=docker.labels endpoint=%s container=%s labels=%d", p.endpoint_id[:12], cid[:12], len(labels))
        return True
