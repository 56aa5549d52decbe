"""Byte layouts of the map keys and values in ``progs/netplugin.c`` (one place, checked against the maps).

IPv4 addresses are stored IPv4-mapped (``::ffff:a.b.c.d``) so one map and one LPM trie serve both families.
"""

import ipaddress
import struct

MAX_ADDRS = 4
MAX_RULES = 64
MAX_PORT_RANGES = 8

ACT_NONE, ACT_ALLOW, ACT_DENY, ACT_LOG = 0, 1, 2, 3
DIR_EGRESS, DIR_INGRESS = 0, 1

ENDPOINT = struct.Struct(f"<IIII{4 * MAX_ADDRS}s{16 * MAX_ADDRS}s")
LOCAL = struct.Struct("<II6s6s")
POL_KEY = struct.Struct("<I4s16s")  # prefixlen is host order (the LPM trie's rule); ep_dir network order
RULE = struct.Struct(f"<BBBB{MAX_PORT_RANGES}H{MAX_PORT_RANGES}H")
RULES_HEAD = struct.Struct("<II")
COUNTERS = struct.Struct("<QQQQQ")
COUNTER_NAMES = ("allowed", "denied", "spoofed", "logged", "to_stack")
IFINDEX = struct.Struct("<I")
FLOW_KEY = struct.Struct("<16s16sHHBB2x")
FLOW = struct.Struct("<QIBB2x")
CONFIG = struct.Struct("<II")
NET_KEY = struct.Struct("<I16s")

# Byte sizes the maps must have; a mismatch means records.py and the C source disagree.
SIZES = {
    "np_endpoints": (IFINDEX.size, ENDPOINT.size),
    "np_locals": (16, LOCAL.size),
    "np_pol_peers": (POL_KEY.size, 8),
    "np_pol_rules": (4, RULES_HEAD.size + MAX_RULES * RULE.size),
    "np_counters": (4, COUNTERS.size),
    "np_flows": (FLOW_KEY.size, FLOW.size),
    "np_config": (4, CONFIG.size),
    "np_fast_dsts": (NET_KEY.size, 1),
}


def addr16(ip):
    """16 bytes for an address: IPv6 as is, IPv4 mapped."""
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        a = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed)
    return a.packed


def mac_bytes(mac):
    return bytes.fromhex(mac.replace(":", ""))


def ifindex_key(ifindex):
    return IFINDEX.pack(ifindex)


def endpoint(ep_id, addresses, slot=0):
    """np_endpoints value: the addresses an endpoint may send from (up to MAX_ADDRS per family), and which
    ``slot`` of its policy lists is live."""
    v4 = [ipaddress.ip_address(a).packed for a in addresses if ipaddress.ip_address(a).version == 4]
    v6 = [ipaddress.ip_address(a).packed for a in addresses if ipaddress.ip_address(a).version == 6]
    if len(v4) > MAX_ADDRS or len(v6) > MAX_ADDRS:
        raise ValueError(f"endpoint {ep_id}: more than {MAX_ADDRS} addresses of one family")
    return ENDPOINT.pack(ep_id, len(v4), len(v6), slot, b"".join(v4), b"".join(v6))


def endpoint_slot(value):
    """The live policy slot of an np_endpoints value."""
    return ENDPOINT.unpack(value)[3] & 1


def with_slot(value, slot):
    """An np_endpoints value with its live policy slot switched (everything else kept)."""
    fields = list(ENDPOINT.unpack(value))
    fields[3] = slot
    return ENDPOINT.pack(*fields)


def local(ep_id, host_ifindex, container_mac, host_mac):
    """np_locals value: where bpf_redirect_peer sends a packet for a local endpoint, and its MACs."""
    return LOCAL.pack(ep_id, host_ifindex, mac_bytes(container_mac), mac_bytes(host_mac))


def ep_dir(ep_id, direction, slot=0):
    """The key of one endpoint's list for one direction in one slot (np_pol_rules; np_pol_peers' first word)."""
    return ep_id << 2 | slot << 1 | direction


def split_ep_dir(value):
    """ep_dir -> (endpoint id, slot, direction)."""
    return value >> 2, value >> 1 & 1, value & 1


def rules_key(ep_id, direction, slot=0):
    return IFINDEX.pack(ep_dir(ep_id, direction, slot))


def pol_key(ep_id, direction, network, slot=0):
    """np_pol_peers key: (endpoint, slot, direction) matched in full, then the peer network's prefix (an IPv4
    network, or IPv6 where IPv4-mapped networks stand for IPv4)."""
    n = ipaddress.ip_network(network, strict=False)
    bits = n.prefixlen + (96 if n.version == 4 else 0)
    return POL_KEY.pack(32 + bits, struct.pack(">I", ep_dir(ep_id, direction, slot)), addr16(n.network_address))


def pol_key_ep_dir(key):
    """The ep_dir an np_pol_peers key belongs to."""
    return struct.unpack(">I", key[4:8])[0]


def net_key(network):
    """np_fast_dsts key: a network (IPv4 mapped into the same trie)."""
    n = ipaddress.ip_network(network, strict=False)
    return NET_KEY.pack(n.prefixlen + (96 if n.version == 4 else 0), addr16(n.network_address))


