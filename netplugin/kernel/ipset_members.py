"""Set members added and deleted by netlink (nfnetlink's ipset subsystem) from the agent's own process.

Why not ``ipset restore`` for these: a container's ADD changes a handful of members (its address in the
network and selector sets, its veth in its shape's dispatch set, see policy/compiler.py), and a process spawn
under ``nsenter`` costs about 5 ms of the ADD's time on this 2-core machine against well under 1 ms for one
``send`` of a few messages here. Why not pyroute2's ``IPSet``: it forks per namespace or needs ``setns`` on the
calling thread, and pays pyroute2's per-request Python cost; the messages are small and packed with the same
helpers as rtnetlink (netplugin.kernel.rtnl), on a socket made inside the namespace by ``netns.in_netns``.

This is the only way members are changed one by one. Building a set (create, fill, swap a rebuilt copy in,
destroy) stays with ``ipset restore`` in netplugin.kernel.ipset: those are rare and bulk, and a swap needs a
filled temporary set anyway. Every message carries NLM_F_EXCL, as ``ipset add``/``del`` without ``-exist``
do: adding a member the set holds, or deleting one it lacks, fails, so a cache that disagrees with the kernel is
noticed (the applier then reads back and rebuilds). The kernel handles the messages of one send in order and
acknowledges each; every failure names the member and set it was about.
"""

import errno
import ipaddress
import os
import socket
import struct
import threading

from netplugin.errors import DataplaneError
from netplugin.kernel.netns import in_netns, open_netns
from netplugin.kernel.rtnl import F_EXCL, Batch, Netlink, attr, string, u8

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
IPSET_CMD = {"add": 9, "del": 10}
IPSET_PROTOCOL = 6  # the oldest protocol every kernel since 3.x accepts for add/del
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_DATA = 1, 2, 7
IPSET_ATTR_IP, IPSET_ATTR_CIDR, IPSET_ATTR_IFACE = 1, 3, 23
IPSET_ATTR_IPADDR = {4: 1, 6: 2}  # IPSET_ATTR_IPADDR_IPV4, _IPV6
# ipset's own errnos (include/uapi/linux/netfilter/ipset/ip_set.h), as `ipset` words them
IPSET_ERRORS = {
    errno.ENOENT: "the set does not exist",
    4097: "kernel does not speak this ipset protocol",
    4102: "the set is of another type",
    4103: "the member is already in the set, or not in it (delete)",
    4104: "invalid prefix length",
    4106: "the set is of another family",
    4352: "the set is full",
}


def member_body(set_name, family, member):
    """The nfgenmsg and attributes of one add/del: ``member`` is "NET" ("10.0.0.5/32") or "NET,IFACE"
    ("0.0.0.0/0,np0123456789a", for hash:net,iface)."""
    net_text, _, iface = member.partition(",")
    net = ipaddress.ip_network(net_text, strict=False)
    if net.version != family:
        raise DataplaneError(f"ipset member {member!r} is not IPv{family} like set {set_name}")
    address = attr(IPSET_ATTR_IPADDR[family] | NLA_F_NET_BYTEORDER, net.network_address.packed)
    data = attr(IPSET_ATTR_IP | NLA_F_NESTED, address) + u8(IPSET_ATTR_CIDR, net.prefixlen)
    if iface:
        data += string(IPSET_ATTR_IFACE, iface)
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    return (
        struct.pack("=BBH", af, 0, 0)
        + u8(IPSET_ATTR_PROTOCOL, IPSET_PROTOCOL)
        + string(IPSET_ATTR_SETNAME, set_name)
        + attr(IPSET_ATTR_DATA | NLA_F_NESTED, data)
    )


class IpsetMembers:
    """Member changes in one namespace (a path), over one NETLINK_NETFILTER socket opened on first use and kept
    (the applier calls this under its own lock; the lock here only guards the socket)."""

    def __init__(self, path):
        self.path = path
        self._nl = None
        self._lock = threading.Lock()

    def _socket(self):
        if self._nl is None:
            fd = open_netns(self.path)
            try:
                sock = in_netns(
                    fd,
                    self.path,
                    lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER),
                )
            finally:
                os.close(fd)
            self._nl = Netlink(sock, f"netns '{self.path}'")
        return self._nl

    def write(self, changes):
        """``changes``: [(op "add" | "del", set name, family 4 | 6, member)], sent at once, applied in order.
        Raises DataplaneError for the first that failed (the others were still applied)."""
        if not changes:
            return
        batch = Batch()
        for op, name, family, member in changes:
            kind = (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD[op]
            batch.add(kind, F_EXCL, member_body(name, family, member), f"{op} {member} in ipset {name}")
        with self._lock:
            try:
                failures, _ = self._socket().commit(batch)
            except DataplaneError:
                self._close_locked()  # a socket that timed out may hold late answers: open a fresh one next time
                raise
        if failures:
            first = failures[0]
            reason = IPSET_ERRORS.get(first.errno) or first.error().msg.rsplit(": ", 1)[-1]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise DataplaneError(f"failed to {first.request.action} in netns {self.path}: {reason}{more}")

    def close(self):
        with self._lock:
            self._close_locked()

    def _close_locked(self):
        if self._nl is not None:
            self._nl.close()
            self._nl = None
