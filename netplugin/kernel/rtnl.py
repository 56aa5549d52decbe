"""rtnetlink over one raw socket: requests packed here and sent as batches, replies decoded by pyroute2.

Why not ``IPRoute`` for everything: in pyroute2 0.9 each request pays 0.25-0.35 ms of Python (argument
filters, an asyncio loop turn) and an ADD needs about thirteen of them, which was most of ADD's time. Here the
handful of request kinds we send are packed with ``struct`` and a whole step (say, "configure the container
side") goes to the kernel in one ``send``: the kernel handles the messages in order and acknowledges each, so
every failure is still reported against the request that caused it. Replies (links, addresses, routes, ...)
are decoded with pyroute2's message classes, so readers get the familiar ``msg.get("ifname")`` interface.

pyroute2's message classes are also the reference for what we send: a unit test checks every request kind
byte for byte against their ``encode()``. They are not the encoder itself because they cost 135 us (a route)
to 330 us (a veth) per message against 13 us here, which would add about 2 ms to an ADD whose kernel work
takes about 3 ms.

The socket enables strict dump checking, so route and address dumps are filtered by the kernel (by table,
protocol, device) instead of shipping every BGP route to Python; and extended acks, so a failure carries the
kernel's own explanation ("Nexthop device is not up") next to strerror.
"""

import errno
import ipaddress
import itertools
import os
import socket
import struct
from dataclasses import dataclass, field

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndtmsg import ndtmsg
from pyroute2.netlink.rtnl.nsidmsg import nsidmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netplugin.errors import DataplaneError, NotFound
from netplugin.kernel.netns import ERRNO_CLASS

# netlink
NLMSG_ERROR, NLMSG_DONE = 2, 3
F_REQUEST, F_MULTI, F_ACK, F_ECHO, F_DUMP_INTR = 0x1, 0x2, 0x4, 0x8, 0x10
F_DUMP = 0x300
F_REPLACE, F_EXCL, F_CREATE = 0x100, 0x200, 0x400
F_CAPPED, F_ACK_TLVS = 0x100, 0x200
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK = 10, 11, 12
NLMSGERR_ATTR_MSG = 1
# rtnetlink message types
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28
RTM_NEWNEIGHTBL, RTM_GETNEIGHTBL, RTM_SETNEIGHTBL = 64, 66, 67
RTM_NEWNSID, RTM_GETNSID = 88, 90
# attributes
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO, IFLA_AF_SPEC, IFLA_NET_NS_FD = 1, 3, 4, 5, 18, 26, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFLA_INET_CONF, IFLA_INET6_ADDR_GEN_MODE = 1, 8
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
NDA_DST, NDA_LLADDR = 1, 2
NDTA_NAME, NDTA_PARMS, NDTPA_IFINDEX, NDTPA_PROXY_DELAY = 1, 6, 1, 13
NETNSA_NSID, NETNSA_FD = 1, 3
# values
IFF_UP = 0x1
RTN_UNICAST, RTN_BLACKHOLE = 1, 6
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
RTNH_F_ONLINK = 0x4
NUD_PERMANENT = 0x80
IFA_F_NODAD = 0x02
# struct ipv4_devconf indexes (IPV4_DEVCONF_*), the keys of IFLA_INET_CONF
IPV4_DEVCONF = {"forwarding": 1, "proxy_arp": 3, "rp_filter": 8, "arp_ignore": 19}

_DECODERS = {
    RTM_NEWLINK: ifinfmsg,
    RTM_NEWADDR: ifaddrmsg,
    RTM_NEWROUTE: rtmsg,
    RTM_NEWNEIGHTBL: ndtmsg,
    RTM_NEWNSID: nsidmsg,
}
_HDR = struct.Struct("=LHHLL")
_seq = itertools.count(int.from_bytes(os.urandom(2), "little") << 8)


# --- encoding -------------------------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * ((4 - size % 4) % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind, b"".join(parts))


def u8(kind, value):
    return attr(kind, struct.pack("=B", value))


def u32(kind, value):
    return attr(kind, struct.pack("=I", value))


def u64(kind, value):
    return attr(kind, struct.pack("=Q", value))


def string(kind, value: str):
    return attr(kind, value.encode() + b"\0")


def mac(kind, value: str):
    return attr(kind, bytes.fromhex(value.replace(":", "")))


def ip(kind, value):
    return attr(kind, ipaddress.ip_address(value).packed)


