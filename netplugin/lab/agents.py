"""Real agents in throwaway host namespaces, and the CNI binary called exactly as a runtime calls it (the tests'
fixtures and the benchmarks). ``agent_argv`` is the one ``netplugin agent`` command line, for these and for the
lab's agents (netplugin/lab/topology.py)."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from netplugin.lab.console import console_script
from netplugin.lab.netns import stop_process
from netplugin.lab.system import ns_argv


def agent_argv(hostname, etcd_endpoints, run_dir, routing, extra_args=(), program=None):
    """``netplugin agent`` for one host: its name, etcd, run directory (sockets, logs, BIRD) and routing mode."""
    return [
        program or console_script("netplugin"),
        "agent",
        "--hostname",
        hostname,
        "--etcd-endpoints",
        ",".join(etcd_endpoints),
        "--run-dir",
        run_dir,
        "--routing",
        routing,
    ] + list(extra_args)


class AgentProcess:
    """``netplugin agent`` inside ``netns`` (the host), logging to run_dir/agent.log."""

    def __init__(self, netns, hostname, etcd_endpoint, run_dir, extra_args=()):
        self.netns = netns
        self.hostname = hostname
        self.etcd_endpoint = etcd_endpoint
        self.run_dir = run_dir
        self.extra_args = list(extra_args)
        self.proc = None

    @property
    def socket(self):
        return os.path.join(self.run_dir, "agent.sock")

    @property
    def log_path(self):
        return os.path.join(self.run_dir, "agent.log")

    def start(self, timeout=20):
        os.makedirs(self.run_dir, exist_ok=True)
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        cmd = ns_argv(
            self.netns, agent_argv(self.hostname, [self.etcd_endpoint], self.run_dir, "none", self.extra_args)
        )
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"agent did not start:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM):
        stop_process(self.proc, sig, timeout=15)
        self.proc = None

    def log(self):
        """The log's last 6000 characters (for an error message)."""
        return self.log_text()[-6000:]

    def log_text(self):
        """The whole log."""
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""


class CniBinary:
    """The installed plugin binary plus a conflist; ``call`` runs it with env + stdin like a runtime."""

    def __init__(self, workdir, agent_socket, network="netplugin", pools=None, cni_version="1.1.0"):
        from cni.install import install_cni

        self.bin_dir = os.path.join(workdir, "bin")
        self.conf_dir = os.path.join(workdir, "net.d")
        self.bin_path, conf_path = install_cni(
            self.bin_dir,
            self.conf_dir,
            network=network,
            agent_socket=agent_socket,
            pools=pools,
            cni_version=cni_version,
        )
        with open(conf_path) as f:
            conflist = json.load(f)
        self.config = dict(conflist["plugins"][0], cniVersion=conflist["cniVersion"], name=conflist["name"])

    def call(self, command, container_id="", netns="", ifname="eth0", args="", config=None, timeout=60):
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": self.bin_dir,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        if args:
            env["CNI_ARGS"] = args
        p = subprocess.run(
            [self.bin_path],
            input=json.dumps(config or self.config),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = json.loads(p.stdout) if p.stdout.strip() else {}
        return p.returncode, out, p.stderr


def tempdir(prefix="npt-"):
    return tempfile.mkdtemp(prefix=prefix)


def rmtree(path):
    shutil.rmtree(path, ignore_errors=True)
