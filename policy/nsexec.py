"""Run iptables/ipset commands inside one named network namespace, never the caller's by accident.

The namespace is a required argument: a name under /run/netns (run through ``ip netns exec NAME``) or a path to
a namespace file such as /proc/PID/ns/net (run through ``nsenter --net=PATH``). Each command is a short-lived
child process, so no thread of ours ever calls setns (and when the calling thread already is in the target
namespace, the command runs directly, without the wrapper). The host's namespace (the one this process runs in, or
pid 1's where we may look at it) is refused unless the caller says so explicitly with
``allow_host_namespace=True``: only an agent programming its real host should pass that.
"""
import logging
import os
import re
import subprocess

from netplugin.errors import DataplaneError, InvalidInput

LOG = logging.getLogger(__name__)
_NS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
HOST_NETNS = ("/proc/self/ns/net", "/proc/1/ns/net")


class NamespaceCommand:
    def __init__(self, netns, *, allow_host_namespace=False, timeout=60):
        if not netns or not isinstance(netns, str):
            raise InvalidInput("policy dataplane needs a network namespace name or path; refusing to default to"
                               " the current namespace")
        if "/" in netns:
            self.path = netns
            self.prefix = ["nsenter", f"--net={netns}", "--"]
        else:
            if not _NS_NAME.match(netns):
                raise InvalidInput(f"{netns!r} is not a valid network namespace name")
            self.path = f"/run/netns/{netns}"
            self.prefix = ["ip", "netns", "exec", netns]
        self.netns = netns
        self.timeout = timeout
        try:
            target = os.stat(self.path)
        except OSError as err:
            raise DataplaneError(f"failed to open netns {self.path!r}: {err.strerror}") from None
        if not allow_host_namespace and any(_same_namespace(target, p) for p in HOST_NETNS):
            raise DataplaneError(f"refusing to program policy in netns {netns!r}: it is the host's own network"
                                 " namespace (pass allow_host_namespace=True to mean it)")

    def run(self, argv, input_text=None, check=True, what=None):
        """Run ``argv`` inside the namespace; returns CompletedProcess. ``what`` names the step in errors."""
        what = what or argv[0]
        cmd = ([] if self._caller_is_inside() else self.prefix) + list(argv)
        LOG.debug("netns %s: %s", self.netns, " ".join(argv))
        try:
            proc = subprocess.run(cmd, input=input_text, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError as err:
            raise DataplaneError(f"{what} in netns {self.netns}: command not found: {err.filename}") from None
        except subprocess.TimeoutExpired:
            raise DataplaneError(f"{what} in netns {self.netns}: no answer in {self.timeout} s") from None
        if check and proc.returncode != 0:
            raise DataplaneError(f"{what} in netns {self.netns} failed (exit {proc.returncode}):"
                                 f" {first_line(proc.stderr) or first_line(proc.stdout)}", details=proc.stderr)
        return proc


    def _caller_is_inside(self):
        """True when the calling thread already is in the target namespace (an agent programming the host it runs
        in): the child then needs no ``nsenter``/``ip netns exec``, one exec fewer per command. Checked on every
        call, with the thread's own namespace, so a thread that is anywhere else still gets the wrapper."""
        try:
            return _same_namespace(os.stat("/proc/thread-self/ns/net"), self.path)
        except OSError:
            return False


def first_line(text):
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _same_namespace(st, other_path):
    try:
        other = os.stat(other_path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def numbered_context(lines, failed, radius=5):
    """Neutron-style: the numbered batch lines around the one that failed, that one marked with '>'."""
    if not failed:
        lo, hi = 1, min(len(lines), 2 * radius + 1)
    else:
        lo, hi = max(1, failed - radius), min(len(lines), failed + radius)
    return "\n".join(f"{'>' if n == failed else ' '}{n:6d}: {lines[n - 1]}" for n in range(lo, hi + 1))