def ifinfo(index=0, flags=0, change=0, family=0) -> bytes:
    return struct.pack("=BxHiII", family, 0, index, flags, change)


def family_of(address) -> int:
    return socket.AF_INET if ipaddress.ip_address(address).version == 4 else socket.AF_INET6


@dataclass
class Request:
    kind: int
    flags: int
    body: bytes
    action: str
    ok: tuple = ()  # errnos that count as success (idempotent deletes, re-adds)
    tag: object = None
    seq: int = 0


@dataclass
class Failure:
    request: Request
    errno: int
    detail: str = ""

    def error(self) -> Exception:
        reason = os.strerror(self.errno)
        if self.detail:
            reason = f"{reason} ({self.detail})"
        return ERRNO_CLASS.get(self.errno, DataplaneError)(f"failed to {self.request.action}: {reason}")


@dataclass
class Batch:
    """Requests to send in one go; each method appends one and returns it."""

    requests: list = field(default_factory=list)

    def add(self, kind, flags, body, action, ok=(), tag=None) -> Request:
        req = Request(kind, F_REQUEST | F_ACK | flags, body, action, tuple(ok), tag)
        self.requests.append(req)
        return req

    def __len__(self):
        return len(self.requests)

    def veth(self, name, address, mtu, peer_name, peer_netns_fd, peer_mtu, peer_address, action) -> Request:
        peer = [string(IFLA_IFNAME, peer_name), u32(IFLA_NET_NS_FD, peer_netns_fd), u32(IFLA_MTU, peer_mtu)]
        if peer_address:
            peer.append(mac(IFLA_ADDRESS, peer_address))
        body = ifinfo() + b"".join(
            [
                string(IFLA_IFNAME, name),
                mac(IFLA_ADDRESS, address),
                u32(IFLA_MTU, mtu),
                nest(
                    IFLA_LINKINFO,
                    string(IFLA_INFO_KIND, "veth"),
                    nest(IFLA_INFO_DATA, nest(VETH_INFO_PEER, ifinfo(), *peer)),
                ),
            ]
        )
        return self.add(RTM_NEWLINK, F_CREATE | F_EXCL | F_ECHO, body, action)

    def link_set(self, index, action, up=None, mtu=None, address=None, inet_conf=None, addr_gen_mode=None):
        """Change an existing link; ``inet_conf`` maps IPV4_DEVCONF names to values (IFLA_INET_CONF)."""
        parts = []
        if mtu is not None:
            parts.append(u32(IFLA_MTU, mtu))
        if address is not None:
            parts.append(mac(IFLA_ADDRESS, address))
        af = []
        if inet_conf:
            conf = [u32(IPV4_DEVCONF[k], v) for k, v in sorted(inet_conf.items())]
            af.append(nest(socket.AF_INET, nest(IFLA_INET_CONF, *conf)))
        if addr_gen_mode is not None:
            af.append(nest(socket.AF_INET6, u8(IFLA_INET6_ADDR_GEN_MODE, addr_gen_mode)))
        if af:
            parts.append(nest(IFLA_AF_SPEC, *af))
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        return self.add(RTM_NEWLINK, 0, ifinfo(index, flags, change) + b"".join(parts), action)

    def link_del(self, action, index=0, name=None, ok=(errno.ENODEV,)):
        body = ifinfo(index) + (string(IFLA_IFNAME, name) if name else b"")
        return self.add(RTM_DELLINK, 0, body, action, ok)

    def address(self, op, index, iface, action, nodad=False, scope=RT_SCOPE_UNIVERSE, ok=()):
        """Add (``op="add"``) or delete a host address such as 10.0.0.5/32 on ``index``."""
        family = family_of(iface.ip)
        flags = IFA_F_NODAD if nodad else 0
        body = struct.pack("=BBBBI", family, iface.network.prefixlen, flags, scope, index)
        body += ip(IFA_LOCAL, iface.ip) + ip(IFA_ADDRESS, iface.ip)
        if flags:
            body += u32(IFA_FLAGS, flags)
        if op == "add":
            return self.add(RTM_NEWADDR, F_CREATE | F_EXCL, body, action, ok)
        return self.add(RTM_DELADDR, 0, body, action, ok)

    def route(
        self,
        op,
        prefix,
        action,
        oif=None,
        gateway=None,
        scope=RT_SCOPE_UNIVERSE,
        proto=4,
        kind=RTN_UNICAST,
        onlink=False,
        table=254,
        priority=None,
        ok=(),
        tag=None,
    ):
        """``op``: "add" (fails if the prefix exists), "replace", or "del"."""
        net = ipaddress.ip_network(prefix)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        head = struct.pack(
            "=BBBBBBBBI",
            family,
            net.prefixlen,
            0,
            0,
            table if table < 256 else 252,
            proto,
            scope,
            kind,
            RTNH_F_ONLINK if onlink else 0,
        )
        body = head + (u32(RTA_TABLE, table) if table >= 256 else b"")  # 252: RT_TABLE_COMPAT
        if net.prefixlen:
            body += ip(RTA_DST, net.network_address)
        if oif is not None:
            body += u32(RTA_OIF, oif)
        if gateway is not None:
            body += ip(RTA_GATEWAY, gateway)
        if priority is not None:
            body += u32(RTA_PRIORITY, priority)
        if op == "del":
            return self.add(RTM_DELROUTE, 0, body, action, ok, tag)
        flags = F_CREATE | (F_REPLACE if op == "replace" else F_EXCL)
        return self.add(RTM_NEWROUTE, flags, body, action, ok, tag)

    def neighbour(self, index, address, lladdr, action, state=NUD_PERMANENT):
        body = struct.pack("=BxxxiHBB", family_of(address), index, state, 0, 0)
        body += ip(NDA_DST, address) + mac(NDA_LLADDR, lladdr)
        return self.add(RTM_NEWNEIGH, F_CREATE | F_REPLACE, body, action)

    def proxy_delay(self, index, delay_ms, action):
        """ARP ``proxy_delay`` of one interface (neighbour-table parameters)."""
        body = struct.pack("=Bxxx", socket.AF_INET) + string(NDTA_NAME, "arp_cache")
        body += nest(NDTA_PARMS, u32(NDTPA_IFINDEX, index), u64(NDTPA_PROXY_DELAY, delay_ms))
        return self.add(RTM_SETNEIGHTBL, 0, body, action)


