"""Bad records under every prefix the agent's view reads: text that is not JSON, and JSON that is not a record of
its kind (missing or mistyped fields, a name that disagrees with its key, a key of the wrong shape)."""

from netplugin.datastore import keys
from netplugin.datastore.client import _b64

NOT_JSON = '{"not": "a record"'


def bad_records(host):
    """[(key, raw text)]; endpoint records go under ``host`` (the agent's own host, the most dangerous place)."""
    return [
        (keys.CLUSTER_CONFIG, NOT_JSON),
        (keys.CLUSTER_CONFIG + "x", "{}"),
        (keys.node("x"), NOT_JSON),
        (keys.node("y"), '{"name": 5}'),
        (keys.node("z"), '{"name": "other"}'),
        (keys.liveness("x") + "/deeper", "{}"),
        (keys.bgp_peer("x"), NOT_JSON),
        (keys.bgp_peer("y"), '{"name": "y", "address": "1.2.3.4"}'),
        (keys.AFFINITY + "x", NOT_JSON),
        (keys.AFFINITY + "h9/not-a-cidr", "{}"),
        (keys.endpoint(host, "x"), NOT_JSON),
        (keys.endpoint(host, "y"), '{"id": "y", "host": "%s"}' % host),
        (keys.endpoint(host, "z"), '["a", "list"]'),
        (keys.policy("x"), NOT_JSON),
        (keys.policy("y"), '{"spec": {}}'),
        (keys.network("x"), NOT_JSON),
        (keys.network("y"), '{"name": ["y"]}'),
        (keys.POOLS + "x", NOT_JSON),
        (keys.pool("10.9.0.0/16"), '{"cidr": "10.9.0.0/16", "block_size": 3}'),
    ]


def put_raw(ds, key, text):
    """Store ``text`` as it is (Datastore.put would encode a document as JSON): what a stray etcdctl put does."""
    ds.call("/kv/put", {"key": _b64(key), "value": _b64(text)})
