"""What a lab is made of, decided before anything is made: pure, so a bad request fails before any side effect.

Topology. Each rack is one L2 segment: a bridge ``br0`` in a rack namespace, the rack's hosts linked to it by a
veth (``eth0`` in the host). With one rack the hosts are all the fabric there is: BGP runs as a node-to-node
mesh or through route reflectors, or ``direct`` mode programs routes with no BGP at all. With several racks a
router namespace joins them (one interface per rack, forwarding on) and runs its own BIRD as the racks'
top-of-rack/spine router; the mesh is off and every host peers only with it over eBGP.

AS numbers with racks: each host has its own AS, 65000 + 100 * rack + index in the rack (rack 2's third host is
65203), the router is AS 65000. A per-rack AS would make a host drop its rack neighbours' routes when the router
hands them back (its own AS in the path) unless BIRD ran with ``allow local as``, which the agent's renderer
does not emit; one AS per host (Calico's "AS per compute server") needs nothing special and still keeps traffic
inside a rack on the rack's segment (BIRD keeps a next hop that is on the peer's subnet).

Addresses: rack r is 192.168.r.0/24, its router 192.168.r.1, its hosts 192.168.r.11 onwards. Containers get
addresses from the pool (10.244.0.0/16 unless told otherwise), which must not overlap the fabric.
"""

import ipaddress
import os
import re
from dataclasses import dataclass, field

from netplugin.errors import InvalidInput

STATE_ROOT = "/run/netplugin-lab"  # state file, agents' run dirs, logs; one directory per lab
SHM_ROOT = "/dev/shm"  # etcd's data: fsync on tmpfs is free
NS_PREFIX = "lab-"  # every namespace a lab makes starts with lab-<name>-, so nothing else is ever touched
FABRIC = ipaddress.ip_network("192.168.0.0/16")
DEFAULT_POOL = "10.244.0.0/16"
ROUTER_AS = 65000
FIRST_HOST_OCTET = 11
MAX_HOSTS_PER_RACK = 240
MAX_HOSTS = 250
MAX_RACKS = 20
DATAPLANES = ("iptables", "bpf")

_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_CONTAINER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


def check_lab_name(name):
    if not isinstance(name, str) or not _LAB_NAME.match(name):
        raise InvalidInput(f"invalid lab name {name!r}: 1-12 lower-case letters and digits, starting with a letter")
    return name


def check_container_name(name):
    if not isinstance(name, str) or not _CONTAINER_NAME.match(name):
        raise InvalidInput(
            f"invalid container name {name!r}: up to 32 of a-z 0-9 _ . -, starting with a letter or digit"
        )
    return name


def _int(what, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"invalid {what} {value!r}: must be a whole number from {low} to {high}")
    return value


