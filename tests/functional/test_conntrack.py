"""The conntrack writer against a throwaway namespace's real table: entries of both families are listed by their
original tuple, chosen ones deleted in one batch, and an entry with another id than the one named is left alone."""

import dataclasses
import sys

import pytest

from netplugin.kernel.conntrack import Conntrack
from netplugin.lab.netns import nsexec

pytestmark = pytest.mark.functional

SEND = """
import socket, sys
for addr, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((addr, int(sys.argv[1])))
    s.sendto(b"x", (addr, 5353))
"""


def traffic(ns, sport):
    nsexec(ns, [sys.executable, "-c", SEND, str(sport)])


def udp(entries, sport):
    return sorted((e for e in entries if e.protocol == 17 and e.src_port == sport), key=lambda e: e.family)


def test_lists_and_deletes_exactly_the_chosen_entries(namespaces):
    ns = namespaces.add()
    nsexec(ns, "ip link set lo up")
    for tool in ("iptables", "ip6tables"):  # a conntrack match makes the namespace track connections
        nsexec(ns, f"{tool} -A INPUT -m conntrack --ctstate NEW -j ACCEPT")
    traffic(ns, 4001)
    traffic(ns, 4002)
    nsexec(ns, "ping -c1 -W1 127.0.0.1")
    ct = Conntrack(f"/run/netns/{ns}")
    entries = ct.entries()
    v4, v6 = udp(entries, 4001)
    assert (v4.family, v4.src, v4.dst, v4.dst_port, v4.nat) == (4, "127.0.0.1", "127.0.0.1", 5353, False)
    assert (v6.family, v6.src, v6.dst, v6.dst_port) == (6, "::1", "::1", 5353)
    assert [e.protocol for e in entries if e.protocol == 1 and e.src == "127.0.0.1"] == [1]
    assert ct.delete([v4, v6]) == (2, [])
    left = ct.entries()
    assert udp(left, 4001) == [] and len(udp(left, 4002)) == 2 and any(e.protocol == 1 for e in left)
    assert ct.delete([v4]) == (1, [])  # gone already counts as gone
    # The same tuple again: a delete naming another id spares it (gone, as far as that delete is concerned).
    traffic(ns, 4001)
    newer = udp(ct.entries(), 4001)[0]
    assert ct.delete([dataclasses.replace(newer, id=newer.id ^ 1)]) == (1, []) and len(udp(ct.entries(), 4001)) == 2
    assert ct.delete([dataclasses.replace(newer, id=None)]) == (1, [])  # without an id: by its tuple
    assert [e.family for e in udp(ct.entries(), 4001)] == [6]
