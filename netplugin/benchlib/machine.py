"""What machine a figure came from, and how busy its CPUs were (``/proc/stat``)."""

import os
import platform
import subprocess

# /proc/stat "cpu" columns: user nice system idle iowait irq softirq steal guest guest_nice.
# Busy = user + nice + system + irq + softirq (guest time is already inside user; steal is the hypervisor's).
_BUSY_COLUMNS = (0, 1, 2, 5, 6)


def cpu_busy_seconds(stat_text=None):
    """Seconds all CPUs together spent busy since boot, from the aggregate ``cpu`` line of /proc/stat."""
    if stat_text is None:
        with open("/proc/stat") as f:
            stat_text = f.read()
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(x) for x in fields[1:]]
            return sum(ticks[i] for i in _BUSY_COLUMNS if i < len(ticks)) / os.sysconf("SC_CLK_TCK")
    raise ValueError("/proc/stat has no aggregate 'cpu' line")


def _first_line(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (p.stdout or p.stderr).strip().splitlines()
    return out[0].strip() if out else None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def load_average():
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def machine_info(tools=()):
    """nproc, kernel, CPU model, memory, load average, and the first line of ``TOOL --version`` per tool."""
    info = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpus_online": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": cpu_model(),
        "memory_gib": memory_gib(),
        "python": platform.python_version(),
        "loadavg": load_average(),
    }
    versions = {}
    for tool in tools:
        versions[tool] = _first_line([tool, "--version"])
    if versions:
        info["tools"] = versions
    return info


def describe(info):
    """One line: '2 CPUs (AMD EPYC), 24 GiB, Linux 6.1.0; load 1.2 0.9 0.8'."""
    parts = [f"{info.get('nproc')} CPUs ({info.get('cpu_model')})"]
    if info.get("memory_gib"):
        parts.append(f"{info['memory_gib']} GiB")
    parts.append(f"Linux {info.get('kernel')}")
    text = ", ".join(parts)
    if info.get("loadavg"):
        text += "; load average " + " ".join(str(x) for x in info["loadavg"])
    return text
