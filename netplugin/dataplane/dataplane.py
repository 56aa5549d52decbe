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
from netplugin.dataplane import antispoof, endpoint, host, reconcile as _reconcile, sysctl
from netplugin.dataplane.model import EndpointSpec, EndpointState, host_ifname, validate_spec
from netplugin.dataplane.netlink import netlink
from netplugin.dataplane.rtnl import IFF_UP

log = logging.getLogger(__name__)

# Host-wide settings: forwarding for both families (writing conf/all/forwarding also sets the default for
# interfaces created later).
HOST_SYSCTLS_V4 = {"net/ipv4/ip_forward": 1}
HOST_SYSCTLS_V6 = {"net/ipv6/conf/all/forwarding": 1}
ALL_RP_FILTER = "net/ipv4/conf/all/rp_filter"
ALL_ARP_IGNORE = "net/ipv4/conf/all/arp_ignore"


def kernel_has_ipv6() -> bool:
    """False when the kernel runs without IPv6 (ipv6.disable=1): then there is nothing IPv6 to set up.
    Whether the directory exists is a property of the kernel, the same in every namespace."""
    return os.path.isdir("/proc/sys/net/ipv6")


class Dataplane:
    def __init__(self, host_netns: str | None = None, mtu: int = 1500):
        if host_netns is not None and (not isinstance(host_netns, str) or not host_netns.startswith("/")):
            raise InvalidInput(f"host netns must be an absolute path such as /run/netns/NAME, got {host_netns!r}")
        self.host_netns = host_netns
        self.mtu = mtu
        self._lock = threading.RLock()

    host_ifname = staticmethod(host_ifname)

    def _spec(self, spec: EndpointSpec):
        # An MTU of 0/None in the spec means "the dataplane's default".
        if isinstance(spec, EndpointSpec) and not spec.mtu:
            spec = EndpointSpec(spec.endpoint_id, spec.netns, spec.ifname, spec.addresses, self.mtu, spec.mac)
        return spec, validate_spec(spec)

    def setup_host(self) -> dict:
        """Forwarding on and the anti-spoofing rules in place; idempotent. Returns what it found and did."""
        with self._lock:
            ipv6 = kernel_has_ipv6()
            want = dict(HOST_SYSCTLS_V4, **(HOST_SYSCTLS_V6 if ipv6 else {}))
            have = sysctl.read(self.host_netns, list(want) + [ALL_RP_FILTER, ALL_ARP_IGNORE], "read host sysctls")
            todo = {k: v for k, v in want.items() if have.get(k) != str(v)}
            sysctl.write(self.host_netns, todo, "enable forwarding in the host netns")
            families = [6] if ipv6 else []
            if have[ALL_RP_FILTER] == "2":
                # "all" overrides our per-veth strict value with its maximum: keep IPv4 strict with the rule.
                log.warning("%s is 2 (loose): adding the rpfilter rule for IPv4 as well", ALL_RP_FILTER)
                families.insert(0, 4)
            written = [f for f in families if antispoof.ensure(self.host_netns, f)]
            warnings = []
            if have[ALL_ARP_IGNORE] not in ("0", "1"):
                # "all" overrides our per-veth 0 with its maximum: the host veths' gateway address goes unanswered.
                warnings.append(f"{ALL_ARP_IGNORE.replace('/', '.')} is {have[ALL_ARP_IGNORE]}: the host will not "
                                "answer containers' ARP for their gateway 169.254.1.1; set it to 0 or 1")
                log.error("%s", warnings[-1])
            return {"sysctls": sorted(todo), "antispoof_families": families, "antispoof_written": written,
                    "warnings": warnings}

    def add_endpoint(self, spec: EndpointSpec) -> EndpointState:
        spec, addrs = self._spec(spec)
        with self._lock:
            return endpoint.add(self.host_netns, spec, addrs)

    def remove_endpoint(self, endpoint_id: str, netns: str | None = None, ifname: str = "eth0") -> None:
        if not endpoint_id:
            raise InvalidInput("endpoint id must be a non-empty string")
        with self._lock:
            endpoint.remove(self.host_netns, endpoint_id, netns, ifname)

    def check_endpoint(self, spec: EndpointSpec) -> list:
        spec, addrs = self._spec(spec)
        problems = endpoint.check(self.host_netns, spec, addrs)
        if any(a.version == 6 for a in addrs):
            problems += antispoof.problems(self.host_netns, 6)
        return problems

    def reconcile(self, desired: list, blocks: list) -> dict:
        desired = [self._spec(s)[0] for s in desired]
        with self._lock:
            return _reconcile.reconcile(
                self.host_netns, desired, blocks, lambda spec, addrs: endpoint.add(self.host_netns, spec, addrs)
            )

    def list_endpoints(self) -> dict:
        """host ifname -> what the kernel has for it (our routes, link settings, sysctls)."""
        with netlink(self.host_netns) as hnl:
            view = host.snapshot(hnl)
        out = {}
        for name, msg in sorted(view.links.items()):
            idx = msg["index"]
            out[name] = {
                "ifindex": idx,
                "peer_ifindex": msg.get("link"),
                "mac": msg.get("address"),
                "mtu": msg.get("mtu"),
                "up": bool(msg["flags"] & IFF_UP),
                "routes": sorted(str(r) for r in view.routes.get(idx, ())),
                "sysctls": {
                    k.replace("/", "."): v for k, v in sysctl.link_sysctls(msg, view.proxy_delay.get(idx)).items()
                },
            }
        return out

    def blackholes(self) -> list:
        """Owned-block blackhole routes we wrote, as strings."""
        with netlink(self.host_netns) as hnl:
            _, holes = host.read_routes(hnl)
        return sorted(str(n) for n in holes)
