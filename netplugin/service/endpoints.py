"""The workload service both front doors call: give a container its addresses, wire it, record it; undo it.

ADD's critical path is one IPAM transaction, local netlink work and one endpoint put; nothing holds a host-wide
lock across etcd round trips. Every step registers its undo first (STYLE.md #6), so a failure half-way leaves
neither an allocation nor a veth nor a record behind; the undo covers only what that call made, so a failed
repeated ADD leaves the working container it re-converged alone. DEL tolerates a missing link or namespace, so
it is idempotent; it unwires first (no released address is still routed here), then releases the addresses and
forgets the record in one transaction.
"""

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field

import netaddr

from netplugin.datastore import keys
from netplugin.datastore.client import delete_op, put_op
from netplugin.datastore.models import Endpoint, Network
from netplugin.dataplane import EndpointSpec, GATEWAY_V4, GATEWAY_V6, host_ifname, random_mac
from netplugin.dataplane.undo import quietly
from netplugin.errors import InvalidInput, NotFound
from netplugin.ipam.allocator import AssignRequest
from netplugin.ipam.blocks import host_prefix

LOG = logging.getLogger(__name__)
NETWORK_LABEL = "netplugin.io/network"
_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def endpoint_id(network, container_id, ifname):
    """Stable id of one container interface; also its IPAM handle. Key-safe (no '/')."""
    return _SAFE.sub("_", f"{network}.{container_id}.{ifname}")


@dataclass
class WorkloadRequest:
    network: str
    container_id: str
    netns: str
    ifname: str = "eth0"
    addresses: list = field(default_factory=list)  # static requests (addresses, no prefix needed)
    labels: dict = field(default_factory=dict)
    pools: list = field(default_factory=list)  # restrict to these pools
    within: str | None = None
    ipv4: bool = True
    ipv6: bool = False
    mtu: int | None = None
    orchestrator: str = "cni"
    endpoint_id: str | None = None  # Docker supplies its own endpoint id

    def id(self):
        return self.endpoint_id or endpoint_id(self.network, self.container_id, self.ifname)


