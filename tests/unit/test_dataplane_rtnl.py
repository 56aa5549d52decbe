"""The hand-packed rtnetlink requests, read back with pyroute2's decoders; and the planners that emit them."""

import errno
import ipaddress
import socket
import struct

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.ndtmsg import ndtmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netplugin.dataplane import ROUTE_PROTO, host
from netplugin.kernel import rtnl
from netplugin.kernel.rtnl import Batch


def packed(req):
    """The request as it goes on the wire, decoded by pyroute2."""
    cls = {
        rtnl.RTM_NEWLINK: ifinfmsg,
        rtnl.RTM_DELLINK: ifinfmsg,
        rtnl.RTM_NEWADDR: ifaddrmsg,
        rtnl.RTM_DELADDR: ifaddrmsg,
        rtnl.RTM_NEWROUTE: rtmsg,
        rtnl.RTM_DELROUTE: rtmsg,
        rtnl.RTM_NEWNEIGH: ndmsg,
        rtnl.RTM_SETNEIGHTBL: ndtmsg,
    }[req.kind]
    data = struct.pack("=LHHLL", 16 + len(req.body), req.kind, req.flags, 1, 0) + req.body
    msg = cls(data)
    msg.decode()
    return msg


def attrs(data: bytes):
    """Top-level (type, payload) pairs of a run of netlink attributes."""
    out, pos = [], 0
    while pos + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, pos)
        out.append((kind, data[pos + 4 : pos + size]))
        pos += (size + 3) & ~3
    return out


def test_veth_request():
    req = Batch().veth("np0123456789a", "ee:ee:ee:ee:ee:ee", 1400, "eth0", 7, 1400, "02:00:00:00:00:01", "create")
    msg = packed(req)
    assert req.flags & rtnl.F_CREATE and req.flags & rtnl.F_EXCL and req.flags & rtnl.F_ECHO
    assert msg.get("ifname") == "np0123456789a" and msg.get("mtu") == 1400
    assert msg.get("address") == "ee:ee:ee:ee:ee:ee"
    assert msg.get(("linkinfo", "kind")) == "veth"
    peer = msg.get(("linkinfo", "data", "VETH_INFO_PEER"))
    assert peer.get("ifname") == "eth0" and peer.get("net_ns_fd") == 7 and peer.get("address") == "02:00:00:00:00:01"


def test_link_set_packs_devconf_as_nested_attributes():
    req = Batch().link_set(5, "configure", up=True, inet_conf={"rp_filter": 1, "proxy_arp": 1}, addr_gen_mode=1)
    msg = packed(req)
    assert msg["index"] == 5 and msg["flags"] == rtnl.IFF_UP and msg["change"] == rtnl.IFF_UP
    (spec,) = [p for k, p in attrs(req.body[16:]) if k == rtnl.IFLA_AF_SPEC]
    families = dict(attrs(spec))
    (conf,) = [p for k, p in attrs(families[socket.AF_INET]) if k == rtnl.IFLA_INET_CONF]
    assert {k: struct.unpack("=I", v)[0] for k, v in attrs(conf)} == {3: 1, 8: 1}  # PROXY_ARP, RP_FILTER
    assert attrs(families[socket.AF_INET6]) == [(rtnl.IFLA_INET6_ADDR_GEN_MODE, b"\x01")]
    down = packed(Batch().link_set(5, "x", mtu=9000))
    assert down["change"] == 0 and down.get("mtu") == 9000


def test_address_requests():
    v4 = packed(Batch().address("add", 3, ipaddress.ip_interface("10.0.0.5/32"), "add"))
    assert (v4["family"], v4["prefixlen"], v4["index"]) == (socket.AF_INET, 32, 3)
    assert v4.get("IFA_LOCAL") == "10.0.0.5" and v4.get("IFA_ADDRESS") == "10.0.0.5"
    v6 = packed(Batch().address("add", 3, ipaddress.ip_interface("fd00::5/128"), "add", nodad=True))
    assert v6["family"] == socket.AF_INET6 and v6["flags"] == rtnl.IFA_F_NODAD
    assert v6.get("IFA_FLAGS") == rtnl.IFA_F_NODAD
    delete = Batch().address("del", 3, ipaddress.ip_interface("10.0.0.5/32"), "del", ok=(errno.EADDRNOTAVAIL,))
    assert delete.kind == rtnl.RTM_DELADDR and delete.ok == (errno.EADDRNOTAVAIL,)


