"""The host dataplane as the agent, the CNI and the Docker front doors see it.

``host_netns`` None means the namespace this process runs in (the agent runs in the host's); a path makes
every host-side operation happen in that namespace instead, without this process ever entering it, which is
how tests drive a throwaway "host" namespace. Mutations are serialised by one lock held only for local
kernel work (milliseconds), never across datastore round trips, so a periodic reconcile cannot delete a veth
that a concurrent ADD has just made.
"""

import logging
import os
import threading

from netplugin.errors import InvalidInput
from netplugin.dataplane import docker_link, endpoint, host, reconcile as _reconcile, sysctl
from netplugin.dataplane.antispoof import AntiSpoof
from netplugin.dataplane.model import EndpointSpec, EndpointState, host_ifname, validate_spec
from netplugin.dataplane.reaper import LinkReaper
from netplugin.kernel.netlink import netlink
from netplugin.kernel.netns import NamespaceCommand, own_netns

log = logging.getLogger(__name__)

# Host-wide settings. IPv4 forwarding at start-up; IPv6 forwarding only once an IPv6 pool is in use
# (``enable_ipv6``): on a host configured by router advertisements it would otherwise stop RA processing for
# nothing. Writing conf/all/forwarding also sets it on every interface, present and future.
HOST_SYSCTLS_V4 = {"net/ipv4/ip_forward": 1}
ALL_RP_FILTER = "net/ipv4/conf/all/rp_filter"
ALL_ARP_IGNORE = "net/ipv4/conf/all/arp_ignore"


def kernel_has_ipv6() -> bool:
    """False when the kernel runs without IPv6 (ipv6.disable=1): then there is nothing IPv6 to set up.
    Whether the directory exists is a property of the kernel, the same in every namespace."""
    return os.path.isdir("/proc/sys/net/ipv6")


