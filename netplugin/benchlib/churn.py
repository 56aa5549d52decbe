"""The pure parts of the churn benchmark (scripts/bench_churn.py): its limits, what it reads of a process from
/proc, and the report it prints. Kept apart so they are unit-tested without a lab."""

import os
from dataclasses import dataclass, field

from netplugin.benchlib.stats import percentile
from netplugin.errors import InvalidInput

MAX_HOSTS = 50
MAX_CONTAINERS = 5000
MAX_PER_HOST = 32
MAX_TIMEOUT = 3600


def check_limits(hosts, containers, per_host, timeout):
    """Refuse a run that cannot measure anything or cannot finish: reachability needs a second host."""
    if not 2 <= hosts <= MAX_HOSTS:
        raise InvalidInput(f"--hosts {hosts}: between 2 (a ping comes from another host) and {MAX_HOSTS}")
    if not 1 <= containers <= MAX_CONTAINERS:
        raise InvalidInput(f"--containers {containers}: between 1 and {MAX_CONTAINERS}")
    if not 1 <= per_host <= MAX_PER_HOST:
        raise InvalidInput(f"--per-host-concurrency {per_host}: between 1 and {MAX_PER_HOST}")
    if not 0 < timeout <= MAX_TIMEOUT:
        raise InvalidInput(f"--timeout {timeout:g}: more than 0 and at most {MAX_TIMEOUT} seconds")


def proc_usage(pid):
    """(CPU seconds of ``pid`` and its reaped children, peak resident KiB), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except (OSError, IndexError, ValueError):
        return None
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK"), hwm


@dataclass
class ChurnResult:
    hosts: int
    containers: int
    per_host: int
    total_s: float = 0.0  # first ADD started -> last container reachable
    delete_s: float = 0.0
    add_s: list = field(default_factory=list)
    del_s: list = field(default_factory=list)
    reach_s: list = field(default_factory=list)  # ADD started -> first echo reply from another host
    unreachable: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # (container, error)
    agent_cpu_s: dict = field(default_factory=dict)  # host -> CPU seconds during the churn
    agent_peak_kib: dict = field(default_factory=dict)
    etcd_db_bytes: dict = field(default_factory=dict)  # "before", "full", "after" -> bytes
    leaks: dict = field(default_factory=dict)  # what -> list of leftovers
    ipam_check: str = ""


def _ms(v):
    return "-" if v is None else f"{v * 1000:.0f}"


def _mib(v):
    return "-" if v is None else f"{v / 1024:.1f}"


def render(r):
    """The report as text lines: one table of figures, then the leak checks."""
    cpu = list(r.agent_cpu_s.values())
    mem = list(r.agent_peak_kib.values())
    rows = [
        ("hosts / containers / ADDs in flight per host", f"{r.hosts} / {r.containers} / {r.per_host}"),
        ("end to end: first ADD to last reachable (s)", f"{r.total_s:.1f}"),
        (
            "ADD p50 / p99 / max under load (ms)",
            f"{_ms(percentile(r.add_s, 50))} / {_ms(percentile(r.add_s, 99))} / {_ms(max(r.add_s, default=None))}",
        ),
        (
            "time to reachable p50 / p99 / max (ms)",
            f"{_ms(percentile(r.reach_s, 50))} / {_ms(percentile(r.reach_s, 99))} / "
            f"{_ms(max(r.reach_s, default=None))}",
        ),
        (
            "delete all (s); DEL p50 / p99 (ms)",
            f"{r.delete_s:.1f}; {_ms(percentile(r.del_s, 50))} / {_ms(percentile(r.del_s, 99))}",
        ),
        ("agent CPU s per host, mean / max", f"{sum(cpu) / len(cpu):.1f} / {max(cpu):.1f}" if cpu else "-"),
        ("agent peak RSS per host MiB, mean / max", f"{_mib(sum(mem) / len(mem))} / {_mib(max(mem))}" if mem else "-"),
        (
            "etcd DB size before / full / after (MiB)",
            " / ".join(
                _mib(r.etcd_db_bytes[k] / 1024) if r.etcd_db_bytes.get(k) is not None else "-"
                for k in ("before", "full", "after")
            ),
        ),
        ("failed ADDs / unreachable", f"{len(r.failed)} / {len(r.unreachable)}"),
    ]
    lines = ["| figure | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]
    for what, items in sorted(r.leaks.items()):
        lines.append(f"leftover {what}: {len(items)}" + (f" ({', '.join(items[:5])}...)" if items else ""))
    if r.ipam_check:
        lines.append(f"netctl ipam check: {r.ipam_check}")
    for name, err in r.failed[:5]:
        lines.append(f"failed: {name}: {err}")
    if r.unreachable:
        lines.append(f"unreachable: {', '.join(r.unreachable[:10])}")
    return lines


def clean(r):
    """True when nothing failed, everything was reachable and nothing was left behind."""
    return (
        not r.failed and not r.unreachable and not any(r.leaks.values()) and r.ipam_check.strip() == "ipam check: clean"
    )