def test_route_requests():
    add = Batch().route("add", "10.0.0.5/32", "add", oif=4, scope=rtnl.RT_SCOPE_LINK, proto=ROUTE_PROTO)
    msg = packed(add)
    assert add.flags & rtnl.F_EXCL and not add.flags & rtnl.F_REPLACE
    assert (msg["dst_len"], msg["proto"], msg["scope"], msg["type"]) == (32, ROUTE_PROTO, 253, rtnl.RTN_UNICAST)
    assert msg.get("dst") == "10.0.0.5" and msg.get("oif") == 4
    default = packed(Batch().route("replace", "0.0.0.0/0", "x", oif=2, gateway="169.254.1.1", onlink=True))
    assert default["dst_len"] == 0 and default.get("dst") is None and default.get("gateway") == "169.254.1.1"
    assert default["flags"] == rtnl.RTNH_F_ONLINK
    v6 = packed(Batch().route("replace", "::/0", "x", oif=2, gateway="fe80::ecee:eeff:feee:eeee"))
    assert v6["family"] == socket.AF_INET6 and v6.get("gateway") == "fe80::ecee:eeff:feee:eeee"


def test_neighbour_and_proxy_delay_requests():
    msg = packed(Batch().neighbour(2, "169.254.1.1", "ee:ee:ee:ee:ee:ee", "x"))
    assert msg["ifindex"] == 2 and msg["state"] == rtnl.NUD_PERMANENT
    assert msg.get("NDA_DST") == "169.254.1.1" and msg.get("NDA_LLADDR") == "ee:ee:ee:ee:ee:ee"
    tbl = packed(Batch().proxy_delay(9, 0, "x"))
    assert tbl.get("NDTA_NAME") == "arp_cache"
    parms = tbl.get("NDTA_PARMS")
    assert parms.get("NDTPA_IFINDEX") == 9 and parms.get("NDTPA_PROXY_DELAY") == 0


def test_extended_ack_message_is_read():
    inner = struct.pack("=LHHLL", 16, rtnl.RTM_NEWROUTE, 5, 42, 0)
    tlv = rtnl.attr(rtnl.NLMSGERR_ATTR_MSG, b"Nexthop device is not up\0")
    body = struct.pack("=i", -errno.ENETDOWN) + inner + tlv
    flags = rtnl.F_CAPPED | rtnl.F_ACK_TLVS
    data = struct.pack("=LHHLL", 16 + len(body), rtnl.NLMSG_ERROR, flags, 42, 0) + body
    assert rtnl._ack_detail(data, 0, len(data), flags) == "Nexthop device is not up"
    failure = rtnl.Failure(
        rtnl.Request(rtnl.RTM_NEWROUTE, 0, b"", "add route 10.0.0.5/32"), errno.ENETDOWN, "Nexthop device is not up"
    )
    assert str(failure.error()) == "failed to add route 10.0.0.5/32: Network is down (Nexthop device is not up)"


def test_route_plan_adds_missing_and_deletes_extra():
    batch = Batch()
    want = [ipaddress.ip_interface("10.0.0.5/32"), ipaddress.ip_interface("fd00::5/128")]
    have = [ipaddress.ip_interface("10.0.0.5/32"), ipaddress.ip_interface("10.0.0.9/32")]
    added, removed = host.plan_routes(batch, 4, "np0", want, have, "ep")
    assert added == ["fd00::5/128 dev np0"] and removed == ["10.0.0.9/32 dev np0"]
    kinds = [r.kind for r in batch.requests]
    assert kinds == [rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE]
    delete = packed(batch.requests[1])
    assert delete["proto"] == ROUTE_PROTO and delete.get("oif") == 4  # deletes only our route on our veth


