"""Real etcd servers on free loopback ports, their data on tmpfs, for tests and benchmarks: one member
(``EtcdServer``) or a three-member cluster (``EtcdCluster``) whose members can be killed and restarted."""
import json
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
    """One etcd member. Alone (``cluster`` None) it is a one-member cluster; in an ``EtcdCluster`` it names its
    peers. ``progress_interval`` (e.g. "1s") sets etcd's watch progress-notification period (default 10 min)."""

    def __init__(self, host="127.0.0.1", netns=None, name="t", cluster=None, progress_interval=None):
        self.host = host
        self.netns = netns
        self.name = name
        self.cluster = cluster
        self.progress_interval = progress_interval
        self.port = free_port()
        self.peer_port = free_port()
        self.proc = None
        self.data_dir = None
        self.bridges = []

    @property
    def endpoint(self):
        return f"http://{self.host}:{self.port}"

    @property
    def peer_url(self):
        return f"http://{self.host}:{self.peer_port}"

    def initial_cluster(self):
        return ",".join(f"{m.name}={m.peer_url}" for m in (self.cluster.members if self.cluster else [self]))

    def start(self, timeout=20):
        """Start etcd; a restart keeps the same port and data directory."""
        self.spawn()
        self.wait_healthy(timeout)
        return self

    def spawn(self):
        """Start the process without waiting (members of a new cluster wait for each other)."""
        if self.data_dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.data_dir = tempfile.mkdtemp(prefix="npt-etcd-", dir=base)
        stale = os.path.join(self.data_dir, "etcd.sock:0")  # a killed etcd leaves its socket behind
        if os.path.exists(stale):
            os.unlink(stale)
        cmd = [
            "etcd", "--name", self.name, "--data-dir", self.data_dir,
            # Also on a unix socket (relative to cwd = data dir): namespaces reach it through bridge_into().
            "--listen-client-urls", f"{self.endpoint},unix://etcd.sock:0", "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster(),
            "--log-level", "error", "--logger", "zap",
        ]
        if self.cluster:
            cmd += ["--initial-cluster-token", self.cluster.token]
        if self.progress_interval:
            cmd += ["--experimental-watch-progress-notify-interval", self.progress_interval]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        self.log = open(os.path.join(self.data_dir, "etcd.log"), "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.data_dir)

    def healthy(self):
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                return b"true" in r.read()
        except OSError:
            return False

    def wait_healthy(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}, see {self.data_dir}/etcd.log")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd {self.name} did not become healthy, see {self.data_dir}/etcd.log")

    def stop(self):
        stop_process(self.proc)
        self.proc = None

    def kill(self):
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self):
        """Stop and start on the same port and data (watch-resume tests)."""
        self.stop()
        self.start()

    def etcdctl(self, *args, **kw):
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(["etcdctl", "--endpoints", self.endpoint, *args], env=env, capture_output=True,
                              text=True, check=True, timeout=30, **kw)

    def snapshot(self, path):
        """``etcdctl snapshot save`` of this member's data."""
        self.etcdctl("snapshot", "save", path)

    def restore(self, path, timeout=20):
        """Stop, replace the data with ``etcdctl snapshot restore`` of ``path`` (its revision is older than what
        clients saw), start again on the same ports and socket. One-member servers only."""
        assert not self.cluster, "restoring a member of a cluster is not supported here"
        self.stop()
        scratch = tempfile.mkdtemp(prefix="npt-etcd-restore-", dir=os.path.dirname(self.data_dir))
        try:
            restored = os.path.join(scratch, "data")
            env = dict(os.environ, ETCDCTL_API="3")
            subprocess.run(["etcdctl", "snapshot", "restore", path, "--data-dir", restored, "--name", self.name,
                            "--initial-cluster", self.initial_cluster(),
                            "--initial-advertise-peer-urls", self.peer_url],
                           env=env, capture_output=True, text=True, check=True, timeout=30)
            shutil.rmtree(os.path.join(self.data_dir, "member"))
            shutil.move(os.path.join(restored, "member"), os.path.join(self.data_dir, "member"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.start(timeout)

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


class EtcdCluster:
    """``size`` members on loopback, started together (a member is healthy only once a quorum is up)."""

    def __init__(self, size=3, progress_interval=None):
        self.token = f"npt-{os.getpid()}-{free_port()}"
        self.members = [EtcdServer(name=f"m{i}", cluster=self, progress_interval=progress_interval)
                        for i in range(1, size + 1)]

    @property
    def endpoints(self):
        return [m.endpoint for m in self.members]

    def start(self, timeout=30):
        for m in self.members:
            m.spawn()
        for m in self.members:
            m.wait_healthy(timeout)
        return self

    def leader(self):
        """The member that leads now (etcd's maintenance status, asked of every running member)."""
        for m in self.members:
            if m.proc is None:
                continue
            status = json.loads(m.etcdctl("endpoint", "status", "-w", "json").stdout)[0]["Status"]
            if status["leader"] == status["header"]["member_id"]:
                return m
        raise RuntimeError("no etcd member leads")

    def bridge_into(self, netns):
        for m in self.members:
            m.bridge_into(netns)

    def close(self):
        for m in self.members:
            m.close()
