"""Typed records stored in etcd, one dataclass per resource, each with ``to_dict``/``from_dict``.

Unknown fields in stored documents are ignored on read so an older agent can read a newer record; a known field
of the wrong type, a missing required one, or a document that is not a JSON object raises BadRecord (saying
which), so a reader can skip that one record instead of failing later on a half-built object.
"""

import functools
import logging
import types
from dataclasses import MISSING, asdict, dataclass, field, fields

import netaddr

from netplugin.errors import InvalidInput

LOG = logging.getLogger(__name__)


class BadRecord(InvalidInput):
    """A stored document that is not a valid record of its kind (hand-written, truncated, another version)."""


@functools.cache
def _schema(cls):
    """{field name: (accepted types, required?)} of a record class, from its annotations."""
    out = {}
    for f in fields(cls):
        kinds = f.type.__args__ if isinstance(f.type, types.UnionType) else (f.type,)
        kinds = tuple(type(None) if k is None else k if isinstance(k, type) else object for k in kinds)
        if float in kinds:
            kinds += (int,)
        required = f.default is MISSING and f.default_factory is MISSING
        out[f.name] = (kinds, required)
    return out


AS_MAX = 4294967295


def check_as_number(value):
    """None means "the cluster's AS"; anything else must be a 4-byte AS number."""
    if value is not None and not 1 <= value <= AS_MAX:
        raise InvalidInput(f"AS number {value} is out of range 1..{AS_MAX}")
    return value


def check_ip(address, what):
    try:
        netaddr.IPAddress(address)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise InvalidInput(f"{what} {address!r} is not an IP address") from None
    return address


def check_pool_cidr(cidr):
    """A pool's CIDR, as a network with no host bits set."""
    try:
        net = netaddr.IPNetwork(cidr)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise InvalidInput(f"pool {cidr!r} is not a CIDR") from None
    if str(net.cidr) != str(net):
        raise InvalidInput(f"pool {cidr} has host bits set; did you mean {net.cidr}?")
    return net


class Record:
    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The record a stored document stands for; BadRecord (saying which field) when it is not one."""
        d = {} if d is None else d  # an empty value: every default
        if not isinstance(d, dict):
            raise BadRecord(f"not a JSON object but {type(d).__name__} {str(d)[:40]!r}")
        schema = _schema(cls)
        for name, (kinds, required) in schema.items():
            if name not in d:
                if required:
                    raise BadRecord(f"{cls.__name__} record has no {name!r}")
            elif not isinstance(d[name], kinds):
                raise BadRecord(
                    f"{cls.__name__} field {name!r} is {type(d[name]).__name__} "
                    f"{str(d[name])[:40]!r}, not {'/'.join(k.__name__ for k in kinds)}"
                )
        try:
            return cls(**{k: v for k, v in d.items() if k in schema}).check()
        except BadRecord:
            raise
        except InvalidInput as e:
            raise BadRecord(f"{cls.__name__} record: {e.msg}") from None
        except (TypeError, ValueError, AttributeError, netaddr.AddrFormatError) as e:
            raise BadRecord(f"{cls.__name__} record: {e}") from None

    def check(self):
        """Deeper checks of one kind of record (values, not only types); returns self."""
        return self

    @classmethod
    def from_kvs(cls, kvs):
        """[(kv, record)] of the KVs that decode, in order. A bad record is left out (at DEBUG here: the agent's
        view reports each one once, and ``netctl check`` lists them), so one stray key never fails a listing."""
        out = []
        for kv in kvs:
            try:
                out.append((kv, cls.from_dict(kv.value)))
            except BadRecord as e:
                LOG.debug("event=record.skipped key=%s revision=%s error=%s", kv.key, kv.mod_revision, e)
        return out


@dataclass
class ClusterConfig(Record):
    as_number: int = 64512
    mesh: bool = True
    reclaim_grace: float = 600.0


@dataclass
class Node(Record):
    name: str
    address: str | None = None  # the node's IPv4 address for BGP and direct routes
    address6: str | None = None
    as_number: int | None = None  # None: the cluster's AS
    labels: dict = field(default_factory=dict)
    route_reflector: bool = False
    address_autodetected: bool = False

    def set_address(self, address):
        """An operator's BGP address: it overrides autodetection."""
        self.address, self.address_autodetected = check_ip(address, "node address"), False


