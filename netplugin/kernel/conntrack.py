"""Connection tracking entries of one namespace over ctnetlink: list them, delete chosen ones.

The one conntrack writer of the agent (policy.revoke decides what goes). Requests are packed here and go to the
kernel by ``rtnl.Netlink`` on a NETLINK_NETFILTER socket made inside the namespace (``netlink.netlink``), so
deleting a thousand entries is one ``send`` and one acknowledgement each, not a ``conntrack -D`` process each.

An entry is deleted by its original tuple exactly as the dump returned it (the attribute bytes sent back, so every
protocol's tuple is right), its zone, and its id: an entry that ended meanwhile and was replaced by a new
connection with the same addresses and ports usually has another id (the kernel hashes the entry's memory
address with its tuple), and the kernel refuses to delete that one (ENOENT, which counts as done). A replacement
that reuses the old one's memory has the same id and goes too: harmless, its next packet meets the rules.
"""

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from netplugin.kernel.netlink import NETLINK_NETFILTER, netlink
from netplugin.kernel.rtnl import Batch, attr, attributes

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
CT_GET = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
CT_DELETE = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
NFNETLINK_V0 = 0
CTA_TUPLE_ORIG, CTA_STATUS, CTA_MARK, CTA_ID, CTA_ZONE = 1, 3, 8, 12, 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
IPS_SRC_NAT, IPS_DST_NAT = 0x10, 0x20
_HEADER = 16  # struct nlmsghdr
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (big endian; 0)
DELETE_BATCH = 256  # requests per send: one send is one skb, and a whole table's deletes do not fit in one


@dataclass(frozen=True)
class Entry:
    """One conntrack entry, by its original direction (the packet that created it)."""

    family: int  # 4 or 6
    protocol: int
    src: str
    dst: str
    src_port: int = None  # for protocols with ports (tcp, udp, sctp, dccp, udplite)
    dst_port: int = None
    status: int = 0
    mark: int = 0
    id: int = None
    zone: int = 0
    tuple_attr: bytes = b""  # CTA_TUPLE_ORIG as dumped, sent back to delete exactly this entry

    @property
    def nat(self):
        return bool(self.status & (IPS_SRC_NAT | IPS_DST_NAT))


def parse_entry(data: bytes):
    """One IPCTNL_MSG_CT_NEW message of a dump -> Entry, or None for an entry without an original tuple."""
    fields = {"family": 4 if data[_HEADER] == socket.AF_INET else 6}
    end = struct.unpack_from("=L", data)[0]
    for kind, start, stop in attributes(data, _HEADER + _NFGEN.size, end):
        if kind == CTA_TUPLE_ORIG:
            fields["tuple_attr"] = data[start - 4 : stop]
            fields.update(_tuple(data, start, stop))
        elif kind in (CTA_STATUS, CTA_MARK, CTA_ID):
            fields[{CTA_STATUS: "status", CTA_MARK: "mark", CTA_ID: "id"}[kind]] = struct.unpack_from(
                ">L", data, start
            )[0]
        elif kind == CTA_ZONE:
            fields["zone"] = struct.unpack_from(">H", data, start)[0]
    if "src" not in fields or "protocol" not in fields:
        return None
    return Entry(**fields)


def _tuple(data, start, stop):
    out = {}
    for kind, a, b in attributes(data, start, stop):
        if kind == CTA_TUPLE_IP:
            for ip_kind, x, y in attributes(data, a, b):
                if ip_kind in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    out["src"] = str(ipaddress.ip_address(data[x:y]))
                elif ip_kind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    out["dst"] = str(ipaddress.ip_address(data[x:y]))
        elif kind == CTA_TUPLE_PROTO:
            for proto_kind, x, _ in attributes(data, a, b):
                if proto_kind == CTA_PROTO_NUM:
                    out["protocol"] = data[x]
                elif proto_kind == CTA_PROTO_SRC_PORT:
                    out["src_port"] = struct.unpack_from(">H", data, x)[0]
                elif proto_kind == CTA_PROTO_DST_PORT:
                    out["dst_port"] = struct.unpack_from(">H", data, x)[0]
    return out


def delete_body(entry: Entry) -> bytes:
    """The IPCTNL_MSG_CT_DELETE payload removing exactly ``entry``."""
    family = socket.AF_INET if entry.family == 4 else socket.AF_INET6
    body = _NFGEN.pack(family, NFNETLINK_V0, 0) + entry.tuple_attr
    if entry.zone:
        body += attr(CTA_ZONE, struct.pack(">H", entry.zone))
    if entry.id is not None:
        body += attr(CTA_ID, struct.pack(">L", entry.id))
    return body


class Conntrack:
    """The conntrack table of one namespace (a path such as /run/netns/NAME or /proc/PID/ns/net)."""

    def __init__(self, netns: str):
        self.netns = netns

    def entries(self) -> list:
        """Every entry of both families."""
        with netlink(self.netns, NETLINK_NETFILTER) as nl:
            body = _NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, 0)
            return nl.request(CT_GET, body, f"dump conntrack entries in {nl.where}", dump=True, parse=parse_entry)

    def delete(self, entries) -> tuple:
        """Delete ``entries`` in one batch: (how many went, failures as sentences). One that is gone already
        (ended, or replaced by a new connection with another id) counts as gone."""
        entries = list(entries)
        if not entries:
            return 0, []
        failures = []
        with netlink(self.netns, NETLINK_NETFILTER) as nl:
            for at in range(0, len(entries), DELETE_BATCH):
                batch = Batch()
                for e in entries[at : at + DELETE_BATCH]:
                    what = f"delete the conntrack entry {e.src} -> {e.dst} proto {e.protocol} in {nl.where}"
                    batch.add(CT_DELETE, 0, delete_body(e), what, ok=(errno.ENOENT,))
                failures += nl.commit(batch)[0]
        return len(entries) - len(failures), [str(f.error()) for f in failures]
