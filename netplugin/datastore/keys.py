"""The one key schema. Every key netplugin writes is built here, under ``/netplugin/v1/``.

CIDRs appear in keys with ``/`` replaced by ``-`` (``10.1.0.0-26``, ``fd00::-122``) so each resource is one path
segment. Liveness lives beside, not below, the node record so listing nodes never returns liveness keys.
"""

import netaddr

from netplugin.errors import InvalidInput

ROOT = "/netplugin/v1/"

CLUSTER_CONFIG = ROOT + "config/cluster"
NODES = ROOT + "nodes/"
LIVENESS = ROOT + "liveness/"
BGP_PEERS = ROOT + "bgp/peers/"
POOLS = ROOT + "ipam/pools/"
BLOCKS = ROOT + "ipam/blocks/"
AFFINITY = ROOT + "ipam/affinity/"
HANDLES = ROOT + "ipam/handles/"
DEAD = ROOT + "ipam/dead/"
NETWORKS = ROOT + "networks/"
ENDPOINTS = ROOT + "endpoints/"
POLICIES = ROOT + "policies/"
LEADER = ROOT + "leader/"


def cidr_segment(cidr):
    return str(netaddr.IPNetwork(cidr).cidr).replace("/", "-")


def segment_cidr(segment):
    net, _, plen = segment.rpartition("-")
    return str(netaddr.IPNetwork(f"{net}/{plen}"))


def _name(value, what):
    if not value or "/" in value:
        raise InvalidInput(f"invalid {what} name {value!r} (must be non-empty, without '/')")
    return value


def node(host):
    return NODES + _name(host, "host")


def liveness(host):
    return LIVENESS + _name(host, "host")


def bgp_peer(name):
    return BGP_PEERS + _name(name, "peer")


def pool(cidr):
    return POOLS + cidr_segment(cidr)


def block(cidr):
    return BLOCKS + cidr_segment(cidr)


def pool_blocks_prefix(cidr):
    """A key prefix that every block key of pool ``cidr`` starts with (keys of neighbouring pools may share it),
    so one range compare can say "no block of this pool appeared or changed". IPv4: the octets the prefix length
    fixes; IPv6: the fixed groups before the first zero one, as a zero group may print as ``::``."""
    net = netaddr.IPNetwork(cidr).cidr
    if net.version == 4:
        fixed = str(net.network).split(".")[: min(net.prefixlen // 8, 3)]
        return BLOCKS + "".join(f"{octet}." for octet in fixed)
    lead = []
    for group in net.network.words[: min(net.prefixlen // 16, 7)]:
        if group == 0:
            break
        lead.append(f"{group:x}:")
    return BLOCKS + "".join(lead)


def affinity_prefix(host):
    return AFFINITY + _name(host, "host") + "/"


def affinity(host, cidr):
    return affinity_prefix(host) + cidr_segment(cidr)


def handle(handle_id):
    return HANDLES + _name(handle_id, "handle")


def dead(host):
    return DEAD + _name(host, "host")


def network(name):
    return NETWORKS + _name(name, "network")


def endpoint_prefix(host):
    return ENDPOINTS + _name(host, "host") + "/"


def endpoint(host, endpoint_id):
    return endpoint_prefix(host) + _name(endpoint_id, "endpoint")


def policy(name):
    return POLICIES + _name(name, "policy")


def leader(role):
    return LEADER + _name(role, "role")


def last_segment(key):
    return key.rstrip("/").rsplit("/", 1)[-1]
