"""What the kernel of a test "host" namespace holds for our veths, read the way the reconciler reads it."""

from netplugin.dataplane import host, sysctl
from netplugin.kernel.netlink import netlink
from netplugin.kernel.rtnl import IFF_UP


def host_veths(host_netns) -> dict:
    """host ifname -> its index, peer index, MAC, MTU, up, our routes and its sysctls (dotted names)."""
    with netlink(host_netns) as hnl:
        view = host.snapshot(hnl)
    out = {}
    for name, msg in sorted(view.links.items()):
        idx = msg["index"]
        out[name] = {
            "ifindex": idx,
            "peer_ifindex": msg.get("link"),
            "mac": msg.get("address"),
            "mtu": msg.get("mtu"),
            "up": bool(msg["flags"] & IFF_UP),
            "routes": sorted(str(r) for r in view.routes.get(idx, ())),
            "sysctls": {k.replace("/", "."): v for k, v in sysctl.link_sysctls(msg, view.proxy_delay.get(idx)).items()},
        }
    return out
