"""A real etcd server on a free loopback port, its data on tmpfs, for tests and benchmarks."""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

from tests.netns import stop_process


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, host="127.0.0.1", netns=None):
        self.host = host
        self.netns = netns
        self.port = free_port()
        self.peer_port = free_port()
        self.proc = None
        self.data_dir = None
        self.bridges = []

    @property
    def endpoint(self):
        return f"http://{self.host}:{self.port}"

    def start(self, timeout=20):
        """Start etcd; a restart keeps the same port and data directory."""
        if self.data_dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.data_dir = tempfile.mkdtemp(prefix="npt-etcd-", dir=base)
        cmd = [
            "etcd", "--name", "t", "--data-dir", self.data_dir,
            # Also on a unix socket (relative to cwd = data dir): namespaces reach it through bridge_into().
            "--listen-client-urls", f"{self.endpoint},unix://etcd.sock:0", "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-cluster", f"t=http://{self.host}:{self.peer_port}",
            "--log-level", "error", "--logger", "zap",
        ]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        self.log = open(os.path.join(self.data_dir, "etcd.log"), "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}, see {self.data_dir}/etcd.log")
            try:
                with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                    if b"true" in r.read():
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy")

    def stop(self):
        stop_process(self.proc)
        self.proc = None

    def restart(self):
        """Stop and start on the same port and data (watch-resume tests)."""
        self.stop()
        self.start()

    @property
    def unix_socket(self):
        """etcd names its socket 'etcd.sock:0'; socat reads ':' as a separator, so hand it a symlink."""
        link = os.path.join(self.data_dir, "etcd.sock")
        if not os.path.islink(link):
            os.symlink("etcd.sock:0", link)
        return link

    def bridge_into(self, netns):
        """Make ``self.endpoint`` (127.0.0.1:port) work inside ``netns`` too: socat there forwards to our unix
        socket, so agents in test namespaces reach etcd without any link into the root namespace."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "socat",
             f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{self.unix_socket}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.bridges.append(proc)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            probe = subprocess.run(["ip", "netns", "exec", netns, "socat", "-u", "OPEN:/dev/null",
                                    f"TCP:127.0.0.1:{self.port}"], capture_output=True)
            if probe.returncode == 0:
                return proc
            time.sleep(0.05)
        raise RuntimeError(f"etcd bridge into {netns} did not come up")

    def close(self):
        for proc in self.bridges:
            proc.kill()
            proc.wait()
        self.bridges.clear()
        self.stop()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