def test_blackhole_plan_is_exactly_the_owned_blocks():
    batch = Batch()
    want = {ipaddress.ip_network("10.1.0.0/26"), ipaddress.ip_network("10.1.0.64/26")}
    have = {ipaddress.ip_network("10.1.0.64/26"), ipaddress.ip_network("10.9.0.0/26")}
    added, removed = host.plan_blackholes(batch, want, have)
    assert added == ["10.1.0.0/26"] and removed == ["10.9.0.0/26"]
    assert [packed(r)["type"] for r in batch.requests] == [rtnl.RTN_BLACKHOLE, rtnl.RTN_BLACKHOLE]
    assert all(packed(r)["proto"] == ROUTE_PROTO for r in batch.requests)


def encoded(cls, fields, attrs):
    """pyroute2's own encoding of a message (the body after the 16-byte netlink header)."""
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data[16:])


def test_requests_are_byte_identical_to_pyroute2s_encoder():
    """pyroute2's message classes define the wire format; the packer is the fast path and must match them."""
    b = Batch()
    peer = [("IFLA_IFNAME", "eth0"), ("IFLA_NET_NS_FD", 7), ("IFLA_MTU", 1400), ("IFLA_ADDRESS", "02:00:00:00:00:01")]
    veth = [
        ("IFLA_IFNAME", "np0123456789a"),
        ("IFLA_ADDRESS", "ee:ee:ee:ee:ee:ee"),
        ("IFLA_MTU", 1400),
        (
            "IFLA_LINKINFO",
            {
                "attrs": [
                    ("IFLA_INFO_KIND", "veth"),
                    ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", {"attrs": peer})]}),
                ]
            },
        ),
    ]
    cases = [
        (
            b.veth("np0123456789a", "ee:ee:ee:ee:ee:ee", 1400, "eth0", 7, 1400, "02:00:00:00:00:01", "create"),
            ifinfmsg,
            {},
            veth,
        ),
        (
            b.link_set(5, "set", up=True, mtu=1400, address="ee:ee:ee:ee:ee:ee"),
            ifinfmsg,
            {"index": 5, "flags": 1, "change": 1},
            [("IFLA_MTU", 1400), ("IFLA_ADDRESS", "ee:ee:ee:ee:ee:ee")],
        ),
        (b.link_del("delete", name="np0"), ifinfmsg, {}, [("IFLA_IFNAME", "np0")]),
        (
            b.address("add", 5, ipaddress.ip_interface("fd00::5/128"), "add", nodad=True),
            ifaddrmsg,
            {"family": socket.AF_INET6, "prefixlen": 128, "flags": 2, "index": 5},
            [("IFA_LOCAL", "fd00::5"), ("IFA_ADDRESS", "fd00::5"), ("IFA_FLAGS", 2)],
        ),
        (
            b.route("add", "10.0.0.5/32", "add", oif=4, scope=rtnl.RT_SCOPE_LINK, proto=ROUTE_PROTO),
            rtmsg,
            {"family": socket.AF_INET, "dst_len": 32, "table": 254, "proto": ROUTE_PROTO, "scope": 253, "type": 1},
            [("RTA_DST", "10.0.0.5"), ("RTA_OIF", 4)],
        ),
        (
            b.route("replace", "fd00::/64", "replace", gateway="fd00::1", proto=81, priority=5, table=1000),
            rtmsg,
            {"family": socket.AF_INET6, "dst_len": 64, "table": 252, "proto": 81, "type": 1},
            [("RTA_TABLE", 1000), ("RTA_DST", "fd00::"), ("RTA_GATEWAY", "fd00::1"), ("RTA_PRIORITY", 5)],
        ),
        (
            b.neighbour(2, "169.254.1.1", "ee:ee:ee:ee:ee:ee", "neigh"),
            ndmsg,
            {"family": socket.AF_INET, "ifindex": 2, "state": rtnl.NUD_PERMANENT},
            [("NDA_DST", "169.254.1.1"), ("NDA_LLADDR", "ee:ee:ee:ee:ee:ee")],
        ),
        (
            b.proxy_delay(4, 0, "delay"),
            ndtmsg,
            {"family": socket.AF_INET},
            [("NDTA_NAME", "arp_cache"), ("NDTA_PARMS", {"attrs": [("NDTPA_IFINDEX", 4), ("NDTPA_PROXY_DELAY", 0)]})],
        ),
    ]
    for req, cls, fields, attrs_ in cases:
        assert req.body == encoded(cls, fields, attrs_), req.action
