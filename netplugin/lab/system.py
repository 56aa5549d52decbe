"""Processes and network namespaces for the lab, with the safety rules built in.

Every namespace operation insists on a name starting with ``lab-``: nothing here can run a command in, change or
delete the root namespace or a namespace someone else made. A process is only ever signalled when its start
time still matches the one recorded when we started it, so a recycled pid is never killed.
"""

import os
import signal
import subprocess
import time

from netplugin.errors import NetpluginError
from netplugin.lab.plan import NS_PREFIX

NETNS_DIR = "/run/netns"


class LabError(NetpluginError):
    """A lab could not be built, used or removed; the message says what was being done."""


def run(args, what, check=True, timeout=60, input=None, env=None):
    """Run ``args``; LabError naming ``what`` (and the command's stderr) when it fails."""
    try:
        p = subprocess.run(args, input=input, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LabError(f"{what}: {args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{what}: {' '.join(args)} did not finish within {timeout}s") from None
    if check and p.returncode != 0:
        detail = (p.stderr.strip() or p.stdout.strip() or f"exit status {p.returncode}").splitlines()[-1]
        raise LabError(f"{what}: {detail}")
    return p


def mount_bpffs(path):
    """A bpf filesystem of our own at ``path`` (made if missing), for pins no other run sees."""
    os.makedirs(path, exist_ok=True)
    run(["mount", "-t", "bpf", "bpf", path], f"mounting a bpf filesystem at {path}")


def unmount_bpffs(path):
    """Lazily unmount ``path`` (its pins go with it once the last program and map users are gone)."""
    run(["umount", "-l", path], f"unmounting {path}", check=False)


def check_ns(ns):
    if not isinstance(ns, str) or not ns.startswith(NS_PREFIX) or "/" in ns:
        raise LabError(f"refusing to touch network namespace {ns!r}: lab namespaces start with {NS_PREFIX!r}")
    return ns


def ns_argv(ns, args):
    """argv that runs ``args`` in namespace ``ns``: the one way the lab, the benchmarks and the tests enter one.
    Unlike the agent's ``nsenter --net`` (netplugin/kernel/netns.py), ``ip netns exec`` also mounts the
    namespace's own /sys, so a lab or test command sees /sys/class/net as an operator inside that namespace would."""
    return ["ip", "netns", "exec", ns, *args]


def in_ns(ns, args):
    """``args`` run inside lab namespace ``ns``."""
    return ns_argv(check_ns(ns), args)


def ns_run(ns, args, what, **kw):
    return run(in_ns(ns, args), what, **kw)


def ip_batch(ns, commands, what):
    """Several ``ip`` commands in one process, all in ``ns`` (``ip -n NS -batch -``)."""
    return run(["ip", "-n", check_ns(ns), "-batch", "-"], what, input="\n".join(commands) + "\n")


def netns_exists(ns):
    return os.path.exists(os.path.join(NETNS_DIR, check_ns(ns)))


def add_netns(ns):
    run(["ip", "netns", "add", check_ns(ns)], f"creating network namespace {ns}")
    ip_batch(ns, ["link set lo up"], f"bringing up lo in {ns}")


def list_netns(prefix):
    """Existing namespaces whose names start with ``prefix`` (itself a lab prefix)."""
    check_ns(prefix)
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def netns_pids(ns):
    p = run(["ip", "netns", "pids", check_ns(ns)], f"listing processes in {ns}", check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def delete_netns(ns, sig=signal.SIGKILL):
    """Kill whatever still runs inside ``ns``, then delete it; a missing namespace is fine."""
    if not netns_exists(ns):
        return False
    pids = netns_pids(ns)
    for pid in pids:
        _signal(pid, sig)
    _wait_gone(pids, 5.0)
    run(["ip", "netns", "del", ns], f"deleting network namespace {ns}", check=False)
    return True


def veth(ns_a, name_a, ns_b, name_b):
    """A veth pair created straight in its two namespaces (never in the root namespace)."""
    run(
        [
            "ip",
            "link",
            "add",
            "name",
            name_a,
            "netns",
            check_ns(ns_a),
            "type",
            "veth",
            "peer",
            "name",
            name_b,
            "netns",
            check_ns(ns_b),
        ],
        f"linking {ns_a}:{name_a} to {ns_b}:{name_b}",
    )


def sysctl(ns, settings, what):
    ns_run(ns, ["sysctl", "-q", "-w"] + [f"{k}={v}" for k, v in settings.items()], what)


# --- processes -------------------------------------------------------------------------------------------------


def spawn(args, log_path, cwd=None, env=None):
    """Start a long-lived process in its own session (it outlives the lab command; Ctrl-C in the terminal does
    not reach it), output appended to ``log_path``. Returns the Popen."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise LabError(f"starting {args[0]}: not installed") from None


def start_time(pid):
    """The process's start time in clock ticks since boot (its identity together with the pid), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid, started):
    """True when ``pid`` still is the process that started at ``started`` and is not a zombie."""
    if started is None or start_time(pid) != started:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_processes(procs, timeout=5.0):
    """TERM every (pid, start time) still alive, KILL the ones left after ``timeout``; reap our children."""
    live = [(pid, st) for pid, st in procs if alive(pid, st)]
    for pid, _ in live:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p, s) for p, s in live):
        _reap([p for p, _ in live])
        time.sleep(0.05)
    for pid, st in live:
        if alive(pid, st):
            _signal(pid, signal.SIGKILL)
    _wait_gone([p for p, _ in live], 5.0)


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pids):
    """Collect those of ``pids`` that are exited children of ours, so they do not linger as zombies. Only these
    pids: a wait on any child would steal the exit status of processes other code is watching."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pids)
        if not any(os.path.exists(f"/proc/{p}") and start_time(p) is not None and not _zombie(p) for p in pids):
            return
        time.sleep(0.05)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def rss_kib(pid):
    """Resident memory of ``pid`` in KiB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None
