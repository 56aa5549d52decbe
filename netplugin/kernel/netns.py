"""Entering a network namespace: the one way every part of the agent does it.

A namespace is named by a path (``/run/netns/NAME``, ``/proc/PID/ns/net``) or by a bare name under /run/netns.
Namespaces are per thread, so no long-lived thread of ours (the agent's main thread, a web-server worker, a
test's thread) ever calls setns(2). There are exactly two ways in:

- a command (iptables-restore, ipset, sysctl, bird) runs as a short-lived child under ``nsenter --net=PATH``;
  when the calling thread already is in the target namespace the child runs directly, one exec fewer;
- a socket (netlink) is created on a throwaway thread that calls setns and exits (``in_netns``); the socket
  stays in the namespace it was created in. pyroute2's ``IPRoute(netns=...)`` forks a child for this instead:
  about 8 ms per handle here, and forking a threaded process; the thread costs about 0.1 ms.

A namespace that does not exist is an error (NamespaceNotFound): we never create one and never fall back to the
namespace the process happens to be in. A path that is not a network namespace (an nsfs inode) is refused
before it is opened: the runtime's CNI_NETNS and Docker's SandboxKey are opened as root, and opening some device
files has effects (``/dev/watchdog`` arms it). The host's own namespace is refused by ``NamespaceCommand``
unless the caller says ``allow_host_namespace=True``: only code programming its real host passes that.
"""

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import re
import stat
import subprocess
import threading

from netplugin.errors import AlreadyExists, DataplaneError, InvalidInput, NamespaceNotFound, NotFound

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NSFS_MAGIC = 0x6E736673  # statfs f_type of namespace files
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace fd: its CLONE_NEW* type (Linux 4.11)
HOST_NETNS = ("/proc/self/ns/net", "/proc/1/ns/net")
_NS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
ERRNO_CLASS = {errno.ENODEV: NotFound, errno.ENOENT: NotFound, errno.EEXIST: AlreadyExists}  # else DataplaneError
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def kernel_error(action: str, err: OSError) -> Exception:
    """``failed to <action>: <strerror>`` as the matching netplugin error."""
    code = err.errno or 0
    reason = os.strerror(code) if code else str(err)
    return ERRNO_CLASS.get(code, DataplaneError)(f"failed to {action}: {reason}")


def netns_path(netns: str) -> str:
    """The namespace file for a path or a bare name under /run/netns; InvalidInput for anything else."""
    if not netns or not isinstance(netns, str):
        raise InvalidInput(
            "a kernel write needs a network namespace name or path; refusing to default to the current namespace"
        )
    if "/" in netns:
        return netns
    if not _NS_NAME.match(netns):
        raise InvalidInput(f"{netns!r} is not a valid network namespace name")
    return f"/run/netns/{netns}"


def missing(path: str) -> NamespaceNotFound:
    return NamespaceNotFound(f"failed to open netns '{path}': it does not exist")


def require(netns: str) -> str:
    """The namespace's path, checked to exist (else NamespaceNotFound, both a NotFound and a DataplaneError)."""
    path = netns_path(netns)
    if not os.path.exists(path):
        raise missing(path)
    return path


def own_netns() -> str:
    """This process's namespace as a path (its main thread's; for code that programs the host it runs in)."""
    return f"/proc/{os.getpid()}/ns/net"


def same_namespace(path: str, other_path: str) -> bool:
    try:
        a, b = os.stat(path), os.stat(other_path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def command_prefix(netns: str | None) -> list:
    """argv prefix that runs a program in ``netns`` (checked to exist); none for None (our own namespace) or
    when the calling thread is already there."""
    if netns is None:
        return []
    path = require(netns)
    if same_namespace("/proc/thread-self/ns/net", path):
        return []
    return ["nsenter", f"--net={path}", "--"]


class NamespaceCommand:
    """Runs commands inside one namespace, given once; every command is a child process (see the module)."""

    def __init__(self, netns, *, allow_host_namespace=False, timeout=60):
        self.path = require(netns)
        self.netns = netns
        self.timeout = timeout
        if not allow_host_namespace and any(same_namespace(self.path, p) for p in HOST_NETNS):
            raise DataplaneError(
                f"refusing to program policy in netns {netns!r}: it is the host's own network"
                " namespace (pass allow_host_namespace=True to mean it)"
            )

    def run(self, argv, input_text=None, check=True, what=None):
        """Run ``argv`` inside the namespace; returns CompletedProcess. ``what`` names the step in errors, as a
        verb phrase: "failed to <what> in netns NAME: <reason>"."""
        what = what or f"run {argv[0]}"
        cmd = command_prefix(self.path) + list(argv)
        log.debug("netns %s: %s", self.netns, " ".join(argv))
        try:
            proc = subprocess.run(cmd, input=input_text, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError as err:
            raise DataplaneError(f"failed to {what} in netns {self.netns}: {err.filename} is not installed") from None
        except subprocess.TimeoutExpired:
            raise DataplaneError(f"failed to {what} in netns {self.netns}: no answer in {self.timeout} s") from None
        if check and proc.returncode != 0:
            reason = first_line(proc.stderr) or first_line(proc.stdout) or "no message"
            raise DataplaneError(
                f"failed to {what} in netns {self.netns}: {reason} (exit {proc.returncode})", details=proc.stderr
            )
        return proc


def first_line(text):
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


# --- sockets: a throwaway thread enters the namespace ------------------------------------------------------


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
    return InvalidInput(
        f"netns '{path}' is not a network namespace ({why}); expected a namespace file such as "
        "/run/netns/NAME or /proc/PID/ns/net"
    )


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
        raise (missing(path) if e.errno == errno.ENOENT else kernel_error(f"open netns '{path}'", e)) from None
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


def in_netns(fd: int, path: str, make):
    """``make()`` called on a short-lived thread inside the namespace behind ``fd``; returns its result (a
    socket: it stays in that namespace). setns only affects that thread, which exits right after."""
    return start_in_netns(fd, path, make)()


def start_in_netns(fd: int, path: str, make):
    """``in_netns`` without waiting: the thread starts now; the function returned waits for it and returns
    ``make()``'s result or raises. ``fd`` must stay open until then."""
    result = {}

    def enter_and_make():
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            result["errno"] = ctypes.get_errno()
            return
        try:
            result["value"] = make()
        except OSError as e:
            result["errno"] = e.errno

    worker = threading.Thread(target=enter_and_make, name="netplugin-netns", daemon=True)
    worker.start()

    def wait():
        worker.join()
        if "value" not in result:
            code = result.get("errno") or errno.EIO
            hint = " (not a network namespace?)" if code == errno.EINVAL else ""
            raise DataplaneError(f"failed to enter netns '{path}': {os.strerror(code)}{hint}")
        return result["value"]

    return wait
