"""Throwaway network namespaces owned by one object (the tests' fixtures and the benchmarks): never the root
namespace.

Every name starts with ``npt-`` plus a random suffix so parallel runs and helpers never collide, and every
namespace is registered for deletion before it is created. (A lab, netplugin/lab/lab.py, outlives the command
that made it and so records its namespaces in a state file instead: netplugin/lab/system.py.)
"""

import os
import shlex
import signal
import subprocess
import uuid

from netplugin.lab.system import LabError, ns_argv


class CommandFailed(LabError):
    """A command exited non-zero; the message holds the command, its status and all of its output."""


def run(cmd, check=True, **kw):
    """Run a command (list or string), returning CompletedProcess; failures say what ran."""
    args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    p = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise CommandFailed(f"{' '.join(args)} -> rc={p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def stop_process(proc, sig=signal.SIGTERM, timeout=10):
    """Signal a child and wait; SIGKILL when it does not go within ``timeout``. None or already gone: no-op."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_pids(pids):
    """SIGKILL each pid, ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def nsexec(ns, cmd, check=True, **kw):
    """Run a command inside a namespace made by a test or a benchmark."""
    args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return run(ns_argv(ns, args), check=check, **kw)


def unique(prefix="npt"):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class NamespaceSet:
    """Creates namespaces and veth links between them; ``close`` removes everything it made."""

    def __init__(self):
        self.names = []

    def add(self, name=None):
        name = name or unique()
        self.names.append(name)
        run(["ip", "netns", "add", name])
        nsexec(name, "ip link set lo up")
        return name

    def link(self, ns_a, ns_b, addr_a=None, addr_b=None, name_a="eth0", name_b="eth0"):
        """A veth between two namespaces, optionally addressed (e.g. '10.9.0.1/24')."""
        tmp_a, tmp_b = "v" + uuid.uuid4().hex[:10], "v" + uuid.uuid4().hex[:10]
        run(["ip", "link", "add", tmp_a, "netns", ns_a, "type", "veth", "peer", "name", tmp_b, "netns", ns_b])
        for ns, tmp, name, addr in ((ns_a, tmp_a, name_a, addr_a), (ns_b, tmp_b, name_b, addr_b)):
            nsexec(ns, f"ip link set {tmp} name {name}")
            if addr:
                nsexec(ns, f"ip addr add {addr} dev {name}")
            nsexec(ns, f"ip link set {name} up")

    def close(self):
        for name in reversed(self.names):
            # Kill anything still running inside before deleting, so no process outlives the test.
            kill_pids(run(["ip", "netns", "pids", name], check=False).stdout.split())
            run(["ip", "netns", "del", name], check=False)
        self.names.clear()
