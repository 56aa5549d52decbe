#!/usr/bin/env python3
"""CNI ADD and DEL latency: netplugin's installed binary (through a real agent and etcd) beside the reference
``ptp`` + ``host-local`` plugins from Debian's containernetworking-plugins, in one run, interleaved.

Each plugin gets its own throwaway host namespace and runs there exactly as a runtime runs it (CNI_* environment,
config on stdin, the process placed in the host namespace before exec); every container is a throwaway
namespace. Calls alternate between the two plugins (and which goes first), so drift in machine load hits both
alike. Bounded by ``--deadline``; everything (containers, agent, namespaces, etcd, temp files) is removed at the
end, also on Ctrl-C or SIGTERM. Prints a Markdown table; ``--profile`` adds where netplugin's ADD time goes.

    .venv/bin/python scripts/bench_cni.py [-n 100] [--deadline 300] [--profile]
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from netplugin.benchlib.stats import median, percentile
from netplugin.config import EtcdConfig
from netplugin.datastore.client import Datastore
from netplugin.ipam.allocator import IPAM
from netplugin.lab.agents import AgentProcess, CniBinary, rmtree, tempdir
from netplugin.lab.etcd import EtcdServer
from netplugin.lab.netns import NamespaceSet

NP_POOL = "10.78.0.0/16"
PTP_SUBNET = "10.79.0.0/16"
REFERENCE_DIR = "/usr/lib/cni"
CNI_VERSION = "1.0.0"  # the newest Debian's plugins (1.1.1) speak; netplugin gets the same
CALL_TIMEOUT = 30.0
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Interrupted(Exception):
    pass


class Plugin:
    """One CNI plugin binary and its config, run inside a host namespace."""

    def __init__(self, name, path, config, host_ns, cni_path):
        self.name, self.path, self.config, self.host_ns, self.cni_path = name, path, config, host_ns, cni_path
        self.times = {"ADD": [], "DEL": []}

    def _enter_host(self):
        # Runs in the child between fork and exec: only the plugin process enters the host namespace.
        fd = os.open(f"/run/netns/{self.host_ns}", os.O_RDONLY)
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            os._exit(125)
        os.close(fd)

    def call(self, command, container_ns, record=True):
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_ns,
            "CNI_NETNS": f"/run/netns/{container_ns}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": self.cni_path,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        started = time.perf_counter()
        p = subprocess.run(
            [self.path],
            input=json.dumps(self.config).encode(),
            env=env,
            capture_output=True,
            timeout=CALL_TIMEOUT,
            preexec_fn=self._enter_host,
        )
        took = (time.perf_counter() - started) * 1000
        if p.returncode != 0:
            raise RuntimeError(
                f"{self.name} {command} {container_ns} failed: {p.stdout.decode()} {p.stderr.decode()[-500:]}"
            )
        if record:
            self.times[command].append(took)
        return took


class Bench:
    def __init__(self, args):
        self.args = args
        self.etcd = None
        self.nss = NamespaceSet()
        self.workdir = tempdir("npt-benchcni-")
        self.agent = None
        self.plugins = []
        self.added = []  # (plugin, container ns), registered before each ADD

    # --- set-up ---------------------------------------------------------------------------------------------------

    def setup(self):
        self.etcd = EtcdServer()
        self.etcd.start()
        ds = Datastore(EtcdConfig(endpoints=[self.etcd.endpoint]))
        IPAM(ds).add_pool(NP_POOL)
        np_host = self.nss.add()
        self.etcd.bridge_into(np_host)
        self.agent = AgentProcess(np_host, "bench-cni", self.etcd.endpoint, os.path.join(self.workdir, "run"))
        self.agent.start()
        binary = CniBinary(
            os.path.join(self.workdir, "np"),
            self.agent.socket,
            network="benchnp",
            pools=[NP_POOL],
            cni_version=CNI_VERSION,
        )
        netplugin = Plugin("netplugin", binary.bin_path, binary.config, np_host, binary.bin_dir)

        ptp_host = self.nss.add()
        ptp_config = {
            "cniVersion": CNI_VERSION,
            "name": "benchptp",
            "type": "ptp",
            "ipMasq": False,
            "mtu": 1500,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": PTP_SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": os.path.join(self.workdir, "host-local"),
            },
        }
        ptp = Plugin("ptp + host-local", os.path.join(REFERENCE_DIR, "ptp"), ptp_config, ptp_host, REFERENCE_DIR)
        self.plugins = [netplugin, ptp]

    # --- the run --------------------------------------------------------------------------------------------------

    def run(self):
        n, deadline = self.args.n, time.monotonic() + self.args.deadline
        containers = {p.name: [self.nss.add() for _ in range(n)] for p in self.plugins}
        for p in self.plugins:  # one unrecorded ADD+DEL each: page cache, agent connections, first block claim
            warm = self.nss.add()
            self.added.append((p, warm))
            p.call("ADD", warm, record=False)
            p.call("DEL", warm, record=False)
        for command in ("ADD", "DEL"):
            for i in range(n):
                order = self.plugins if i % 2 == 0 else self.plugins[::-1]
                for p in order:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"deadline of {self.args.deadline:g} s reached at {command} {i}")
                    ns = containers[p.name][i]
                    if command == "ADD":
                        self.added.append((p, ns))
                    p.call(command, ns)

    def table(self):
        rows = ["| plugin | ADD p50 | ADD p99 | DEL p50 | DEL p99 | n |", "|---|---:|---:|---:|---:|---:|"]
        for p in self.plugins:
            add, dele = p.times["ADD"], p.times["DEL"]
            if not add or not dele:
                continue
            rows.append(
                f"| {p.name} | {percentile(add, 50):.1f} ms | {percentile(add, 99):.1f} ms | "
                f"{percentile(dele, 50):.1f} ms | {percentile(dele, 99):.1f} ms | {len(add)} |"
            )
        return "\n".join(rows)

    # --- where the time goes --------------------------------------------------------------------------------------

    def profile(self, rounds=20):
        """netplugin's ADD split into: the plugin process alone (VERSION: interpreter start-up and the plugin's
        imports), the agent's answer over its socket (HTTP + service), and inside the service its phases as the
        agent logs them (IPAM transaction, netlink work, endpoint record put)."""
        netplugin = self.plugins[0]
        startup = [self._timed([netplugin.path], {"CNI_COMMAND": "VERSION"}) for _ in range(rounds)]
        interp = self._interpreter(netplugin.path)
        bare = [self._timed([interp, "-IS", "-c", "pass"], {}) for _ in range(rounds)]
        direct = []
        log_mark = len(self.agent.log_text())
        for _ in range(rounds):
            ns = self.nss.add()
            self.added.append((netplugin, ns))
            body = {
                "command": "ADD",
                "container_id": ns,
                "netns": f"/run/netns/{ns}",
                "ifname": "eth0",
                "args": {},
                "config": netplugin.config,
                "ips": [],
                "labels": {},
                "prev_result": None,
            }
            started = time.perf_counter()
            reply = post_unix(self.agent.socket, "/v1/cni", body)
            direct.append((time.perf_counter() - started) * 1000)
            if "result" not in reply:
                raise RuntimeError(f"agent ADD failed: {reply}")
        phases, del_phases = {}, {}
        for line in self.agent.log_text()[log_mark:].splitlines():
            if "endpoint added" in line or "event=policy.installed" in line:
                for phase, ms in re.findall(r"(\w+)_ms=([\d.]+)", line):
                    phases.setdefault(phase, []).append(float(ms))
        for line in self.agent.log_text()[:log_mark].splitlines():
            if "endpoint deleted" in line:  # the recorded DELs of the run above
                for phase, ms in re.findall(r"(\w+)_ms=([\d.]+)", line):
                    del_phases.setdefault(phase, []).append(float(ms))
        add_p50 = percentile(netplugin.times["ADD"], 50)
        rows = [
            ("whole ADD through the binary (from the run above)", add_p50),
            ("  bare interpreter start-up (`python3 -IS -c pass`)", median(bare)),
            ("  plugin process without the agent (VERSION)", median(startup)),
            ("  agent's answer over its socket, from a warm client", median(direct)),
        ]
        rows += [(f"    of which {phase} (agent log)", median(v)) for phase, v in sorted(phases.items())]
        rest = add_p50 - median(startup) - median(direct)
        rows.append(("  rest: the plugin's request path (imports, connect, JSON, result shaping)", rest))
        rows.append(("whole DEL through the binary (from the run above)", percentile(netplugin.times["DEL"], 50)))
        rows += [(f"    of which {phase} (agent log)", median(v)) for phase, v in sorted(del_phases.items())]
        out = ["| netplugin ADD and DEL, medians | ms |", "|---|---:|"]
        out += [f"| {what} | {ms:.1f} |" for what, ms in rows]
        return "\n".join(out)

    @staticmethod
    def _interpreter(path):
        with open(path) as f:
            return f.readline()[2:].split()[0]

    @staticmethod
    def _timed(argv, env):
        started = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, timeout=CALL_TIMEOUT, stdin=subprocess.DEVNULL)
        return (time.perf_counter() - started) * 1000

    # --- clean-up -------------------------------------------------------------------------------------------------

    def close(self):
        for p, ns in reversed(self.added):
            try:
                p.call("DEL", ns, record=False)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                print(f"bench: cleanup: {e}", file=sys.stderr)
        if self.agent:
            self.agent.stop()
        self.nss.close()
        if self.etcd:
            self.etcd.close()
        rmtree(self.workdir)


def post_unix(path, url, body, timeout=30):
    """One HTTP/1.1 POST over a unix socket (the agent's API), returning the decoded JSON reply."""
    payload = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(
            f"POST {url} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100, help="containers per plugin (default 100, at most 1000)")
    parser.add_argument("--deadline", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--profile", action="store_true", help="also break netplugin's ADD time down")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cni: needs root (network namespaces)")
    if not 1 <= args.n <= 1000:
        sys.exit("bench_cni: -n must be from 1 to 1000")
    if not os.access(os.path.join(REFERENCE_DIR, "ptp"), os.X_OK):
        sys.exit(f"bench_cni: {REFERENCE_DIR}/ptp missing (Debian package containernetworking-plugins)")

    def interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    bench = Bench(args)
    status = 0
    try:
        bench.setup()
        bench.run()
        print(
            f"CNI latency, {args.n} containers per plugin, interleaved, cniVersion {CNI_VERSION}, "
            f"{os.cpu_count()} CPUs\n"
        )
        print(bench.table())
        if args.profile:
            print()
            print(bench.profile())
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"bench_cni: interrupted ({str(e) or 'SIGINT'}); cleaning up", file=sys.stderr)
        status = 130
    except (RuntimeError, TimeoutError) as e:
        print(f"bench_cni: {e}", file=sys.stderr)
        if bench.plugins and any(p.times["DEL"] for p in bench.plugins):
            print(bench.table())
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
