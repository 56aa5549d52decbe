"""Docker networks of this host and their Network records in etcd.

libnetwork tells a driver only a network's id; its name, labels and driver options are read from dockerd's
API (``--docker-api``). CreateNetwork cannot ask (dockerd stores the network only after the driver said yes),
so the name is resolved in the background right after, and again on demand at CreateEndpoint (also after an
agent restart, when this cache is empty). Without the API a network is named by its Docker id, and one this
agent does not know (after a restart) is read back from the record CreateNetwork wrote; an id with no such
record is refused, never recorded as a network without subnets.

The record lives at ``keys.network(name)``: every host's dockerd that creates a network of that name shares
it, with its containers' addresses coming from the same netplugin pool. The first host writes it; a host whose
network of the same name uses other pools is refused while the record's network still has endpoints (a stale
record, with none, is replaced). The record is deleted with the Docker network that wrote it once no endpoint
on any host uses it; another host's next endpoint writes it again. A Docker network deleted while endpoints
still use its record (DeleteNetwork before their DeleteEndpoint) marks the record retired (in etcd, so an agent
restart or another host keeps the promise), and the record goes with the last of them.
"""

import logging
import threading
import time
from dataclasses import dataclass, field

from netplugin.datastore import keys
from netplugin.datastore.client import delete_op, mod_is, put_op
from netplugin.datastore.models import Endpoint, Network
from netplugin.dataplane import GATEWAY_V4, GATEWAY_V6
from netplugin.docker.dockerapi import DockerApiError, NotInDocker
from netplugin.docker.pools import ADDRESS_SPACE, parse_cidr, place_subnet, usable_subnet
from netplugin.errors import Conflict, InvalidInput, NetpluginError, NotFound

LOG = logging.getLogger(__name__)
GENERIC = "com.docker.network.generic"
MTU_OPTION = "com.docker.network.driver.mtu"
RECORD_PREFIX = "netplugin.io/"  # our own keys in Network.options, beside the user's -o options
RETIRED = RECORD_PREFIX + "docker-deleted"  # set on a record whose Docker network is gone but endpoints remain


@dataclass
class DockerNetwork:
    id: str
    subnets: list = field(default_factory=list)  # Docker's subnets (CIDRs), IPv4 first
    ip_ranges: list = field(default_factory=list)
    gateways: list = field(default_factory=list)  # user-given --gateway values (we route via 169.254.1.1)
    options: dict = field(default_factory=dict)  # driver options (-o)
    labels: dict = field(default_factory=dict)
    name: str | None = None  # None until read from dockerd
    recorded: bool = False

    @property
    def mtu(self):
        """The MTU of this network's veths (``-o com.docker.network.driver.mtu=N``); None: the agent's."""
        return parse_mtu(self.options.get(MTU_OPTION))


def parse_mtu(value):
    if value is None or value == "":
        return None
    try:
        mtu = int(str(value), 10)
    except ValueError:
        mtu = None
    if mtu is None or not 68 <= mtu <= 65535:
        raise InvalidInput(f"driver option {MTU_OPTION}={value!r} must be a whole number from 68 to 65535")
    return mtu


def parse_create(network_id, options, ipv4_data, ipv6_data):
    """A DockerNetwork from CreateNetwork's payload; refuses networks whose addresses are not netplugin's."""
    net = DockerNetwork(id=network_id)
    generic = (options or {}).get(GENERIC) or {}
    if not isinstance(generic, dict):
        raise InvalidInput(f"{GENERIC} must be an object of driver options")
    net.options = {str(k): str(v) for k, v in generic.items()}
    for data in list(ipv4_data or []) + list(ipv6_data or []):
        space = data.get("AddressSpace")
        if space != ADDRESS_SPACE:
            raise InvalidInput(
                f"network {network_id[:12]} takes addresses from {space!r}: netplugin networks need "
                "netplugin IPAM (docker network create -d netplugin --ipam-driver netplugin ...)"
            )
        net.subnets.append(str(usable_subnet(data.get("Pool"), "subnet")))
        gateway = str(data.get("Gateway") or "").split("/")[0]
        if gateway and gateway not in (GATEWAY_V4, GATEWAY_V6):
            net.gateways.append(gateway)
    if not net.subnets:
        raise InvalidInput(f"network {network_id[:12]} has no IPv4 or IPv6 data: use --ipam-driver netplugin")
    mtu = net.mtu  # refused now rather than at the first container
    if mtu is not None and mtu < 1280 and ipv6_data:
        raise InvalidInput(f"driver option {MTU_OPTION}={mtu} is below IPv6's minimum of 1280")
    return net