class EndpointService:
    def __init__(self, datastore, ipam, dataplane, host, mtu=1500):
        self.ds = datastore
        self.ipam = ipam
        self.dataplane = dataplane
        self.host = host
        self.mtu = mtu

    # --- addresses ------------------------------------------------------------------------------------------------

    def network(self, name):
        kv = self.ds.get(keys.network(name))
        return Network.from_dict(kv.value) if kv else None

    def _requests(self, req):
        pools = tuple(req.pools)
        if req.addresses:
            return [AssignRequest.static(a, pools) for a in req.addresses]
        out = []
        if req.ipv4:
            out.append(
                AssignRequest(
                    4,
                    None,
                    tuple(p for p in pools if netaddr.IPNetwork(p).version == 4),
                    req.within if req.within and netaddr.IPNetwork(req.within).version == 4 else None,
                )
            )
        if req.ipv6:
            out.append(
                AssignRequest(
                    6,
                    None,
                    tuple(p for p in pools if netaddr.IPNetwork(p).version == 6),
                    req.within if req.within and netaddr.IPNetwork(req.within).version == 6 else None,
                )
            )
        if not out:
            raise InvalidInput("neither IPv4 nor IPv6 requested")
        return out

    def allocate(self, req, attrs=None):
        """IPAM only (Docker's RequestAddress, CNI's first step): the host routes of the new endpoint."""
        return self._allocate(req, attrs)[0]

    def _allocate(self, req, attrs=None, record=None):
        """(host routes, {address: seq} this call newly allocated, revision). ``record(host routes)``: the
        Endpoint to write in the transaction that creates the handle; ``revision`` is that write's, or None
        when the handle existed (a retry) and nothing was recorded."""
        ep_id = req.id()
        attrs = {"container_id": req.container_id, "network": req.network, "ifname": req.ifname, **(attrs or {})}

        def with_creation(addrs):
            return [put_op(keys.endpoint(self.host, ep_id), record([host_prefix(a) for a in addrs]).to_dict())]

        addrs, new, recorded = self.ipam.assign_new(
            ep_id, self.host, self._requests(req), attrs=attrs, with_creation=with_creation if record else None
        )
        return [host_prefix(a) for a in addrs], new, recorded

    # --- whole workload -------------------------------------------------------------------------------------------

    def add(self, req, clock=None):
        return self.add_recorded(req, clock)[0]

    def add_recorded(self, req, clock=None):
        """Allocate, wire and record one container interface. Returns (the Endpoint, the store revision that
        recorded it). ``clock``: the caller's PhaseClock, when it goes on timing phases after this one (the
        agent's policy install or wait).

        A repeated ADD (runtimes retry) converges what exists; if it fails, only what this call made is undone:
        the addresses the handle did not hold before, the veth pair if it did not exist. A working container
        is never torn down by a retry that failed (its record is kept too: it was written by the first ADD).
        """
        if not req.netns:
            raise InvalidInput("no network namespace given for the container")
        ep_id = req.id()
        clock = clock or PhaseClock()

        def record(addresses, mac):
            return Endpoint(
                id=ep_id,
                host=self.host,
                network=req.network,
                container_id=req.container_id,
                netns=req.netns,
                ifname=req.ifname,
                host_ifname=host_ifname(ep_id),
                addresses=addresses,
                mac=mac,
                labels={**req.labels, NETWORK_LABEL: req.network},
                handle=ep_id,
                orchestrator=req.orchestrator,
                mtu=req.mtu,
            )

        # A new endpoint's record goes in the IPAM transaction, so its MAC is chosen here rather than by the
        # kernel. The record may then be seen before the veth exists; nothing minds: the dataplane reconcile
        # waits for ADD (host lock), policy names the veth before it exists, and an ADD that fails deletes the
        # record with the addresses.
        mac = random_mac()
        with contextlib.ExitStack() as undo:
            addresses, new, recorded = self._allocate(req, record=lambda addrs: record(addrs, mac))
            clock.mark("ipam")
            if new:
                undo.callback(quietly, self._release_new, ep_id, new, recorded is not None)
            spec = EndpointSpec(
                endpoint_id=ep_id,
                netns=req.netns,
                ifname=req.ifname,
                addresses=tuple(addresses),
                mtu=req.mtu or self.mtu,
                mac=mac if recorded is not None else None,  # a retry keeps the MAC the container has
            )
            state = self.dataplane.add_endpoint(spec)
            clock.mark("dataplane")
            if state.created:
                undo.callback(quietly, self.dataplane.remove_endpoint, ep_id, req.netns, req.ifname)
            if recorded is None:
                ep = record(addresses, state.mac)
                revision = self.ds.put(keys.endpoint(self.host, ep_id), ep.to_dict())
                clock.mark("record")
            else:
                ep, revision = record(addresses, mac), recorded
            undo.pop_all()
        LOG.info(
            "endpoint added id=%s netns=%s addresses=%s host_if=%s %s",
            ep_id,
            req.netns,
            ",".join(addresses),
            state.host_ifname,
            clock,
        )
        return ep, revision

    def _release_new(self, ep_id, new, recorded=False):
        """Undo of one ADD's allocation: the whole handle when it holds only what this call allocated (a fresh
        ADD; with the record, when this call wrote it), else just the addresses this call added (guarded by
        their sequence numbers)."""
        handle, _ = self.ipam.get_handle(ep_id, cached=True)  # this call's own write: no round trip
        if handle is None or set(handle.addresses) <= set(new):
            self.ipam.release_handle(ep_id, also=[delete_op(keys.endpoint(self.host, ep_id))] if recorded else ())
            return
        for address, seq in sorted(new.items()):
            self.ipam.release_address(address, seq)

    def delete(self, ep_id, netns=None, ifname="eth0", clock=None):
        """Release, unwire, forget. Unknown endpoints are fine (DEL twice, or for a container never seen)."""
        clock = clock or PhaseClock()
        key = keys.endpoint(self.host, ep_id)
        if not netns:  # the record says where the container was (a runtime may DEL without CNI_NETNS)
            kv = self.ds.get(key)
            if kv:
                ep = Endpoint.from_dict(kv.value)
                netns, ifname = ep.netns, ep.ifname or ifname
        clock.mark("lookup")
        # The dataplane first: no route into the old veth and no address on it may outlive the release, or an
        # ADD given a released address at once would find it still routed here. The iptables backend returns
        # once the endpoint is detached and deletes the veth pair right after (netplugin/dataplane/reaper.py).
        # Then one transaction releases the addresses and forgets the record. A reconcile cannot run in between
        # inside the agent (DEL holds the shared host lock); a failed transaction leaves the record for the
        # runtime's next DEL, which finds the veth gone and retries the release.
        self.dataplane.remove_endpoint(ep_id, netns, ifname)
        clock.mark("dataplane")
        # The record's delete goes in unread: deleting a key that is not there is a no-op, and reading it first
        # was a round trip of its own (the endpoint id already names the host veth, the ifname is the request's).
        released = self.ipam.release_handle(ep_id, also=[delete_op(key)])
        clock.mark("ipam")
        LOG.info("endpoint deleted id=%s released=%s %s", ep_id, ",".join(released) or "-", clock)
        return released

    # --- Docker: libnetwork configures the sandbox; we wire the host side and keep the record ------------------

    def join_docker(self, spec, network, labels, mtu=None):
        """Wire a Docker endpoint (both veth ends in the host namespace) and record it; all-or-nothing.
        Returns (Endpoint, DockerLink). The addresses are Docker's IPAM's, held by no handle of ours."""
        with contextlib.ExitStack() as undo:
            link = self.dataplane.add_docker_endpoint(spec)
            undo.callback(quietly, self.dataplane.remove_docker_endpoint, spec.endpoint_id)
            ep = Endpoint(
                id=spec.endpoint_id,
                host=self.host,
                network=network,
                container_id="",
                netns=spec.netns,
                ifname=spec.ifname,
                host_ifname=link.host_ifname,
                addresses=list(spec.addresses),
                mac=link.mac,
                labels=labels,
                handle=None,
                orchestrator="docker",
                mtu=mtu,
            )
            self.ds.put(keys.endpoint(self.host, spec.endpoint_id), ep.to_dict())
            undo.pop_all()
        return ep, link

    def leave_docker(self, ep_id):
        """Record first, then the veth: a reconcile in between deletes a veth no record names, never the reverse."""
        self.ds.delete(keys.endpoint(self.host, ep_id))
        self.dataplane.remove_docker_endpoint(ep_id)

    def policy_ready(self, what):
        """Outside the agent nothing enforces policy, so there is nothing to wait for (see agent/locked.py)."""

    def get(self, ep_id):
        kv = self.ds.get(keys.endpoint(self.host, ep_id))
        return Endpoint.from_dict(kv.value) if kv else None

    def list(self, host=None):
        prefix = keys.endpoint_prefix(host) if host else keys.ENDPOINTS
        return [ep for _, ep in Endpoint.from_kvs(self.ds.list(prefix))]

    def check(self, ep_id, netns=None, expected=None):
        """Problems between the record, IPAM and the kernel ([] when all agree)."""
        ep = self.get(ep_id)
        if ep is None:
            raise NotFound(f"endpoint {ep_id} is not known on host {self.host}")
        problems = []
        handle, _ = self.ipam.get_handle(ep_id)
        held = sorted(host_prefix(a) for a in (handle.addresses if handle else {}))
        if held != sorted(ep.addresses):
            problems.append(f"IPAM holds {held or 'nothing'} for {ep_id}, the endpoint records {ep.addresses}")
        if expected is not None and sorted(expected) != sorted(ep.addresses):
            problems.append(f"the runtime expects {sorted(expected)}, the endpoint has {ep.addresses}")
        spec = EndpointSpec(
            endpoint_id=ep_id,
            netns=netns or ep.netns,
            ifname=ep.ifname,
            addresses=tuple(ep.addresses),
            mtu=ep.mtu or self.mtu,
        )
        problems += self.dataplane.check_endpoint(spec)
        return problems

    def spec_of(self, ep):
        """What the kernel should hold for a recorded endpoint: its network's MTU when it asked for one; for a
        Docker endpoint also its MAC, since its sandbox is dockerd's and not ours to open (bpf_backend.py)."""
        return EndpointSpec(
            endpoint_id=ep.id,
            netns=ep.netns,
            ifname=ep.ifname,
            addresses=tuple(ep.addresses),
            mtu=ep.mtu or self.mtu,
            mac=(ep.mac or None) if ep.orchestrator == "docker" else None,
        )


