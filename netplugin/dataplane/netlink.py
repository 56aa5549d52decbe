"""rtnetlink sockets bound to a network namespace, without this process's threads ever entering it.

Namespaces are per thread, and a socket stays in the namespace it was created in. To talk to another
namespace we create the socket on a *throwaway thread* that calls setns(2) and then exits; the socket is
handed back. No long-lived thread (the agent's main thread, a web-server worker, the test's thread) ever
changes namespace. (pyroute2's ``IPRoute(netns=...)`` does the same in a forked child: about 8 ms per handle
here, and forking a threaded process; the thread costs about 0.1 ms.)

A namespace path that does not exist is an error: we never create one (pyroute2 would, by default) and never
fall back to the namespace the process happens to be in.
"""
import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import threading
from contextlib import contextmanager

from netplugin.errors import AlreadyExists, DataplaneError, NotFound
from netplugin.dataplane.rtnl import Netlink

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

_ERRNO_CLASS = {errno.ENODEV: NotFound, errno.ENOENT: NotFound, errno.EEXIST: AlreadyExists}


def kernel_error(action: str, err: OSError) -> Exception:
    """``failed to <action>: <strerror>`` as the matching netplugin error."""
    code = err.errno or 0
    reason = os.strerror(code) if code else str(err)
    return _ERRNO_CLASS.get(code, DataplaneError)(f"failed to {action}: {reason}")


def quietly(fn, *args):
    """Run an undo step; its failure is logged, never raised, so the error that made us undo propagates."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        log.warning("undo step %s failed: %s", getattr(fn, "__name__", fn), e)


def open_netns(path: str) -> int:
    """An fd for a namespace path; missing paths are NotFound, never created."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise kernel_error(f"open netns '{path}'", e) from None


def _new_socket():
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


def socket_in_netns(fd: int, path: str) -> socket.socket:
    result = {}

    def enter_and_open():
        # Runs on its own short-lived thread: setns only affects this thread, which exits right after.
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            result["errno"] = ctypes.get_errno()
            return
        try:
            result["sock"] = _new_socket()
        except OSError as e:
            result["errno"] = e.errno

    worker = threading.Thread(target=enter_and_open, name="netplugin-netns-socket", daemon=True)
    worker.start()
    worker.join()
    if "sock" not in result:
        code = result.get("errno", errno.EIO)
        hint = " (not a network namespace?)" if code == errno.EINVAL else ""
        raise DataplaneError(f"failed to enter netns '{path}': {os.strerror(code)}{hint}")
    return result["sock"]


@contextmanager
def netlink_fd(fd: int, path: str):
    """A Netlink handle inside the namespace behind an already opened fd."""
    nl = Netlink(socket_in_netns(fd, path), f"netns '{path}'")
    try:
        yield nl
    finally:
        nl.close()


@contextmanager
def netlink(netns: str | None):
    """A Netlink handle in ``netns`` (a path), or in this process's own namespace when ``netns`` is None."""
    if netns is None:
        nl = Netlink(_new_socket(), "the host netns")
        try:
            yield nl
        finally:
            nl.close()
        return
    fd = open_netns(netns)
    try:
        with netlink_fd(fd, netns) as nl:
            yield nl
    finally:
        os.close(fd)
