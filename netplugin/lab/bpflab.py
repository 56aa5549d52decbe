"""A two-host namespace lab for the BPF dataplane's tests and its measurement script (scripts/bpf_lab_measure.py).

hostA and hostB are namespaces joined by a veth "fabric"; each holds one container namespace on a veth,
routed /32 (/128) with the gateways 169.254.1.1 and fe80::1 on the host veth, the way netplugin wires endpoints.  Only
addresses made here are used.  Pins live on a bpffs the caller mounts (``bpffs``), reached from this
process without ``ip netns exec`` (which would remount /sys and hide them).
"""

import ipaddress
from contextlib import contextmanager

from pyroute2 import IPRoute

from netplugin.kernel.bpf import loader, records
from netplugin.lab import system
from netplugin.lab.netns import NamespaceSet, nsexec

FABRIC = {"a": ("10.251.0.1", "fd00:251::1"), "b": ("10.251.0.2", "fd00:251::2")}
CONTAINER = {"a": ("10.252.1.2", "fd00:252:1::2"), "b": ("10.252.2.2", "fd00:252:2::2")}
BLOCK = {"a": ("10.252.1.0/24", "fd00:252:1::/64"), "b": ("10.252.2.0/24", "fd00:252:2::/64")}
EP_ID = {"a": 1, "b": 2}


@contextmanager
def mounted_bpffs(path):
    """A private bpf filesystem at ``path``, unmounted (with every pin in it) on exit."""
    system.mount_bpffs(str(path))
    try:
        yield path
    finally:
        system.unmount_bpffs(str(path))


def link_info(netns, ifname):
    with IPRoute(netns=netns) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        return link["index"], link.get_attr("IFLA_ADDRESS")


class TwoHostLab:
    """hosts["a"|"b"] and containers["a"|"b"] are namespace names; the fabric interface is fab0 in each host,
    a container's host-side veth is ``cveth`` and its own side eth0."""

    def __init__(self, nss: NamespaceSet = None, hosts=None, containers=None):
        self.nss = nss
        self.hosts, self.containers = dict(hosts or {}), dict(containers or {})

    def build(self):
        for side in "ab":
            self.hosts[side] = h = self.nss.add()
            for k in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0"):
                nsexec(h, ["sysctl", "-qw", k])
        self.nss.link(self.hosts["a"], self.hosts["b"], name_a="fab0", name_b="fab0")
        for side in "ab":
            h, peer = self.hosts[side], "b" if side == "a" else "a"
            v4, v6 = FABRIC[side]
            nsexec(h, f"ip addr add {v4}/24 dev fab0")
            nsexec(h, f"ip addr add {v6}/64 dev fab0 nodad")
            nsexec(h, f"ip route add {BLOCK[peer][0]} via {FABRIC[peer][0]}")
            nsexec(h, f"ip -6 route add {BLOCK[peer][1]} via {FABRIC[peer][1]}")
            self.containers[side] = c = self.nss.add()
            self.nss.link(h, c, name_a="cveth", name_b="eth0")
            # the gateways live on the host veth, as netplugin's host.py puts them (no proxy ARP needed)
            nsexec(h, "ip addr add 169.254.1.1/32 dev cveth scope link")
            nsexec(h, "ip addr add fe80::1/64 dev cveth nodad")
            cv4, cv6 = CONTAINER[side]
            nsexec(h, f"ip route add {cv4}/32 dev cveth")
            nsexec(h, f"ip -6 route add {cv6}/128 dev cveth")
            nsexec(c, f"ip addr add {cv4}/32 dev eth0")
            nsexec(c, f"ip addr add {cv6}/128 dev eth0 nodad")
            nsexec(c, "ip route add 169.254.1.1 dev eth0 scope link")
            nsexec(c, "ip route add default via 169.254.1.1 dev eth0")
            nsexec(c, "ip -6 route add default via fe80::1 dev eth0")
        return self

    def load(self, obj, pin_root):
        """Load ``obj`` once per host under ``pin_root/<side>`` and attach it; returns {side: Pins}."""
        pins = {side: loader.load(obj, pin_root / side) for side in "ab"}
        self.attach(pins)
        return pins

    def attach(self, pins):
        for side in "ab":
            loader.attach(pins[side].prog("from_container"), "cveth", netns=self.hosts[side])
            loader.attach(pins[side].prog("to_container"), "fab0", netns=self.hosts[side])

    def detach(self):
        for side in "ab":
            for dev in ("cveth", "fab0"):
                loader.detach(dev, netns=self.hosts[side])

    def program_endpoints(self, pins):
        """The endpoint and local-destination entries of each host's container."""
        for side in "ab":
            h, c = self.hosts[side], self.containers[side]
            host_idx, host_mac = link_info(h, "cveth")
            _, cont_mac = link_info(c, "eth0")
            ep = EP_ID[side]
            with pins[side].map("np_endpoints") as m:
                m.update(records.ifindex_key(host_idx), records.endpoint(ep, CONTAINER[side]))
            with pins[side].map("np_locals") as m:
                for a in CONTAINER[side]:
                    m.update(records.addr16(a), records.local(ep, host_idx, cont_mac, host_mac))
            with pins[side].map("np_counters") as m:
                m.update(records.IFINDEX.pack(ep), bytes(records.COUNTERS.size))
            with pins[side].map("np_fast_dsts") as m:  # the cluster's pools: both container blocks
                for block in BLOCK["a"] + BLOCK["b"]:
                    m.update(records.net_key(block), b"\1")

    def program_policy(self, pins, side, ingress_rules, peers, default=records.ACT_DENY, egress_allow_all=True):
        """``side``'s container gets ingress rules (records.rule bytes, bit i = rule i) with ``peers``:
        {rule index: [CIDR, ...]} folded into LPM entries, and (by default) an egress rule allowing everything."""
        ep = EP_ID[side]
        with pins[side].map("np_pol_rules") as m:
            m.update(
                records.IFINDEX.pack(records.ep_dir(ep, records.DIR_INGRESS)), records.rules(ingress_rules, default)
            )
            if egress_allow_all:
                m.update(
                    records.IFINDEX.pack(records.ep_dir(ep, records.DIR_EGRESS)),
                    records.rules([records.rule(records.ACT_ALLOW, any_peer=True)], default),
                )
        bits = {}
        for i, cidrs in peers.items():
            for cidr in cidrs:
                n = ipaddress.ip_network(cidr)
                bits[n] = bits.get(n, 0) | 1 << i
        with pins[side].map("np_pol_peers") as m:
            mine = records.ep_dir(ep, records.DIR_INGRESS).to_bytes(4, "big")
            for key in m.keys():  # a throwaway rewrite; the agent will double-buffer (docs/bpf-design.md)
                if key[4:8] == mine:
                    m.delete(key)
            for n, b in bits.items():
                # the longest match must carry the rules of every covering prefix, as the compiler folds them
                for plen in range(n.prefixlen):
                    b |= bits.get(n.supernet(new_prefix=plen), 0)
                m.update(records.pol_key(ep, records.DIR_INGRESS, n), b.to_bytes(8, "little"))

    def bump_generation(self, pins, side):
        """Make ``side``'s host re-check every cached flow verdict (what the agent does after a policy write)."""
        with pins[side].map("np_config") as m:
            gen = records.CONFIG.unpack(m.lookup(records.IFINDEX.pack(0)))[0]
            m.update(records.IFINDEX.pack(0), records.config(gen + 1))

    def counters(self, pins, side):
        with pins[side].map("np_counters") as m:
            return records.counters(m.lookup(records.IFINDEX.pack(EP_ID[side])))
