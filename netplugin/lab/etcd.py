"""Real etcd for labs, tests and benchmarks: one member (``EtcdServer``) or a cluster (``EtcdCluster``) on
loopback ports of the root namespace, data on tmpfs (where fsync costs nothing).

Namespaces reach it without any link or route into the root namespace: each member also listens on a unix
socket, and a ``socat`` in the namespace forwards 127.0.0.1:<member's port> to it (``bridge_into``), so every
namespace uses the same etcd URLs as the root namespace.

Two kinds of owner. A test or a benchmark owns its servers while it runs and ``close``s them. A lab
(netplugin/lab/lab.py) outlives the command that built it: it starts its members and bridges ``detached`` (in
their own session, out of reach of the terminal's Ctrl-C) and records every pid in its state file as it starts
(``start_lab_cluster``, ``bridge_lab_host``), so a later ``down`` stops them by pid.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

from netplugin.lab import system
from netplugin.lab.netns import stop_process
from netplugin.lab.system import LabError, ns_argv

HOST = "127.0.0.1"
LAB_PROGRESS_INTERVAL = "3s"  # keeps a quiet watch from reaching the agents' read deadline (datastore/watch.py)


def requests_served(endpoint, timeout=5.0):
    """{method: count} of the requests one etcd member has answered (its /metrics ``grpc_server_handled_total``,
    every code), the long-lived Watch left out: each HTTP gateway call an agent makes counts once."""
    by_method = {}
    for line in _metrics(endpoint, timeout).splitlines():
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="Watch"' not in line:
            method = line.split('grpc_method="', 1)[1].split('"', 1)[0]
            by_method[method] = by_method.get(method, 0) + float(line.rsplit(" ", 1)[1])
    return by_method


def db_size(endpoint, timeout=5.0):
    """(bytes of the member's database file, bytes of it in use): etcd's ``etcd_mvcc_db_total_size_*``."""
    sizes = {}
    for line in _metrics(endpoint, timeout).splitlines():
        for name in ("etcd_mvcc_db_total_size_in_bytes", "etcd_mvcc_db_total_size_in_use_in_bytes"):
            if line.startswith(name + " "):
                sizes[name] = int(float(line.rsplit(" ", 1)[1]))
    return sizes.get("etcd_mvcc_db_total_size_in_bytes"), sizes.get("etcd_mvcc_db_total_size_in_use_in_bytes")


def _metrics(endpoint, timeout):
    with urllib.request.urlopen(endpoint + "/metrics", timeout=timeout) as r:
        return r.read().decode()


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def healthy(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return b'"true"' in r.read()
    except OSError:
        return False


class EtcdServer:
    """One etcd member. Alone (``cluster`` None) it is a one-member cluster; in an ``EtcdCluster`` it names its
    peers. ``progress_interval`` (e.g. "1s") sets etcd's watch progress-notification period (default 10 min).
    Ports and the data directory are picked here unless given (a lab records them before anything starts)."""

    def __init__(
        self,
        host=HOST,
        netns=None,
        name="t",
        cluster=None,
        progress_interval=None,
        port=None,
        peer_port=None,
        data_dir=None,
        detached=False,
    ):
        self.host = host
        self.netns = netns
        self.name = name
        self.cluster = cluster
        self.progress_interval = progress_interval
        self.port = port or free_port()
        self.peer_port = peer_port or free_port()
        self.data_dir = data_dir
        self.own_dir = data_dir is None  # removed by close() only when we made it
        self.detached = detached
        self.proc = None
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
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        stale = os.path.join(self.data_dir, "etcd.sock:0")  # a killed etcd leaves its socket behind
        if os.path.exists(stale):
            os.unlink(stale)
        cmd = [
            "etcd",
            "--name",
            self.name,
            "--data-dir",
            self.data_dir,
            # Also on a unix socket (relative to cwd = data dir): namespaces reach it through bridge_into().
            "--listen-client-urls",
            f"{self.endpoint},unix://etcd.sock:0",
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster(),
            "--initial-cluster-state",
            "new",
            "--log-level",
            "error",
            "--logger",
            "zap",
        ]
        if self.cluster:
            cmd += ["--initial-cluster-token", self.cluster.token]
        if self.progress_interval:
            cmd += ["--experimental-watch-progress-notify-interval", self.progress_interval]
        if self.netns:
            cmd = ns_argv(self.netns, cmd)
        with open(os.path.join(self.data_dir, "etcd.log"), "a") as log:
            try:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    start_new_session=self.detached,
                )
            except FileNotFoundError:
                raise LabError("starting etcd: not installed (scripts/setup.sh installs etcd-server)") from None

    def healthy(self):
        return healthy(self.endpoint)

    def wait_healthy(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(
                    f"starting etcd {self.name}: it exited with {self.proc.returncode}; see {self.data_dir}/etcd.log"
                )
            if self.healthy():
                return
            time.sleep(0.1)
        raise LabError(
            f"starting etcd {self.name} ({self.endpoint}): not healthy within {timeout:.0f}s; see "
            f"{self.data_dir}/etcd.log"
        )

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
        return subprocess.run(
            ["etcdctl", "--endpoints", self.endpoint, *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            **kw,
        )

    def snapshot(self, path):
        """``etcdctl snapshot save`` of this member's data."""
        self.etcdctl("snapshot", "save", path)

    def restore(self, path, timeout=20):
        """Stop, replace the data with ``etcdctl snapshot restore`` of ``path`` (its revision is older than what
        clients saw), start again on the same ports and socket. One-member servers only."""
        if self.cluster:
            raise LabError("restoring a member of a cluster is not supported here")
        self.stop()
        scratch = tempfile.mkdtemp(prefix="npt-etcd-restore-", dir=os.path.dirname(self.data_dir))
        try:
            restored = os.path.join(scratch, "data")
            env = dict(os.environ, ETCDCTL_API="3")
            subprocess.run(
                [
                    "etcdctl",
                    "snapshot",
                    "restore",
                    path,
                    "--data-dir",
                    restored,
                    "--name",
                    self.name,
                    "--initial-cluster",
                    self.initial_cluster(),
                    "--initial-advertise-peer-urls",
                    self.peer_url,
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            shutil.rmtree(os.path.join(self.data_dir, "member"))
            shutil.move(os.path.join(restored, "member"), os.path.join(self.data_dir, "member"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.start(timeout)

    def enable_auth(self, user="root", password="pw"):
        """Add ``user`` with etcd's root role and turn authentication on: every later client must log in."""
        from netplugin.config import EtcdConfig
        from netplugin.datastore.client import Datastore

        admin = Datastore(EtcdConfig(endpoints=[self.endpoint]))
        admin.call("/auth/user/add", {"name": user, "password": password})
        admin.call("/auth/user/grant", {"user": user, "role": "root"})
        admin.call("/auth/enable", {})

    @property
    def unix_socket(self):
        """etcd names its socket 'etcd.sock:0'; socat reads ':' as a separator, so hand it a symlink."""
        link = os.path.join(self.data_dir, "etcd.sock")
        if not os.path.islink(link):
            os.symlink("etcd.sock:0", link)
        return link

    def bridge_into(self, netns, timeout=10.0):
        """Make ``self.endpoint`` (127.0.0.1:port) work inside ``netns`` too: socat there forwards to our unix
        socket. Waits until the bridge answers; returns its Popen."""
        proc = subprocess.Popen(
            ns_argv(
                netns,
                ["socat", f"TCP-LISTEN:{self.port},bind={HOST},reuseaddr,fork", f"UNIX-CONNECT:{self.unix_socket}"],
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.detached,
        )
        self.bridges.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ns_argv(netns, ["socat", "-u", "OPEN:/dev/null", f"TCP:{HOST}:{self.port}"]), capture_output=True
            )
            if probe.returncode == 0:
                return proc
            time.sleep(0.05)
        raise LabError(f"bridging etcd {self.name} into {netns}: no answer within {timeout:.0f}s")

    def close(self):
        for proc in self.bridges:
            proc.kill()
            proc.wait()
        self.bridges.clear()
        self.stop()
        if self.data_dir and self.own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class EtcdCluster:
    """``size`` members on loopback, started together (a member is healthy only once a quorum is up); or the
    members a lab recorded (``specs``: name, client_port, peer_port, dir)."""

    def __init__(self, size=3, progress_interval=None, token=None, specs=None, detached=False):
        self.token = token or f"npt-{os.getpid()}-{free_port()}"
        specs = specs or [{"name": f"m{i}"} for i in range(1, size + 1)]
        self.members = [
            EtcdServer(
                name=s["name"],
                cluster=self,
                progress_interval=progress_interval,
                port=s.get("client_port"),
                peer_port=s.get("peer_port"),
                data_dir=s.get("dir"),
                detached=detached,
            )
            for s in specs
        ]

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
        raise LabError("no etcd member leads")

    def bridge_into(self, netns):
        for m in self.members:
            m.bridge_into(netns)

    def close(self):
        for m in self.members:
            m.close()


# --- a lab's etcd: recorded in its state file ----------------------------------------------------------------------


def member_specs(data_dir, count):
    """Names, ports and directories of ``count`` members (ports picked now, free at this moment)."""
    return [
        {"name": f"m{i}", "client_port": free_port(), "peer_port": free_port(), "dir": os.path.join(data_dir, f"m{i}")}
        for i in range(1, count + 1)
    ]


def endpoints(members):
    return [f"http://{HOST}:{m['client_port']}" for m in members]


def _lab_cluster(members, token=None):
    return EtcdCluster(specs=members, token=token, progress_interval=LAB_PROGRESS_INTERVAL, detached=True)


def start_lab_cluster(state, members, token, timeout=30.0):
    """Start a lab's members (recording each pid in ``state`` as it starts), then wait until all are healthy."""
    cluster = _lab_cluster(members, token)
    for m in cluster.members:
        m.spawn()
        state.add_process(f"etcd {m.name}", m.proc.pid, _started(m.proc.pid))
    for m in cluster.members:
        m.wait_healthy(timeout)


def bridge_lab_host(state, ns, members):
    """socat in lab namespace ``ns`` for every member, each pid recorded in ``state``."""
    for m in _lab_cluster(members).members:
        proc = m.bridge_into(system.check_ns(ns))
        state.add_process(f"socat {ns} {m.name}", proc.pid, _started(proc.pid), save=False)
    state.save()


def _started(pid):
    for _ in range(50):  # /proc/PID appears with the fork; the start time is there at once, but be patient
        st = system.start_time(pid)
        if st is not None:
            return st
        time.sleep(0.01)
    return None