# --- the socket -----------------------------------------------------------------------------------------


def decode(data: bytes):
    """pyroute2 message for one rtnetlink message, or None for kinds we never read."""
    kind = _HDR.unpack_from(data)[1]
    cls = _DECODERS.get(kind)
    if cls is None:
        return None
    msg = cls(data)
    msg.decode()
    return msg


def attributes(data: bytes, pos: int, end: int):
    """(kind without the nested/byte-order flags, payload start, payload end) of each attribute in data[pos:end]."""
    while pos + 4 <= end:
        size, kind = struct.unpack_from("=HH", data, pos)
        if size < 4 or pos + size > end:
            break
        yield kind & 0x3FFF, pos + 4, pos + size
        pos += (size + 3) & ~3


def _ack_detail(data: bytes, off: int, length: int, flags: int) -> str:
    """The kernel's extended-ack message, if any."""
    if not flags & F_ACK_TLVS:
        return ""
    inner_len = _HDR.unpack_from(data, off + 20)[0]
    pos = off + 20 + (16 if flags & F_CAPPED else (inner_len + 3) & ~3)
    for kind, start, stop in attributes(data, pos, off + length):
        if kind == NLMSGERR_ATTR_MSG:
            return data[start:stop].split(b"\0", 1)[0].decode(errors="replace")
    return ""