class NetworkRegistry:
    def __init__(self, ds, ipam, api=None):
        self.ds = ds
        self.ipam = ipam
        self.api = api
        self._nets = {}
        self._lock = threading.Lock()

    def add(self, net):
        if self.api is None:  # named by its id: record it now, so it survives an agent restart
            net.name = net.id
            self.ensure_record(net)
        with self._lock:
            self._nets[net.id] = net
        if self.api is not None:
            threading.Thread(target=self._resolve_soon, args=(net.id,), name="docker-network-name", daemon=True).start()

    def forget(self, network_id):
        with self._lock:
            return self._nets.pop(network_id, None)

    def remove(self, network_id):
        """DeleteNetwork: forget the network and delete its record, now or with the last endpoint using it."""
        self.forget(network_id)
        net = self._recorded(network_id)  # by its record: this cache may not know it (a restart, a re-create)
        if net is None or self.delete_record(net):
            return
        kv = self._own_record(net)
        if kv is not None:
            record = Network.from_dict(kv.value)
            record.options = {**(record.options or {}), RETIRED: "true"}
            self.ds.txn([mod_is(kv.key, kv.mod_revision)], [put_op(kv.key, record.to_dict())])
            LOG.info("event=docker.network.retired name=%s", net.name)

    def endpoint_gone(self, name):
        """After a DeleteEndpoint on network ``name``: a retired record goes once no endpoint uses it."""
        kv = self.ds.get(keys.network(name))
        record = Network.from_dict(kv.value) if kv else None
        if record is None or not (record.options or {}).get(RETIRED) or self.endpoints_of(name):
            return
        if self.ds.txn([mod_is(kv.key, kv.mod_revision)], [delete_op(kv.key)]).succeeded:
            LOG.info("event=docker.network.unrecorded name=%s retired=true", name)

    def get(self, network_id):
        """The network with its name resolved and its record ensured (reads dockerd when not yet known)."""
        with self._lock:
            net = self._nets.get(network_id)
        if net is None or net.name is None:
            net = self._resolve(network_id, net)
        if not net.recorded:
            self.ensure_record(net)
        return net

    # --- names ----------------------------------------------------------------------------------------------------

    def _resolve_soon(self, network_id, attempts=40, delay=0.25):
        """Background, after CreateNetwork: wait (bounded) until dockerd has stored the network, then record it."""
        for _ in range(attempts):
            time.sleep(delay)
            with self._lock:
                net = self._nets.get(network_id)
            if net is None:
                return  # deleted meanwhile
            if net.name is not None and net.recorded:
                return
            try:
                self.get(network_id)
                return
            except NotInDocker:
                continue
            except NetpluginError as e:
                LOG.warning("event=docker.network.unresolved id=%s error=%s", network_id[:12], e.msg)
                return

    def _resolve(self, network_id, known):
        if self.api is None:
            net = known or self._from_record(network_id)
            net.name = net.name or network_id
            with self._lock:
                self._nets.setdefault(network_id, net)
            return net
        try:
            info = self.api.network(network_id)
        except NotInDocker:
            if known is None:
                raise
            raise NotInDocker(f"dockerd does not know network {network_id[:12]} yet") from None
        except DockerApiError as e:
            if known is None:
                raise InvalidInput(
                    f"network {network_id[:12]} is not known to this agent and dockerd cannot be "
                    f"asked about it: {e.msg}"
                ) from None
            LOG.warning("event=docker.network.unnamed id=%s error=%s", network_id[:12], e.msg)
            known.name = network_id
            return known
        net = known or DockerNetwork(id=network_id)
        net.name = info.get("Name") or network_id
        net.labels = {str(k): str(v) for k, v in (info.get("Labels") or {}).items()}
        if known is None:
            net.options = {str(k): str(v) for k, v in (info.get("Options") or {}).items()}
        ipam = info.get("IPAM") or {}
        configs = ipam.get("Config") or []
        if known is None:
            net.subnets = [c["Subnet"] for c in configs if c.get("Subnet")]
            net.gateways = [c["Gateway"] for c in configs if c.get("Gateway")]
        net.ip_ranges = [c["IPRange"] for c in configs if c.get("IPRange")]
        with self._lock:
            self._nets[network_id] = net
        LOG.info("event=docker.network.resolved id=%s name=%s", network_id[:12], net.name)
        return net

    def _from_record(self, network_id):
        """A network this agent created before it restarted, read back from its record (no dockerd to ask)."""
        net = self._recorded(network_id, retired=False)
        if net is None:
            raise NotFound(
                f"network {network_id[:12]} is unknown to this agent and has no netplugin record: was it "
                "created with docker network create -d netplugin --ipam-driver netplugin?"
            )
        LOG.info("event=docker.network.restored id=%s subnets=%s", network_id[:12], ",".join(net.subnets))
        return net

    def _recorded(self, network_id, retired=True):
        """The network whose record names Docker network ``network_id`` (None: no record does, or only a retired
        one and ``retired`` is False)."""
        record = next(
            (
                r
                for r in (Network.from_dict(kv.value) for kv in self.ds.list(keys.NETWORKS))
                if r.docker_id == network_id and (retired or not (r.options or {}).get(RETIRED))
            ),
            None,
        )
        if record is None:
            return None
        opts = record.options or {}
        net = DockerNetwork(
            id=network_id,
            name=record.name,
            labels=dict(record.labels or {}),
            recorded=True,
            options={k: v for k, v in opts.items() if not k.startswith(RECORD_PREFIX)},
        )
        net.subnets = [s for s in opts.get(RECORD_PREFIX + "subnets", "").split(",") if s]
        net.gateways = [g for g in opts.get(RECORD_PREFIX + "gateways", "").split(",") if g]
        net.ip_ranges = [r for r in (record.ip_range, opts.get(RECORD_PREFIX + "ip-range6")) if r]
        return net

    # --- records --------------------------------------------------------------------------------------------------

    def record_of(self, net):
        pools = [p.cidr for p in self.ipam.list_pools()]
        placed, ranges = [], []
        for subnet in net.subnets:
            pool, _ = place_subnet(subnet, pools)
            placed.append(pool)
            rng = next(
                (r for r in net.ip_ranges if parse_cidr(r, "ip range").version == parse_cidr(subnet, "subnet").version),
                None,
            )
            ranges.append(rng or (subnet if subnet != pool else None))
        options = dict(net.options)
        options[RECORD_PREFIX + "subnets"] = ",".join(net.subnets)
        if net.gateways:
            options[RECORD_PREFIX + "gateways"] = ",".join(net.gateways)
        v6_range = next((r for r, s in zip(ranges, net.subnets) if r and ":" in s), None)
        if v6_range:
            options[RECORD_PREFIX + "ip-range6"] = v6_range
        v4_range = next((r for r, s in zip(ranges, net.subnets) if r and ":" not in s), None)
        return Network(
            name=net.name,
            pools=sorted(set(placed)),
            ip_range=v4_range,
            labels=dict(net.labels),
            options=options,
            docker_id=net.id,
        )

    def ensure_record(self, net):
        want = self.record_of(net)
        key = keys.network(net.name)
        for _ in range(10):
            kv = self.ds.get(key)
            if kv is None:
                if self.ds.create(key, want.to_dict()):
                    LOG.info("event=docker.network.recorded name=%s pools=%s", net.name, ",".join(want.pools))
                    break
                continue
            have = Network.from_dict(kv.value)
            same = sorted(have.pools) == sorted(want.pools) and have.ip_range == want.ip_range
            if same and not (have.options or {}).get(RETIRED):
                break  # the same network, written by this host earlier or by another host
            users = [] if same else self.endpoints_of(net.name)  # (same but retired: created again, rewrite)
            if users:
                raise InvalidInput(
                    f"network {net.name} already exists in netplugin with pool(s) {', '.join(have.pools) or 'any'}"
                    f"{' range ' + have.ip_range if have.ip_range else ''} (Docker network {str(have.docker_id)[:12]}"
                    f", {len(users)} endpoint(s)); create it with the same --subnet/--ip-range on every host"
                )
            if self.ds.txn([mod_is(key, kv.mod_revision)], [put_op(key, want.to_dict())]).succeeded:
                LOG.info("event=docker.network.recorded name=%s replaced_stale=true", net.name)
                break
        else:
            raise Conflict(f"network record {net.name} kept changing; try again")
        net.recorded = True

    def subnets_of(self, name):
        """Docker subnets of the network called ``name`` (this host's cache, else its Network record)."""
        with self._lock:
            for net in self._nets.values():
                if net.name == name:
                    return list(net.subnets)
        kv = self.ds.get(keys.network(name))
        raw = (Network.from_dict(kv.value).options or {}).get(RECORD_PREFIX + "subnets", "") if kv else ""
        return [s for s in raw.split(",") if s]

    def endpoints_of(self, name):
        return [ep for ep in (ep for _, ep in Endpoint.from_kvs(self.ds.list(keys.ENDPOINTS))) if ep.network == name]

    def delete_record(self, net):
        """Delete the record this Docker network wrote, unless an endpoint on any host still uses the name."""
        kv = self._own_record(net)
        if kv is None or self.endpoints_of(net.name):
            return False
        key = kv.key
        deleted = self.ds.txn([mod_is(key, kv.mod_revision)], [delete_op(key)]).succeeded
        if deleted:
            LOG.info("event=docker.network.unrecorded name=%s", net.name)
        return deleted

    def _own_record(self, net):
        """The KV of the record this Docker network wrote (None: no record, or another network's)."""
        if net is None or net.name is None:
            return None
        kv = self.ds.get(keys.network(net.name))
        return kv if kv is not None and Network.from_dict(kv.value).docker_id == net.id else None