class PhaseClock:
    """Time spent in each phase of one ADD, DEL or sync pass, logged as ``<phase>_ms=...`` (scripts/bench_cni.py
    reads them to say where the time goes) and, given ``on_phase(phase, seconds)`` and ``on_done(seconds)``,
    fed to the agent's histograms (netplugin/agent/metrics.py): one timer for both."""

    def __init__(self, on_phase=None, on_done=None):
        self._began = self._last = time.monotonic()
        self.phases = []
        self._on_phase, self._on_done = on_phase, on_done

    def mark(self, phase):
        now = time.monotonic()
        self.phases.append((phase, (now - self._last) * 1000))
        if self._on_phase:
            self._on_phase(phase, now - self._last)
        self._last = now

    def done(self):
        """The operation succeeded: observe its whole time."""
        if self._on_done:
            self._on_done(time.monotonic() - self._began)

    def __str__(self):
        return " ".join(f"{phase}_ms={ms:.1f}" for phase, ms in self.phases)


def gateways(addresses):
    """The gateway each address is given in results: 169.254.1.1 or the fixed IPv6 link-local."""
    return [GATEWAY_V4 if netaddr.IPNetwork(a).version == 4 else GATEWAY_V6 for a in addresses]


__all__ = ["EndpointService", "WorkloadRequest", "endpoint_id", "gateways", "host_ifname", "NETWORK_LABEL"]
