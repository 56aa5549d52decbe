"""Collect Docker endpoints that Docker no longer has (their DeleteEndpoint never reached us).

If the agent is down while a container is removed, libnetwork's DeleteEndpoint and ReleaseAddress fail and
Docker forgets the endpoint anyway: its record, veth and address would stay forever (the reconciler keeps a
veth whose record exists). So every ``interval`` seconds this host's Docker endpoint records are compared
with the endpoints dockerd reports on its netplugin networks.

Never collect what may still be live: a pass counts only when dockerd answered for every network;
an endpoint must be missing in two passes at least ``interval`` apart (a Join in progress shows up in
Docker's listing within a second); only records of this host with orchestrator "docker" are considered;
addresses are released only if a Docker handle of this host holds them (DockerIpam.release_host_address).
"""

import logging
import threading
import time

from netplugin import loops
from netplugin.docker.dockerapi import DockerApiError
from netplugin.errors import NetpluginError

LOG = logging.getLogger(__name__)


class StaleEndpointCollector:
    def __init__(self, api, list_records, collect, interval=60.0, progress=None):
        """``list_records()``: this host's Endpoint records; ``collect(ep)``: forget one everywhere."""
        self.api = api
        self.list_records = list_records
        self.collect = collect
        self.interval = interval
        self._missing = {}  # endpoint id -> monotonic time it was first seen missing
        self._thread = None
        self._stop = threading.Event()
        self._rounds = 0
        self.progress = progress  # a netplugin.loops.Progress to report to (the agent's health), if any

    def live_endpoints(self):
        """Endpoint ids on every network of this dockerd (raises DockerApiError if it cannot tell). Every
        network, not only those of driver "netplugin": the plugin may be installed under another name."""
        live = set()
        for net in self.api.get("/networks"):
            for info in (self.api.network(net["Id"]).get("Containers") or {}).values():
                live.add((info or {}).get("EndpointID"))
        return live

    def run_once(self, now=None):
        """One pass; returns the ids collected."""
        now = time.monotonic() if now is None else now
        records = [ep for ep in self.list_records() if ep.orchestrator == "docker"]
        try:
            live = self.live_endpoints()
        except DockerApiError as e:
            LOG.info("event=docker.gc.skipped reason=%s", e.msg)
            return []
        known = {ep.id for ep in records}
        self._missing = {k: v for k, v in self._missing.items() if k in known and k not in live}
        collected = []
        for ep in records:
            if ep.id in live:
                continue
            first = self._missing.setdefault(ep.id, now)
            if now - first < self.interval:
                continue
            try:
                self.collect(ep)
                collected.append(ep.id)
                self._missing.pop(ep.id, None)
            except NetpluginError as e:
                LOG.warning("event=docker.gc.failed endpoint=%s error=%s", ep.id[:12], e.msg)
        if collected:
            LOG.info("event=docker.gc collected=%d ids=%s", len(collected), ",".join(i[:12] for i in collected))
        return collected

    def start(self):
        """Collect every ``interval`` seconds on a thread no exception ends (netplugin.loops)."""
        if self._thread is None:
            self._thread = loops.spawn("docker-gc", self._round, self._stop, self.interval, self.progress, log=LOG)

    def _round(self):
        if self._rounds:  # the first round only waits: the agent has just started
            self.run_once()
        self._rounds += 1

    def stop(self):
        self._stop.set()
