"""Reading iperf3 ``--json`` and ``sockperf ping-pong`` output into plain numbers.

Each parser raises ``ValueError`` with a one-line reason when the tool's output is not what a finished run
prints (a server that went away, an error object in the JSON), so a failed sample is recorded as missing rather
than as zero.
"""

import json
import re


def _iperf3_end(text):
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"iperf3 printed no JSON document ({e.msg})") from None
    if doc.get("error"):
        raise ValueError(f"iperf3: {doc['error']}")
    end = doc.get("end") or {}
    if not end:
        raise ValueError("iperf3 JSON has no 'end' section: the test did not finish")
    return end


def _cpu(end):
    cpu = end.get("cpu_utilization_percent") or {}
    return cpu.get("host_total"), cpu.get("remote_total")


def parse_iperf3_tcp(text):
    """bits/s and bytes as the receiver counted them, sender retransmits, and both ends' CPU percentages."""
    end = _iperf3_end(text)
    recv, sent = end.get("sum_received"), end.get("sum_sent")
    if not recv or not sent:
        raise ValueError("iperf3 JSON lacks sum_received/sum_sent: not a TCP test")
    host_cpu, remote_cpu = _cpu(end)
    return {
        "bps": float(recv["bits_per_second"]),
        "bytes": int(recv["bytes"]),
        "seconds": float(recv["seconds"]),
        "retransmits": sent.get("retransmits"),
        "cpu_host_pct": host_cpu,
        "cpu_remote_pct": remote_cpu,
    }


def parse_iperf3_udp(text):
    """Offered rate as sent, the rate that arrived (sent minus losses), and the loss percentage."""
    end = _iperf3_end(text)
    total = end.get("sum")
    if not total or "lost_percent" not in total:
        raise ValueError("iperf3 JSON lacks a UDP 'sum' with lost_percent: not a UDP test")
    sent_bps = float(total["bits_per_second"])
    loss = float(total["lost_percent"])
    host_cpu, remote_cpu = _cpu(end)
    return {
        "sent_bps": sent_bps,
        "recv_bps": sent_bps * (1.0 - loss / 100.0),
        "loss_percent": loss,
        "packets": total.get("packets"),
        "lost_packets": total.get("lost_packets"),
        "bytes": int(total.get("bytes", 0)),
        "seconds": float(total.get("seconds", 0.0)),
        "cpu_host_pct": host_cpu,
        "cpu_remote_pct": remote_cpu,
    }


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_AVG = re.compile(r"avg-(?:latency|rtt)=\s*([0-9.]+)")
_PCT = re.compile(r"percentile\s+([0-9.]+)\s*=\s*([0-9.]+)")
_OBS = re.compile(r"Total\s+(\d+)\s+observations")


def parse_sockperf(text):
    """Average, median and 99th percentile in microseconds, as sockperf prints them (half round trip unless
    ``--full-rtt``), and the number of observations."""
    clean = _ANSI.sub("", text)
    avg = _AVG.search(clean)
    pcts = {float(p): float(v) for p, v in _PCT.findall(clean)}
    if not avg or 99.0 not in pcts:
        raise ValueError("sockperf printed no latency summary: the run did not finish")
    obs = _OBS.search(clean)
    return {
        "avg_us": float(avg.group(1)),
        "p50_us": pcts.get(50.0),
        "p99_us": pcts[99.0],
        "observations": int(obs.group(1)) if obs else None,
    }


def parse_snmp(text, group, field):
    """One counter of ``/proc/net/snmp`` (e.g. ``Ip`` ``ForwDatagrams``: the packets the kernel's IP forwarding
    passed on in this network namespace). The file pairs a header line with a value line per group."""
    lines = [line.split() for line in text.splitlines() if line.startswith(group + ":")]
    for names, values in zip(lines[::2], lines[1::2]):
        if field in names:
            return int(values[names.index(field)])
    raise ValueError(f"/proc/net/snmp has no {group} {field}")