class Dataplane:
    """The host side of every endpoint (one veth builder for CNI and Docker) and the host-wide settings."""

    def __init__(self, host_netns: str | None = None, mtu: int = 1500):
        if host_netns is not None and (not isinstance(host_netns, str) or not host_netns.startswith("/")):
            raise InvalidInput(f"host netns must be an absolute path such as /run/netns/NAME, got {host_netns!r}")
        self.host_netns = host_netns
        self.mtu = mtu
        self._lock = threading.RLock()
        self._ipv6_ready = False  # enable_ipv6 succeeded in this process
        self._antispoof_writer = None
        self._reaper = LinkReaper()  # host veths DEL did not wait for (remove_endpoint(background=True))

    def _antispoof(self) -> AntiSpoof:
        """Made on first use: the host namespace must exist by then, not when the Dataplane is built."""
        if self._antispoof_writer is None:
            ns = NamespaceCommand(self.host_netns or own_netns(), allow_host_namespace=True)
            self._antispoof_writer = AntiSpoof(ns)
        return self._antispoof_writer

    def _spec(self, spec: EndpointSpec):
        # An MTU of 0/None in the spec means "the dataplane's default".
        if isinstance(spec, EndpointSpec) and not spec.mtu:
            spec = EndpointSpec(spec.endpoint_id, spec.netns, spec.ifname, spec.addresses, self.mtu, spec.mac)
        return spec, validate_spec(spec)

    def setup_host(self) -> dict:
        """IPv4 forwarding on and, if the host's rp_filter is loose, the IPv4 anti-spoofing rule; idempotent.
        Nothing IPv6: see ``enable_ipv6``. Returns what it found and did."""
        with self._lock:
            have = sysctl.read(
                self.host_netns, list(HOST_SYSCTLS_V4) + [ALL_RP_FILTER, ALL_ARP_IGNORE], "read host sysctls"
            )
            todo = {k: v for k, v in HOST_SYSCTLS_V4.items() if have.get(k) != str(v)}
            sysctl.write(self.host_netns, todo, "enable IPv4 forwarding in the host netns")
            families = []
            if have[ALL_RP_FILTER] == "2":
                # "all" overrides our per-veth strict value with its maximum: keep IPv4 strict with the rule.
                log.warning("%s is 2 (loose): adding the rpfilter rule for IPv4", ALL_RP_FILTER)
                families.append(4)
            written = [f for f in families if self._antispoof().ensure(f)]
            warnings = []
            if have[ALL_ARP_IGNORE] not in ("0", "1"):
                # "all" overrides our per-veth 0 with its maximum: the host veths' gateway address goes unanswered.
                warnings.append(
                    f"{ALL_ARP_IGNORE.replace('/', '.')} is {have[ALL_ARP_IGNORE]}: the host will not "
                    "answer containers' ARP for their gateway 169.254.1.1; set it to 0 or 1"
                )
                log.error("%s", warnings[-1])
            return {
                "sysctls": sorted(todo),
                "antispoof_families": families,
                "antispoof_written": written,
                "warnings": warnings,
            }

    def enable_ipv6(self, recheck=False) -> dict:
        """IPv6 forwarding and the IPv6 anti-spoofing rule, for when an IPv6 pool is in use; idempotent, and
        free after the first success unless ``recheck`` (the periodic full resync repairs drift).

        Interfaces that accept router advertisements (accept_ra=1) are set to 2 first, so a host that takes its
        IPv6 default route from RAs keeps it. Forwarding is never turned off again by us (the last IPv6 pool
        removed): containers may still hold IPv6 addresses, and the operator may rely on it by then."""
        if not kernel_has_ipv6():
            return {}
        with self._lock:
            if self._ipv6_ready and not recheck:
                return {}
            have = sysctl.read(self.host_netns, [sysctl.ALL_FORWARDING_V6], "read host IPv6 forwarding")
            todo = {}
            if have[sysctl.ALL_FORWARDING_V6] != "1":
                with netlink(self.host_netns) as hnl:
                    todo = sysctl.keep_accepting_ra(hnl.links(), host.is_our_link)
                todo[sysctl.ALL_FORWARDING_V6] = 1  # last: RA acceptance is kept before forwarding starts
                sysctl.write(self.host_netns, todo, "enable IPv6 forwarding in the host netns")
                log.info(
                    "event=host.ipv6_forwarding enabled=1 accept_ra_2=%s",
                    ",".join(k.split("/")[3] for k in todo if k.endswith(sysctl.ACCEPT_RA)) or "-",
                )
            written = self._antispoof().ensure(6)
            self._ipv6_ready = True
            return {"sysctls": list(todo), "antispoof_written": [6] if written else []}

    def add_endpoint(self, spec: EndpointSpec) -> EndpointState:
        spec, addrs = self._spec(spec)
        with self._lock:
            self._reaper.wait(host_ifname(spec.endpoint_id))  # a DEL of the same endpoint still finishing
            if any(a.version == 6 for a in addrs):
                self.enable_ipv6()  # an ADD may come before the sync pass that saw the IPv6 pool
            return endpoint.add(self.host_netns, spec, addrs)

    def remove_endpoint(
        self, endpoint_id: str, netns: str | None = None, ifname: str = "eth0", background: bool = False
    ) -> None:
        """Unwire an endpoint. ``background``: return once it is detached (no route to it, no address on it)
        and let the worker delete the veth pair (see reaper.py); else return when the pair is gone."""
        if not endpoint_id:
            raise InvalidInput("endpoint id must be a non-empty string")
        name = host_ifname(endpoint_id)
        with self._lock:
            self._reaper.wait(name)
            if background and endpoint.detach(self.host_netns, endpoint_id, netns, ifname):
                self._reaper.submit(name, lambda: endpoint.remove(self.host_netns, endpoint_id, netns, ifname))
                return
            endpoint.remove(self.host_netns, endpoint_id, netns, ifname)

    def close(self) -> None:
        """Let the veth deletions DEL did not wait for finish (agent stop)."""
        self._reaper.wait()

    def add_docker_endpoint(self, spec: EndpointSpec) -> docker_link.DockerLink:
        """Both ends in the host namespace; libnetwork moves the container end into the sandbox (docker_link.py)."""
        spec, _ = self._spec(spec)
        with self._lock:
            self._reaper.wait(host_ifname(spec.endpoint_id))
            return docker_link.create(self.host_netns, spec)

    def remove_docker_endpoint(self, endpoint_id: str) -> bool:
        if not endpoint_id:
            raise InvalidInput("endpoint id must be a non-empty string")
        with self._lock:
            return docker_link.remove(self.host_netns, endpoint_id)

    def check_endpoint(self, spec: EndpointSpec) -> list:
        spec, addrs = self._spec(spec)
        problems = endpoint.check(self.host_netns, spec, addrs)
        if any(a.version == 6 for a in addrs):
            problems += self._antispoof().problems(6)
        return problems

    def converge_blocks(self, blocks: list) -> dict:
        """The blackholes of the owned blocks only (see reconcile.converge_blackholes)."""
        with self._lock:
            return _reconcile.converge_blackholes(self.host_netns, blocks)

    def reconcile(self, desired: list, blocks: list, deletable=frozenset()) -> dict:
        """See reconcile.py: veths not in ``desired`` are deleted only when named in ``deletable``."""
        desired = [self._spec(s)[0] for s in desired]
        self._reaper.wait()  # a veth DEL left to the worker is not a stray
        with self._lock:
            return _reconcile.reconcile(
                self.host_netns,
                desired,
                blocks,
                lambda spec, addrs: endpoint.add(self.host_netns, spec, addrs),
                deletable=frozenset(deletable),
            )