class Netlink:
    """A NETLINK_ROUTE socket bound to whichever namespace it was created in."""

    def __init__(self, sock: socket.socket, where: str):
        self.sock = sock
        self.where = where
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
            sock.setsockopt(SOL_NETLINK, opt, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(10)
        sock.bind((0, 0))

    def close(self):
        self.sock.close()

    def _recv(self):
        try:
            return self.sock.recv(1 << 17)
        except socket.timeout:
            raise DataplaneError(f"netlink in {self.where} did not answer within 10 s") from None
        except OSError as e:
            raise DataplaneError(f"failed to read netlink replies in {self.where}: {e.strerror}") from None

    def _send(self, data: bytes):
        try:
            self.sock.send(data)
        except OSError as e:
            raise DataplaneError(f"failed to send netlink requests in {self.where}: {e.strerror}") from None

    def _messages(self, data):
        off = 0
        while off + 16 <= len(data):
            length, kind, flags, seq, _ = _HDR.unpack_from(data, off)
            if length < 16:
                break
            yield off, length, kind, flags, seq
            off += (length + 3) & ~3

    def commit(self, batch: Batch) -> tuple:
        """Send every request at once; returns (failures in request order, echoed messages by request)."""
        if not batch.requests:
            return [], {}
        out = bytearray()
        for req in batch.requests:
            req.seq = next(_seq) & 0xFFFFFFFF
            out += _HDR.pack(16 + len(req.body), req.kind, req.flags, req.seq, 0) + req.body
        self._send(bytes(out))
        pending = {req.seq: req for req in batch.requests}
        failures, echoes = {}, {}
        while pending:
            data = self._recv()
            for off, length, kind, flags, seq in self._messages(data):
                req = pending.get(seq)
                if req is None:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + 16)[0]
                    if code and code not in req.ok:
                        failures[seq] = Failure(req, code, _ack_detail(data, off, length, flags))
                    del pending[seq]
                else:
                    echoes[id(req)] = decode(data[off : off + length])
        ordered = [failures[r.seq] for r in batch.requests if r.seq in failures]
        return ordered, echoes

    def run(self, batch: Batch) -> dict:
        """Commit and raise the first failure (later ones are usually its consequences)."""
        failures, echoes = self.commit(batch)
        if failures:
            raise failures[0].error()
        return echoes

    def request(self, kind: int, body: bytes, action: str, dump=False, attempts=3, parse=decode) -> list:
        """A get or a dump; dumps interrupted by a concurrent change are retried. ``parse`` turns one message's
        bytes into what is returned (None: skipped); pyroute2's decoders by default."""
        for _ in range(attempts):
            seq = next(_seq) & 0xFFFFFFFF
            flags = F_REQUEST | (F_DUMP if dump else 0)
            self._send(_HDR.pack(16 + len(body), kind, flags, seq, 0) + body)
            out, interrupted, done = [], False, False
            while not done:
                data = self._recv()
                for off, length, mkind, mflags, mseq in self._messages(data):
                    if mseq != seq:
                        continue
                    if mkind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + 16)[0]
                        if code:
                            detail = _ack_detail(data, off, length, mflags)
                            raise Failure(Request(kind, flags, body, action), code, detail).error()
                        done = True
                    elif mkind == NLMSG_DONE:
                        interrupted |= bool(mflags & F_DUMP_INTR)
                        done = True
                    else:
                        interrupted |= bool(mflags & F_DUMP_INTR)
                        msg = parse(data[off : off + length])
                        if msg is not None:
                            out.append(msg)
                        if not dump:
                            done = True
            if not interrupted:
                return out
        raise DataplaneError(f"failed to {action}: the dump kept being interrupted by concurrent changes")

    # --- reads ----------------------------------------------------------------------------------------

    def link(self, name=None, index=0):
        """One link by name or index, or None if there is no such link."""
        body = ifinfo(index) + (string(IFLA_IFNAME, name) if name else b"")
        try:
            return self.request(RTM_GETLINK, body, f"look up link {name or index} in {self.where}")[0]
        except NotFound:
            return None

    def links(self):
        return self.request(RTM_GETLINK, ifinfo(), f"dump links in {self.where}", dump=True)

    def addresses(self, family=0, index=0):
        body = struct.pack("=BBBBI", family, 0, 0, 0, index)
        return self.request(RTM_GETADDR, body, f"dump addresses in {self.where}", dump=True)

    def routes(self, family=0, table=254, proto=0, kind=0, oif=None):
        """Routes filtered by the kernel (strict dump checking): table, protocol, type, device."""
        body = struct.pack("=BBBBBBBBI", family, 0, 0, 0, table if table < 256 else 0, proto, 0, kind, 0)
        if table >= 256:
            body += u32(RTA_TABLE, table)
        if oif is not None:
            body += u32(RTA_OIF, oif)
        return self.request(RTM_GETROUTE, body, f"dump routes in {self.where}", dump=True)

    def neighbour_tables(self, family=socket.AF_INET):
        body = struct.pack("=Bxxx", family)
        return self.request(RTM_GETNEIGHTBL, body, f"dump neighbour tables in {self.where}", dump=True)

    def nsid_of(self, netns_fd: int) -> int:
        """The id this namespace gives the namespace behind ``netns_fd`` (-1: none assigned)."""
        body = struct.pack("=Bxxx", 0) + u32(NETNSA_FD, netns_fd)
        msgs = self.request(RTM_GETNSID, body, f"look up a netns id in {self.where}")
        if not msgs:
            return -1
        nsid = msgs[0].get("NETNSA_NSID")
        return -1 if nsid is None or nsid >= 0x80000000 else nsid
