"""The policy benchmark's view of its lab (scripts/bench_policy.py): containers by name, host commands, the
agents' logs read incrementally for the sync passes they report, and a watch of our own on etcd that says when a
change was committed and which revision the agents must reach."""

import os
import re
import signal
import subprocess
import threading
import time

from netplugin.agent.view import relevant
from netplugin.config import EtcdConfig
from netplugin.datastore import keys
from netplugin.datastore.client import Datastore
from netplugin.datastore.watch import PrefixWatch
from netplugin.lab import system
from netplugin.lab.netns import stop_process


def distinct_cidrs(n):
    """``n`` /28s in 172.16.0.0/12, none adjacent (so the compiler cannot merge them into fewer set members) and
    far from any benchmark pool, so no benchmark packet matches one."""
    if not 0 <= n <= 2048 * 16:
        raise ValueError(f"{n} CIDRs do not fit in 172.16.0.0/12 as spaced /28s")
    return [f"172.{16 + i // 2048}.{i // 8 % 256}.{i % 8 * 32}/28" for i in range(n)]


def log_time(ts):
    """'2026-11-25T04:53:40.332' (the agent's local time) -> epoch seconds."""
    return time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000.0


class PolicyBench:
    """The benchmark's state over one lab (netplugin/lab): its containers (name -> namespace, address, endpoint
    record), the agents' logs read incrementally, and our own watch on etcd."""

    def __init__(self, stack, lab, workdir):
        self.stack, self.lab, self.workdir = stack, lab, workdir
        self.ds = Datastore(EtcdConfig(endpoints=lab.endpoints))
        self.changes = ChangeLog(self.ds)
        stack.callback(self.changes.close)
        self.ns, self.ip, self.ep = {}, {}, {}
        self._offsets = {}

    @property
    def hosts(self):
        return len(self.lab.plan.hosts)

    def host(self, i):
        """Host ``i`` (1-based) of the lab's plan."""
        return self.lab.plan.hosts[i - 1]

    def sh(self, i, argv, **kw):
        """Run ``argv`` in host ``i``'s namespace; the CompletedProcess (LabError on failure)."""
        return system.ns_run(self.host(i).namespace, argv, f"{argv[0]} on host{i}", **kw)

    def log_path(self, i):
        return os.path.join(self.host(i).run_dir, "agent.log")

    def restart_agent(self, i, resync):
        self.log_lines(i)  # skip what the previous run logged
        self.lab.restart_agent(self.host(i).name, ["--resync-interval", str(resync)])

    def container(self, key, host, network, labels):
        rec = self.lab.run_container(self.host(host).name, key.lower(), labels=labels, network=network)
        self.ns[key], self.ip[key] = rec["netns"], rec["ip"]
        for kv in self.ds.list(keys.ENDPOINTS):
            if kv.value["addresses"][0] == f"{self.ip[key]}/32":
                self.ep[key] = kv.value

    def daemon(self, key, argv):
        """A long-running process in a container that prints 'ready'; killed with its namespace."""
        proc = subprocess.Popen(
            system.in_ns(self.ns[key], argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.stack.callback(stop_process, proc, signal.SIGKILL)
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{argv[:3]} in {key} did not start: {line!r}")
        return proc

    def netctl(self, *args, stdin=None):
        return self.lab.netctl(*args, echo=False, input=stdin)

    def log_lines(self, i):
        """New lines of host ``i``'s agent log since the last call."""
        path = self.log_path(i)
        try:
            with open(path) as f:
                f.seek(self._offsets.get(path, 0))
                text = f.read()
                self._offsets[path] = f.tell()
        except OSError:
            return []
        return text.splitlines()

    def log_tail(self, i):
        try:
            with open(self.log_path(i)) as f:
                return f.read()[-6000:]
        except OSError:
            return ""

    def wait_sync(self, i, revision, timeout=30.0):
        """Bounded wait for host ``i``'s agent to finish a sync at or past ``revision``; -> (epoch ts, took_ms,
        lines)."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            for line in self.log_lines(i):
                seen.append(line)
                m = re.search(r"ts=(\S+) .*event=sync revision=(\d+) full=\w+ took_ms=([\d.]+)", line)
                if m and int(m.group(2)) >= revision:
                    return log_time(m.group(1)), float(m.group(3)), seen
            time.sleep(0.01)
        raise RuntimeError(f"host{i} did not sync revision {revision} in {timeout} s:\n{self.log_tail(i)}")

    def wait_full_syncs(self, i, count, timeout):
        """The next ``count`` periodic full syncs of host ``i``'s agent: [(took_ms, the lines of that pass)]."""
        out, lines = [], []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"host{i}: {len(out)} of {count} full syncs in {timeout} s")
            for line in self.log_lines(i):
                lines.append(line)
                m = re.search(r"event=sync revision=\d+ full=True took_ms=([\d.]+)", line)
                if m:
                    out.append((float(m.group(1)), lines))
                    lines = []
            time.sleep(0.02)
        return out


class ChangeLog:
    """Our own watch on the agents' prefix. ``last_relevant``: the revision of the last change an agent reacts to
    (deletes included; the newest write may be one they rightly ignore, such as the reclaimer's leader key).
    ``commit_after``: when a policy change reached us, which is when it reached every agent's watch too."""

    def __init__(self, ds):
        self.ds = ds
        self.seen = self.relevant = ds.revision()
        self.policy_stamps = []  # monotonic arrival times of policy changes
        self.cond = threading.Condition()
        self.watch = PrefixWatch(ds, keys.ROOT, self.seen, self._on, ds.revision, name="bench-watch").start()

    def _on(self, events):
        now = time.monotonic()
        with self.cond:
            for e in events:
                self.seen = max(self.seen, e.kv.mod_revision)
                if relevant(e.kv.key):
                    self.relevant = max(self.relevant, e.kv.mod_revision)
                if e.kv.key.startswith(keys.POLICIES):
                    self.policy_stamps.append(now)
            self.cond.notify_all()

    def last_relevant(self, timeout=10.0):
        target = self.ds.revision()
        with self.cond:
            if not self.cond.wait_for(lambda: self.seen >= target, timeout):
                raise RuntimeError(f"our watch did not reach revision {target} in {timeout} s")
            return self.relevant

    def commit_after(self, t0, timeout=10.0):
        with self.cond:
            if not self.cond.wait_for(lambda: any(t >= t0 for t in self.policy_stamps), timeout):
                raise RuntimeError("the policy change never reached our watch")
            return min(t for t in self.policy_stamps if t >= t0)

    def close(self):
        self.watch.stop()