def rule(action, proto=0, ports=(), any_peer=False):
    """One rule: protocol number (0 any), port ranges [(lo, hi)] on the destination port (empty: any)."""
    ports = list(ports)
    if len(ports) > MAX_PORT_RANGES:
        raise ValueError(f"a rule has more than {MAX_PORT_RANGES} port ranges")
    lo = [p[0] for p in ports] + [0] * (MAX_PORT_RANGES - len(ports))
    hi = [p[1] for p in ports] + [0] * (MAX_PORT_RANGES - len(ports))
    return RULE.pack(proto, action, len(ports), int(any_peer), *lo, *hi)


def rules(rule_list, default_action):
    """np_pol_rules value: the ordered rules of one endpoint and direction."""
    if len(rule_list) > MAX_RULES:
        raise ValueError(f"more than {MAX_RULES} rules for one endpoint and direction")
    body = b"".join(rule_list).ljust(MAX_RULES * RULE.size, b"\0")
    return RULES_HEAD.pack(len(rule_list), default_action) + body


def counters(per_cpu):
    """Sum a per-CPU np_counters value into a dict."""
    total = [0] * len(COUNTER_NAMES)
    for raw in per_cpu:
        for i, v in enumerate(COUNTERS.unpack(raw)):
            total[i] += v
    return dict(zip(COUNTER_NAMES, total))


def config(policy_gen):
    """np_config value: bumping ``policy_gen`` makes every cached flow verdict be re-checked at its next packet."""
    return CONFIG.pack(policy_gen & 0xFFFFFFFF, 0)


def flow(key, value):
    """A readable np_flows entry: (src, dst, sport, dport, proto, verdict, originating direction?)."""
    src, dst, sport, dport, proto, echo = FLOW_KEY.unpack(key)
    _, gen, verdict, orig = FLOW.unpack(value)

    def show(a):
        ip = ipaddress.IPv6Address(a)
        return str(ip.ipv4_mapped or ip)

    return {
        "src": show(src),
        "dst": show(dst),
        "sport": sport,
        "dport": dport,
        "proto": proto,
        "echo": {1: "request", 2: "reply"}.get(echo, ""),
        "gen": gen,
        "verdict": {ACT_ALLOW: "allow", ACT_DENY: "deny"}.get(verdict, verdict),
        "orig": bool(orig),
    }


def endpoint_entry(key, value):
    """A readable np_endpoints entry: the host veth's ifindex, the endpoint id, the addresses it may send from,
    the live slot of its policy lists."""
    (ifindex,) = IFINDEX.unpack(key)
    ep_id, n4, n6, slot, v4, v6 = ENDPOINT.unpack(value)
    addrs = [str(ipaddress.IPv4Address(v4[4 * i : 4 * i + 4])) for i in range(n4)]
    addrs += [str(ipaddress.IPv6Address(v6[16 * i : 16 * i + 16])) for i in range(n6)]
    return {"ifindex": ifindex, "id": ep_id, "addresses": addrs, "slot": slot & 1}


def rules_count(value):
    """How many rules an np_pol_rules value holds."""
    return RULES_HEAD.unpack(value[: RULES_HEAD.size])[0]


def config_gen(value):
    return CONFIG.unpack(value)[0]


# --- a Python mirror of the program's policy lookup (progs/netplugin.c: policy, eval_rule) -----------------


def lpm_bits(peers, ep_id, direction, slot, ip):
    """What np_pol_peers' longest-prefix match returns for ``ip``: ``peers`` maps keys to values as written."""
    a = addr16(ip)
    word = struct.pack(">I", ep_dir(ep_id, direction, slot))
    whole = int.from_bytes(a, "big")
    for plen in range(128, -1, -1):
        masked = (whole >> (128 - plen) << (128 - plen)) if plen else 0
        value = peers.get(POL_KEY.pack(32 + plen, word, masked.to_bytes(16, "big")))
        if value is not None:
            return int.from_bytes(value, "little")
    return 0


def walk_rules(value, bits, proto, dport, ports_ok):
    """(action, logs) of an np_pol_rules value for a packet whose peer matched ``bits``: the first ALLOW or
    DENY that matches, else the default; LOG rules that match are counted and passed."""
    n, default = RULES_HEAD.unpack(value[: RULES_HEAD.size])
    logs = 0
    for i in range(min(n, MAX_RULES)):
        off = RULES_HEAD.size + i * RULE.size
        r_proto, action, nports, any_peer, *ranges = RULE.unpack(value[off : off + RULE.size])
        if not any_peer and not bits >> i & 1:
            continue
        if r_proto and r_proto != proto:
            continue
        if nports:
            lo, hi = ranges[:MAX_PORT_RANGES], ranges[MAX_PORT_RANGES:]
            if not ports_ok or not any(lo[j] <= dport <= hi[j] for j in range(min(nports, MAX_PORT_RANGES))):
                continue
        if action == ACT_LOG:
            logs += 1
            continue
        return action, logs
    return default, logs
