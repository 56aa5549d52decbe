"""A snapshot of the cluster state the agent's reconcilers need, read from etcd in one pass per prefix."""
from dataclasses import dataclass, field

from netplugin.datastore import keys
from netplugin.datastore.models import BgpPeer, ClusterConfig, Endpoint, Network, Node, Pool

PREFIXES = (keys.CLUSTER_CONFIG, keys.NODES, keys.LIVENESS, keys.BGP_PEERS, keys.AFFINITY, keys.ENDPOINTS,
            keys.POLICIES, keys.NETWORKS, keys.POOLS)


@dataclass
class ClusterView:
    revision: int = 0
    config: ClusterConfig = field(default_factory=ClusterConfig)
    nodes: dict = field(default_factory=dict)  # name -> Node
    alive: set = field(default_factory=set)
    peers: list = field(default_factory=list)
    blocks: dict = field(default_factory=dict)  # host -> sorted list of block CIDRs affine to it
    endpoints: list = field(default_factory=list)  # every host's
    policies: list = field(default_factory=list)  # raw dicts, validated by policy/
    networks: dict = field(default_factory=dict)
    pools: list = field(default_factory=list)

    def endpoints_of(self, host):
        return [e for e in self.endpoints if e.host == host]


def relevant(key):
    """Does a change to ``key`` concern the reconcilers? (handles and block records do not: they churn.)"""
    return any(key.startswith(p) for p in PREFIXES)


def read_view(ds):
    view = ClusterView()
    lists, view.revision = ds.get_prefixes(PREFIXES)  # one transaction: one consistent revision
    for kv in (kv for kvs in lists for kv in kvs):
        k = kv.key
        if k == keys.CLUSTER_CONFIG:
            view.config = ClusterConfig.from_dict(kv.value)
        elif k.startswith(keys.NODES):
            node = Node.from_dict(kv.value)
            view.nodes[node.name] = node
        elif k.startswith(keys.LIVENESS):
            view.alive.add(keys.last_segment(k))
        elif k.startswith(keys.BGP_PEERS):
            view.peers.append(BgpPeer.from_dict(kv.value))
        elif k.startswith(keys.AFFINITY):
            host = k[len(keys.AFFINITY):].split("/")[0]
            view.blocks.setdefault(host, []).append(keys.segment_cidr(keys.last_segment(k)))
        elif k.startswith(keys.ENDPOINTS):
            view.endpoints.append(Endpoint.from_dict(kv.value))
        elif k.startswith(keys.POLICIES):
            view.policies.append(kv.value)
        elif k.startswith(keys.NETWORKS):
            net = Network.from_dict(kv.value)
            view.networks[net.name] = net
        elif k.startswith(keys.POOLS):
            view.pools.append(Pool.from_dict(kv.value))
    return view
