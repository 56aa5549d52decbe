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

from netplugin.errors import DataplaneError
from netplugin.kernel.netns import in_netns, netns_path, open_netns, start_in_netns
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
def netlink_fd_soon(fd: int, path: str):
    """``netlink_fd`` whose socket is made while the caller goes on: yields a function that returns the handle,
    waiting for it the first time. ADD creates the veth pair and wires the host side meanwhile; making the
    socket costs a thread, which on a busy agent took 2 ms of the dataplane's 4.5 (measured)."""
    wait = start_in_netns(fd, path, _new_socket)
    state = {}

    def get():
        if "nl" not in state:
            state["nl"] = None  # waited for: a failure is raised once, here
            state["nl"] = Netlink(wait(), f"netns '{path}'")
        return state["nl"]

    try:
        yield get
    finally:
        if "nl" not in state:
            try:
                wait().close()
            except DataplaneError:
                pass  # never used: its failure is nobody's concern
        elif state["nl"] is not None:
            state["nl"].close()


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
