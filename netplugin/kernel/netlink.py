"""Netlink handles bound to a network namespace, opened in ``with`` blocks.

The socket is made inside the namespace by ``netns.in_netns`` (a throwaway thread), so no thread of ours ever
changes namespace; see netns.py. Every open of a container's namespace comes here (CNI ADD/DEL/CHECK, the
reconciler recreating a lost veth, direct routes, BIRD's left-over routes). Docker's Join does not open the
sandbox (libnetwork moves the interface itself, and dockerd may hold the namespace in a mount namespace of its
own, where our view of the path is an empty file), so a SandboxKey is checked when something first opens it.
"""

import os
import socket
from contextlib import contextmanager

from netplugin.kernel.netns import in_netns, netns_path, open_netns
from netplugin.kernel.rtnl import Netlink

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12  # ctnetlink (netplugin.kernel.conntrack)


def _new_socket(protocol=NETLINK_ROUTE):
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)


@contextmanager
def netlink_fd(fd: int, path: str, protocol=NETLINK_ROUTE):
    """A Netlink handle inside the namespace behind an already opened fd."""
    nl = Netlink(in_netns(fd, path, lambda: _new_socket(protocol)), f"netns '{path}'")
    try:
        yield nl
    finally:
        nl.close()


@contextmanager
def netlink(netns: str | None, protocol=NETLINK_ROUTE):
    """A Netlink handle in ``netns`` (a path, or a bare name under /run/netns), or in this process's own
    namespace when ``netns`` is None; ``protocol`` NETLINK_ROUTE, or NETLINK_NETFILTER for conntrack."""
    if netns is None:
        nl = Netlink(_new_socket(protocol), "the host netns")
        try:
            yield nl
        finally:
            nl.close()
        return
    path = netns_path(netns)
    fd = open_netns(path)
    try:
        with netlink_fd(fd, path, protocol) as nl:
            yield nl
    finally:
        os.close(fd)
