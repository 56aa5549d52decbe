"""Per-interface kernel settings of a host veth: what it must have, what it has, and how to write them.

Reading needs no child process: the kernel reports every per-interface value in the link message
(IFLA_AF_SPEC), and ARP's proxy_delay in the neighbour-table dump. Writing goes by netlink where the kernel
accepts it (IPv4 devconf via IFLA_INET_CONF, proxy_delay via RTM_SETNEIGHTBL: see host.py), so an IPv4-only
endpoint needs no child at all. IPv6 devconf cannot be set by netlink; those keys go through /proc/sys.

/proc/sys/net shows the namespace of the thread that opens it, so a namespace given by path is written from
one short-lived child (``nsenter --net=PATH sysctl -w k=v ...``, one child per batch). With no path the files
are written directly: that is this process's own namespace and no thread of ours ever changes it.

Keys use the slash form (``net/ipv4/conf/<ifname>/rp_filter``) so interface names containing dots are safe.
"""

from netplugin.errors import DataplaneError
from netplugin.kernel.netns import NamespaceCommand

# Values every host veth gets. IPv4 always (proxy-ARP gateway, strict reverse-path filter as the IPv4
# anti-spoofing, forwarding, arp_ignore 0 so the veth answers ARP for its gateway address whatever
# conf/default says: see host.py); IPv6 only for endpoints with IPv6 addresses (the family may be disabled).
V4_CONF = {"forwarding": 1, "proxy_arp": 1, "rp_filter": 1, "arp_ignore": 0}
V6_CONF = {"forwarding": 1, "proxy_ndp": 1}
PROXY_DELAY = 0
# Host-wide IPv6 forwarding, written only once an IPv6 pool is in use. With forwarding on, an interface with
# accept_ra=1 ignores router advertisements (its RA-learned default route expires); accept_ra=2 keeps them.
ALL_FORWARDING_V6 = "net/ipv6/conf/all/forwarding"
ACCEPT_RA = "accept_ra"
RA_WHEN_FORWARDING = 2


def conf_key(family: int, ifname: str, name: str) -> str:
    return f"net/ipv{family}/conf/{ifname}/{name}"


def neigh_key(ifname: str, name: str) -> str:
    return f"net/ipv4/neigh/{ifname}/{name}"


def desired_host_sysctls(ifname: str, ipv6: bool) -> dict:
    """All settings one host veth must carry, keyed like /proc/sys."""
    want = {conf_key(4, ifname, k): v for k, v in V4_CONF.items()}
    want[neigh_key(ifname, "proxy_delay")] = PROXY_DELAY
    if ipv6:
        want.update({conf_key(6, ifname, k): v for k, v in V6_CONF.items()})
    return want


def link_sysctls(msg, proxy_delay=None) -> dict:
    """The values the kernel reports for a link, keyed like ``desired_host_sysctls``."""
    ifname = msg.get("ifname")
    have = {}
    spec = msg.get("af_spec")
    if spec:
        v4 = spec.get("AF_INET")
        if v4:
            for k in V4_CONF:
                have[conf_key(4, ifname, k)] = v4.get(k)
        v6 = spec.get("AF_INET6")
        conf6 = v6.get("IFLA_INET6_CONF") if v6 else None
        if conf6:
            for k in V6_CONF:
                have[conf_key(6, ifname, k)] = conf6.get(k)
    if proxy_delay is not None:
        have[neigh_key(ifname, "proxy_delay")] = proxy_delay
    return have


def link_conf6(msg, name: str):
    """One IPv6 devconf value of a link as the kernel reports it, None when it has no IPv6."""
    spec = msg.get("af_spec")
    v6 = spec.get("AF_INET6") if spec else None
    conf6 = v6.get("IFLA_INET6_CONF") if v6 else None
    return conf6.get(name) if conf6 else None


def keep_accepting_ra(links, skip) -> dict:
    """accept_ra=2 for every interface that accepts router advertisements now (accept_ra=1), so that turning
    IPv6 forwarding on does not make it stop; ``skip(msg)`` names interfaces to leave alone (our veths: a
    container must never configure the host by RA)."""
    out = {}
    for msg in links:
        name = msg.get("ifname")
        if name and name != "lo" and not skip(msg) and link_conf6(msg, ACCEPT_RA) == 1:
            out[conf_key(6, name, ACCEPT_RA)] = RA_WHEN_FORWARDING
    return out


def drift(want: dict, have: dict, skip_unknown=()) -> dict:
    """The subset of ``want`` the kernel does not already have. Keys in ``skip_unknown`` count as fine when
    the kernel did not report them (proxy_delay is only read when it is worth a neighbour-table dump)."""
    return {k: v for k, v in want.items() if have.get(k) != v and not (k in skip_unknown and k not in have)}


def write(netns: str | None, values: dict, action: str) -> None:
    """Write ``values`` in one go: directly in our own namespace, else one ``nsenter ... sysctl`` child."""
    if not values:
        return
    if netns is None:
        for key, value in values.items():
            try:
                with open(f"/proc/sys/{key}", "w") as f:
                    f.write(f"{value}\n")
            except OSError as e:
                raise DataplaneError(f"failed to {action}: cannot set {key}: {e.strerror}") from None
        return
    ns = NamespaceCommand(netns, allow_host_namespace=True, timeout=20)
    ns.run(["sysctl", "-q", "-w"] + [f"{k}={v}" for k, v in values.items()], what=action)


def read(netns: str | None, keys: list, action: str) -> dict:
    """Read a few host-wide sysctls (the link message does not carry "all" and "default")."""
    if netns is None:
        out = {}
        for key in keys:
            try:
                with open(f"/proc/sys/{key}") as f:
                    out[key] = f.read().strip()
            except OSError as e:
                raise DataplaneError(f"failed to {action}: cannot read {key}: {e.strerror}") from None
        return out
    ns = NamespaceCommand(netns, allow_host_namespace=True, timeout=20)
    lines = ns.run(["sysctl", "-n"] + list(keys), what=action).stdout.splitlines()
    if len(lines) != len(keys):
        raise DataplaneError(f"failed to {action}: sysctl printed {len(lines)} values for {len(keys)} keys")
    return dict(zip(keys, (line.strip() for line in lines)))
