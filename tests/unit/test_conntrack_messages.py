"""ctnetlink messages of netplugin.kernel.conntrack against pyroute2's nfct_msg (the reference encoder/decoder):
a dumped entry is read field by field, and the delete request names exactly its tuple, zone and id."""

import socket
import struct

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from netplugin.kernel.conntrack import CT_DELETE, IPS_DST_NAT, IPS_SRC_NAT, delete_body, parse_entry


def dumped(family, src, dst, proto, ports=None, status=0x8, zone=None):
    v = "V4" if family == socket.AF_INET else "V6"
    proto_attrs = [["CTA_PROTO_NUM", proto]]
    if ports:
        proto_attrs += [["CTA_PROTO_SRC_PORT", ports[0]], ["CTA_PROTO_DST_PORT", ports[1]]]
    else:
        proto_attrs += [["CTA_PROTO_ICMP_ID", 77], ["CTA_PROTO_ICMP_TYPE", 8], ["CTA_PROTO_ICMP_CODE", 0]]
    m = nfct_msg()
    m["nfgen_family"] = family
    m["header"]["type"] = 1 << 8
    m["attrs"] = [
        [
            "CTA_TUPLE_ORIG",
            {
                "attrs": [
                    ["CTA_TUPLE_IP", {"attrs": [[f"CTA_IP_{v}_SRC", src], [f"CTA_IP_{v}_DST", dst]]}],
                    ["CTA_TUPLE_PROTO", {"attrs": proto_attrs}],
                ]
            },
        ],
        ["CTA_STATUS", status],
        ["CTA_MARK", 0x40000],
        ["CTA_ID", 12345],
    ] + ([["CTA_ZONE", zone]] if zone else [])
    m.encode()
    return bytes(m.data), m


@pytest.mark.parametrize(
    "family, src, dst, proto, ports",
    [
        (socket.AF_INET, "10.0.0.1", "10.0.0.2", 6, (40000, 80)),
        (socket.AF_INET6, "fd00::1", "fd00::2", 17, (5353, 53)),
        (socket.AF_INET, "10.0.0.1", "192.0.2.1", 1, None),
    ],
)
def test_a_dumped_entry_is_read_and_its_delete_names_exactly_it(family, src, dst, proto, ports):
    data, msg = dumped(family, src, dst, proto, ports, zone=7)
    e = parse_entry(data)
    assert (e.family, e.src, e.dst, e.protocol, e.id, e.zone, e.mark) == (
        4 if family == socket.AF_INET else 6,
        src,
        dst,
        proto,
        12345,
        7,
        0x40000,
    )
    assert (e.src_port, e.dst_port) == (ports or (None, None))
    assert not e.nat
    body = delete_body(e)
    request = nfct_msg(struct.pack("=LHHLL", 16 + len(body), CT_DELETE, 0, 0, 0) + body)
    request.decode()
    assert request["nfgen_family"] == family
    assert request.get_attr("CTA_TUPLE_ORIG") == msg.get_attr("CTA_TUPLE_ORIG")
    assert (request.get_attr("CTA_ID"), request.get_attr("CTA_ZONE")) == (12345, 7)
    assert request.get_attr("CTA_STATUS") is None  # nothing but what names the entry


def test_nat_is_seen_in_either_direction():
    for status in (IPS_SRC_NAT, IPS_DST_NAT):
        assert parse_entry(dumped(socket.AF_INET, "10.0.0.1", "10.0.0.2", 6, (1, 2), status=status | 0x8)[0]).nat