@dataclass
class BgpPeer(Record):
    name: str
    address: str
    as_number: int
    node: str | None = None  # None: every node peers with it
    password: str | None = None

    def validate(self):
        check_ip(self.address, "peer address")
        check_as_number(self.as_number)
        if not self.name or "/" in self.name:
            raise InvalidInput(f"invalid peer name {self.name!r}")
        return self


@dataclass
class Pool(Record):
    cidr: str
    block_size: int  # prefix length of the blocks cut from the pool
    nat_outgoing: bool = False
    disabled: bool = False

    @property
    def network(self):
        return netaddr.IPNetwork(self.cidr)

    @property
    def version(self):
        return self.network.version

    def check(self):
        return self.validate()

    def validate(self):
        net = check_pool_cidr(self.cidr)
        maxlen = 32 if net.version == 4 else 128
        if not (net.prefixlen <= self.block_size <= maxlen):
            raise InvalidInput(
                f"block size /{self.block_size} does not fit pool {self.cidr} (must be /{net.prefixlen}../{maxlen})"
            )
        if self.block_size < maxlen - 12:
            raise InvalidInput(f"block size /{self.block_size} is too large (at most 4096 addresses per block)")
        return self


@dataclass(frozen=True)
class Allocation(Record):
    handle: str
    host: str
    seq: int  # ABA guard: a stale release naming an older seq never frees a reused address


@dataclass
class Block(Record):
    """One block of a pool. ``allocations`` maps the address's ordinal in the block (as a string key) to who
    holds it. ``affinity`` is the host that claimed it (None once its host was reclaimed but borrowers remain)."""

    cidr: str
    pool: str
    affinity: str | None = None
    allocations: dict = field(default_factory=dict)
    next_seq: int = 1

    def __post_init__(self):
        self.allocations = {
            str(k): (v if isinstance(v, Allocation) else Allocation.from_dict(v)) for k, v in self.allocations.items()
        }

    def to_dict(self):
        # Hand-written: blocks are (de)serialised on every allocation and dataclasses.asdict deep-copies.
        allocs = {
            k: {"handle": a.handle, "host": a.host, "seq": a.seq}
            for k, a in sorted(self.allocations.items(), key=lambda kv: int(kv[0]))
        }
        return {
            "cidr": self.cidr,
            "pool": self.pool,
            "affinity": self.affinity,
            "allocations": allocs,
            "next_seq": self.next_seq,
        }

    def copy(self):
        return Block(
            cidr=self.cidr,
            pool=self.pool,
            affinity=self.affinity,
            allocations=dict(self.allocations),
            next_seq=self.next_seq,
        )

    @property
    def network(self):
        return netaddr.IPNetwork(self.cidr)

    @property
    def size(self):
        return self.network.size

    def ordinal(self, address):
        return int(netaddr.IPAddress(address)) - self.network.first

    def address(self, ordinal):
        return str(netaddr.IPAddress(self.network.first + int(ordinal), self.network.version))

    def free_count(self):
        return self.size - len(self.allocations)


@dataclass
class Handle(Record):
    """Everything one owner (container + interface) holds: released all at once, idempotently."""

    handle: str
    host: str
    addresses: dict = field(default_factory=dict)  # address -> {"block": cidr, "seq": n}
    attrs: dict = field(default_factory=dict)


@dataclass
class Network(Record):
    name: str
    pools: list = field(default_factory=list)  # pool CIDRs the network allocates from (empty: any pool)
    ip_range: str | None = None
    labels: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    docker_id: str | None = None


@dataclass
class Endpoint(Record):
    id: str
    host: str
    network: str
    container_id: str
    netns: str
    ifname: str
    host_ifname: str
    addresses: list = field(default_factory=list)  # CIDRs (/32, /128)
    mac: str | None = None
    labels: dict = field(default_factory=dict)
    handle: str | None = None
    orchestrator: str = "cni"  # cni | docker
    mtu: int | None = None  # asked for by the network (CNI config, Docker -o); None: the agent's --mtu

    def check(self):
        for a in self.addresses:
            if not isinstance(a, str):
                raise BadRecord(f"endpoint {self.id} address {a!r} is not a CIDR")
            netaddr.IPNetwork(a)
        return self
