"""rtnetlink sockets bound to a network namespace, without this process's threads ever entering it.

Namespaces are per thread, and a socket stays in the namespace it was created in. To talk to another
namespace we create the socket on a *throwaway thread* that calls setns(2) and then exits; the socket is
handed back. No long-lived thread (the agent's main thread, a web-server worker, the test's thread) ever
changes namespace. (pyroute2's ``IPRoute(netns=...)`` does the same in a forked child: about 8 ms per handle
here, and forking a threaded process; the thread costs about 0.1 ms.)

A namespace path that does not exist is an error: we never create one (pyroute2 would, by default) and never
fall back to the namespace the process happens to be in. A path that is not a network namespace (an nsfs inode
such as ``/run/netns/NAME`` or ``/proc/PID/ns/net``) is refused before it is opened: the runtime's CNI_NETNS and
Docker's SandboxKey are opened as root, and opening some device files has effects (``/dev/watchdog`` arms it).
Every open of a container's namespace comes here (CNI ADD/DEL/CHECK, the reconciler recreating a lost veth).
Docker's Join does not open the sandbox (libnetwork moves the interface itself, and dockerd may hold the
namespace in a mount namespace of its own, where our view of the path is an empty file), so a SandboxKey is
checked here when something first opens it.
"""
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import socket
import stat
import threading
from contextlib import contextmanager

from netplugin.errors import AlreadyExists, DataplaneError, InvalidInput, NotFound
from netplugin.dataplane.rtnl import Netlink

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
NSFS_MAGIC = 0x6E736673  # statfs f_type of namespace files
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace fd: its CLONE_NEW* type (Linux 4.11)
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


def _fs_type(path_or_fd) -> int:
    """statfs(2)/fstatfs(2) f_type (Python has no os.statfs). f_type is the first member of struct statfs."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if isinstance(path_or_fd, int):
        rc = _libc.fstatfs(path_or_fd, buf)
    else:
        rc = _libc.statfs(os.fsencode(path_or_fd), buf)
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _not_a_netns(path: str, why: str) -> InvalidInput:
    return InvalidInput(f"netns '{path}' is not a network namespace ({why}); expected a namespace file such as "
                        "/run/netns/NAME or /proc/PID/ns/net")


def open_netns(path: str) -> int:
    """An fd for a network namespace path; missing paths are NotFound (never created), anything that is not a
    network namespace InvalidInput. Checked before opening (stat, statfs), then again on the fd (fstatfs and the
    namespace type), so a path swapped in between is caught too."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidInput(f"netns {path!r} must be an absolute path such as /run/netns/NAME")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or _fs_type(path) != NSFS_MAGIC:
            raise _not_a_netns(path, "not an nsfs file")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise kernel_error(f"open netns '{path}'", e) from None
    try:
        if _fs_type(fd) != NSFS_MAGIC:
            raise _not_a_netns(path, "not an nsfs file")
        if fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET:
            raise _not_a_netns(path, "a namespace of another kind")
    except OSError as e:
        os.close(fd)
        raise kernel_error(f"check netns '{path}'", e) from None
    except InvalidInput:
        os.close(fd)
        raise
    return fd


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