@dataclass(frozen=True)
class LabSpec:
    """What the operator asked for; validated on construction."""

    name: str = "demo"
    hosts: int = 3
    racks: int = 1
    etcd_members: int = 1
    routing: str = "bgp"  # bgp | direct
    route_reflectors: int = 0
    pool: str = DEFAULT_POOL
    dataplane: str = "iptables"  # iptables | bpf: the agents' --dataplane (bpf pins under the lab's own bpffs)

    def __post_init__(self):
        check_lab_name(self.name)
        _int("number of hosts", self.hosts, 1, MAX_HOSTS)
        _int("number of racks", self.racks, 1, MAX_RACKS)
        if self.racks > self.hosts:
            raise InvalidInput(f"{self.racks} racks need at least as many hosts (got {self.hosts})")
        if -(-self.hosts // self.racks) > MAX_HOSTS_PER_RACK:
            raise InvalidInput(f"at most {MAX_HOSTS_PER_RACK} hosts fit in one rack's /24")
        if self.etcd_members not in (1, 3):
            raise InvalidInput(f"invalid number of etcd members {self.etcd_members!r}: 1 or 3")
        if self.routing not in ("bgp", "direct"):
            raise InvalidInput(f"invalid routing mode {self.routing!r}: bgp or direct")
        _int("number of route reflectors", self.route_reflectors, 0, self.hosts)
        if self.routing == "direct" and self.racks > 1:
            raise InvalidInput("direct routing needs every host on one L2 segment: use --racks 1 or --routing bgp")
        if self.routing == "direct" and self.route_reflectors:
            raise InvalidInput("route reflectors need --routing bgp")
        if self.racks > 1 and self.route_reflectors:
            raise InvalidInput(
                "route reflectors with several racks are not supported: hosts peer with the rack "
                "router there (sessions are one hop, so a reflector cannot reach other racks)"
            )
        if self.dataplane not in DATAPLANES:
            raise InvalidInput(f"invalid dataplane {self.dataplane!r}: {' or '.join(DATAPLANES)}")
        try:
            pool = ipaddress.ip_network(self.pool, strict=True)
        except ValueError as e:
            raise InvalidInput(f"invalid pool {self.pool!r}: {e}") from None
        if pool.version != 4 or pool.overlaps(FABRIC):
            raise InvalidInput(f"pool {self.pool} must be IPv4 and outside the lab fabric {FABRIC}")

    @property
    def bgp_mode(self):
        """How routes travel, in words, for the operator."""
        if self.routing == "direct":
            return "direct routes (no BGP)"
        if self.racks > 1:
            return "eBGP to the rack router (mesh off)"
        if self.route_reflectors:
            return f"{self.route_reflectors} route reflector(s) (mesh off)"
        return "node-to-node mesh"

    @property
    def mesh(self):
        return self.routing == "bgp" and self.racks == 1 and not self.route_reflectors

    def to_dict(self):
        return {
            "name": self.name,
            "hosts": self.hosts,
            "racks": self.racks,
            "etcd_members": self.etcd_members,
            "routing": self.routing,
            "route_reflectors": self.route_reflectors,
            "pool": self.pool,
            "dataplane": self.dataplane,
        }


@dataclass(frozen=True)
class HostPlan:
    name: str  # node name in etcd: h1, h2, ...
    rack: int
    namespace: str
    address: str  # on the rack segment, /24
    port: str  # the veth's name in the rack namespace
    as_number: int | None  # None: the cluster's AS
    route_reflector: bool
    run_dir: str
    gateway: str | None  # the rack router, when there is one

    @property
    def agent_socket(self):
        return os.path.join(self.run_dir, "agent.sock")

    @property
    def bird_socket(self):
        return os.path.join(self.run_dir, "bird", "bird.ctl")

    @property
    def conf_dir(self):
        return os.path.join(self.run_dir, "net.d")


@dataclass(frozen=True)
class RackPlan:
    index: int
    namespace: str
    subnet: str


@dataclass(frozen=True)
class RouterPlan:
    namespace: str
    as_number: int
    router_id: str
    interfaces: tuple  # (rack index, ifname, address/24)
    run_dir: str


@dataclass(frozen=True)
class LabPlan:
    spec: LabSpec
    state_dir: str
    etcd_dir: str
    racks: tuple
    hosts: tuple
    router: RouterPlan | None = None
    extra: dict = field(default_factory=dict)

    def host(self, name):
        for h in self.hosts:
            if h.name == name:
                return h
        raise InvalidInput(
            f"lab {self.spec.name} has no host {name!r} (hosts: {', '.join(h.name for h in self.hosts)})"
        )

    def container_namespace(self, container):
        return f"{NS_PREFIX}{self.spec.name}-c-{check_container_name(container)}"

    @property
    def ns_prefix(self):
        return ns_prefix(self.spec.name)

    @property
    def cni_bin_dir(self):
        return os.path.join(self.state_dir, "cni", "bin")

    @property
    def bpffs(self):
        """The lab's own bpf filesystem (mounted only with ``dataplane`` bpf): never the host's /sys/fs/bpf, so
        removing the lab removes every pin its agents made."""
        return os.path.join(self.state_dir, "bpffs")

    def host_bpffs(self, host):
        """Where ``host``'s agent pins its programs and maps (its ``--bpffs``)."""
        return os.path.join(self.bpffs, host.name)


def ns_prefix(name):
    return f"{NS_PREFIX}{check_lab_name(name)}-"


def state_dir(name):
    return os.path.join(STATE_ROOT, check_lab_name(name))


def make_plan(spec, state_root=STATE_ROOT, shm_root=SHM_ROOT):
    """The whole topology for ``spec``: names, addresses, AS numbers, directories."""
    sdir = os.path.join(state_root, spec.name)
    prefix = ns_prefix(spec.name)
    base, extra = divmod(spec.hosts, spec.racks)
    sizes = [base + (1 if r < extra else 0) for r in range(spec.racks)]
    with_router = spec.racks > 1
    racks, hosts, ifaces = [], [], []
    n = 0
    for r, size in enumerate(sizes, start=1):
        subnet = ipaddress.ip_network(f"192.168.{r}.0/24")
        racks.append(RackPlan(index=r, namespace=f"{prefix}rack{r}", subnet=str(subnet)))
        gateway = str(subnet[1]) if with_router else None
        if with_router:
            ifaces.append((r, f"rack{r}", f"{gateway}/24"))
        for i in range(1, size + 1):
            n += 1
            name = f"h{n}"
            hosts.append(
                HostPlan(
                    name=name,
                    rack=r,
                    namespace=f"{prefix}{name}",
                    address=str(subnet[FIRST_HOST_OCTET + i - 1]),
                    port=name,
                    as_number=(ROUTER_AS + 100 * r + i) if with_router else None,
                    route_reflector=n <= spec.route_reflectors,
                    run_dir=os.path.join(sdir, "hosts", name),
                    gateway=gateway,
                )
            )
    for h in hosts:
        if h.as_number is not None and h.as_number > 65534:
            raise InvalidInput(
                f"host {h.name} would get AS {h.as_number} (65000 + 100 * rack + index in rack), "
                "above the private 16-bit range: use fewer racks or fewer hosts per rack"
            )
    router = None
    if with_router:
        router = RouterPlan(
            namespace=f"{prefix}spine",
            as_number=ROUTER_AS,
            router_id=ifaces[0][2].split("/")[0],
            interfaces=tuple(ifaces),
            run_dir=os.path.join(sdir, "spine"),
        )
    return LabPlan(
        spec=spec,
        state_dir=sdir,
        etcd_dir=os.path.join(shm_root, f"netplugin-lab-{spec.name}"),
        racks=tuple(racks),
        hosts=tuple(hosts),
        router=router,
    )
