"""A real dockerd (Debian's docker.io) per test or benchmark host namespace, and a busybox image made offline.

Each daemon runs in the host's network namespace (``nsenter --net``: ``ip netns exec`` would remount /sys and
break dockerd's cgroup handling) and in a private mount namespace where a per-daemon directory is bound over
/etc/docker (and an empty one over /run/docker/plugins, if that exists), so plugin discovery finds *this*
host's ``netplugin`` spec file, keeps the driver's real name, and dockerd's key.json stays out of /etc. The
mount namespace is held by a sleeping process, so it survives dockerd restarts as a real host's would.
Data root, exec root, its own containerd and the API socket all live in one temporary directory.

Cleanup never depends on dockerd being healthy: containers are removed through the API, then dockerd is
stopped by pid, then any process still running from our exec root (containerd shims kept alive by
``--live-restore``) is killed by pid, and the directory removed.
"""

import os
import shutil
import subprocess
import tarfile
import tempfile
import time

from netplugin.lab.netns import CommandFailed, kill_pids, stop_process

DOCKER = "/usr/bin/docker"  # Debian's CLI, the one that matches the daemon (another may sit in /usr/local/bin)
DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"  # Debian's busybox-static
IMAGE = "npt-busybox:1"
APPLETS = (
    "sh",
    "ping",
    "ping6",
    "ip",
    "sleep",
    "cat",
    "echo",
    "true",
    "false",
    "nc",
    "wget",
    "ifconfig",
    "route",
    "hostname",
    "ls",
    "ps",
    "grep",
    "timeout",
    "arping",
    "usleep",
)


def busybox_tar(path):
    """A root filesystem holding static busybox and the applets the tests use, as a tar for ``docker import``."""
    if not os.path.exists(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} is missing: install the Debian package busybox-static (scripts/setup.sh)")
    with tarfile.open(path, "w") as tar:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, "bin/busybox")
        for name in APPLETS:
            info = tarfile.TarInfo(f"bin/{name}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    return path


class DockerDaemon:
    """dockerd inside ``netns`` with its own directories; ``plugin_url`` (unix:///...) becomes driver 'netplugin'."""

    def __init__(self, netns, plugin_url=None, bridge=False, live_restore=True, workdir=None):
        self.netns = netns
        self.plugin_url = plugin_url
        self.bridge = bridge
        self.live_restore = live_restore
        self.dir = workdir or tempfile.mkdtemp(prefix="npt-dockerd-", dir="/var/tmp")
        os.makedirs(self.dir, exist_ok=True)
        self.etc = os.path.join(self.dir, "etc")
        self.exec_root = os.path.join(self.dir, "exec")
        self.data_root = os.path.join(self.dir, "data")
        self.socket = os.path.join(self.dir, "docker.sock")
        self.pidfile = os.path.join(self.dir, "docker.pid")
        self.log_path = os.path.join(self.dir, "dockerd.log")
        self.proc = None
        self.holder = None  # the process that keeps dockerd's mount namespace
        self._image_ready = False

    # --- life cycle -----------------------------------------------------------------------------------------------

    def _start_mount_holder(self):
        """A sleeping process owning the daemon's private mount namespace, so it outlives dockerd restarts: the
        sandboxes' netns bind mounts live there, and a restarted dockerd must find them (live-restore)."""
        binds = [f"mount --bind {self.etc} /etc/docker"]
        if os.path.isdir("/run/docker/plugins"):
            empty = os.path.join(self.dir, "no-plugins")
            os.makedirs(empty, exist_ok=True)
            binds.append(f"mount --bind {empty} /run/docker/plugins")
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", " && ".join(binds + ["exec sleep 86400"])],
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not self._holder_ready():
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("could not make a private mount namespace for dockerd (unshare -m)")
            time.sleep(0.02)

    def _holder_ready(self):
        """Its own mount namespace, with our directory bound over /etc/docker (seen through /proc/PID/root)."""
        try:
            return os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != os.readlink(
                "/proc/self/ns/mnt"
            ) and os.path.samefile(
                f"/proc/{self.holder.pid}/root/etc/docker/plugins", os.path.join(self.etc, "plugins")
            )
        except OSError:
            return False

    def _command(self):
        args = [
            DOCKERD,
            "--data-root",
            self.data_root,
            "--exec-root",
            self.exec_root,
            "-H",
            f"unix://{self.socket}",
            "--pidfile",
            self.pidfile,
            "--iptables=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            "--log-level",
            os.environ.get("NPT_DOCKERD_LOG", "info"),  # "debug" to see libnetwork's steps
            "--bridge",
            "docker0" if self.bridge else "none",
            "--exec-opt",
            "native.cgroupdriver=cgroupfs",
        ]
        if self.live_restore:
            args.append("--live-restore")
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", f"--net=/run/netns/{self.netns}"] + args

    def start(self, timeout=40):
        os.makedirs(os.path.join(self.etc, "plugins"), exist_ok=True)
        for d in (self.exec_root, self.data_root):
            os.makedirs(d, exist_ok=True)
        if not os.path.isdir("/etc/docker"):
            raise RuntimeError("/etc/docker is missing: is the Debian package docker.io installed?")
        spec = os.path.join(self.etc, "plugins", "netplugin.spec")
        if self.plugin_url:
            with open(spec, "w") as f:
                f.write(self.plugin_url + "\n")
        if self.holder is None or self.holder.poll() is not None:
            self._start_mount_holder()
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n{self.log()}")
            if (
                os.path.exists(self.socket)
                and self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=5).returncode == 0
            ):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"dockerd did not answer within {timeout}s:\n{self.log()}")

    def stop(self, timeout=20):
        """SIGTERM dockerd and wait; with --live-restore its containers keep running."""
        if self.proc is None:
            return
        stop_process(self.proc, timeout=timeout)
        self.proc = None

    def restart(self):
        self.stop()
        self.start()

    def close(self):
        """Remove every container, stop dockerd, kill leftovers of our exec root by pid, remove the directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                ids = self.docker("ps", "-aq", check=False, timeout=20).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False, timeout=60)
                nets = self.docker(
                    "network", "ls", "-q", "--filter", "driver=netplugin", check=False, timeout=20
                ).stdout.split()
                for net in nets:
                    self.docker("network", "rm", net, check=False, timeout=30)
        finally:
            self.stop()
            self._kill_containers()
            self._kill_leftovers()
            if self.holder is not None:
                self.holder.kill()
                self.holder.wait()
                self.holder = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def _container_ids(self):
        try:
            return [d for d in os.listdir(os.path.join(self.data_root, "containers")) if len(d) == 64]
        except OSError:
            return []

    def _kill_containers(self):
        """Backstop when dockerd could not remove them (it died first): kill the processes of our containers,
        found by their cgroup ``.../docker/<id>``, then remove the emptied cgroups."""
        ids = self._container_ids()
        if not ids:
            return
        marks = [f"/docker/{cid}" for cid in ids]
        for _ in range(20):
            pids = []
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/cgroup") as f:
                        text = f.read()
                except OSError:
                    continue
                if any(m in text for m in marks):
                    pids.append(int(entry))
            if not pids:
                break
            kill_pids(pids)
            time.sleep(0.1)
        for cid in ids:
            for hierarchy in os.listdir("/sys/fs/cgroup"):
                path = os.path.join("/sys/fs/cgroup", hierarchy, "docker", cid)
                if os.path.isdir(path):
                    try:
                        os.rmdir(path)
                    except OSError:
                        pass

    def _kill_leftovers(self):
        """Processes started from this daemon's directories (shims, containerd): found by path, killed by pid."""
        marker = self.dir.encode()
        for _ in range(20):
            pids = []
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == os.getpid():
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if marker in f.read():
                            pids.append(int(entry))
                except OSError:
                    continue
            if not pids:
                return
            kill_pids(pids)
            time.sleep(0.1)

    # --- client ---------------------------------------------------------------------------------------------------

    def docker(self, *args, check=True, timeout=60, input=None):
        p = subprocess.run(
            [DOCKER, "-H", f"unix://{self.socket}"] + [str(a) for a in args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and p.returncode != 0:
            raise CommandFailed(f"docker {' '.join(map(str, args))} -> rc={p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def ensure_image(self):
        """Import the busybox image once per daemon (offline: no registry)."""
        if self._image_ready:
            return IMAGE
        tar = busybox_tar(os.path.join(self.dir, "busybox.tar"))
        self.docker("import", tar, IMAGE, timeout=60)
        self._image_ready = True
        return IMAGE

    def log(self, tail=6000):
        try:
            with open(self.log_path) as f:
                return f.read()[-tail:]
        except OSError:
            return ""


class DockerHost:
    """One test host: a netplugin agent serving the Docker plugin, and a dockerd using it, in namespace ``ns``.

    Both keep their files under one short directory (unix socket paths are limited to 107 bytes). ``close``
    removes the containers while the agent still runs (so Docker releases their addresses through it), then
    stops dockerd and the agent.
    """

    def __init__(self, ns, etcd_endpoint, agent_args=(), bridge=False, live_restore=True):
        from netplugin.lab.agents import AgentProcess

        self.ns = ns
        self.dir = tempfile.mkdtemp(prefix="npt-dh-", dir="/var/tmp")
        self.plugin_socket = os.path.join(self.dir, "plugin.sock")
        self.dockerd = DockerDaemon(
            ns,
            plugin_url=f"unix://{self.plugin_socket}",
            bridge=bridge,
            live_restore=live_restore,
            workdir=os.path.join(self.dir, "docker"),
        )
        self.agent = AgentProcess(
            ns,
            ns,
            etcd_endpoint,
            os.path.join(self.dir, "agent"),
            extra_args=["--docker-socket", self.plugin_socket, "--docker-api", self.dockerd.socket] + list(agent_args),
        )

    @property
    def name(self):
        return self.ns

    def start(self):
        self.start_agent()
        self.dockerd.start()
        self.dockerd.ensure_image()
        return self

    def start_agent(self):
        if os.path.exists(self.plugin_socket):
            os.unlink(self.plugin_socket)  # left by a previous run: wait for the new one below
        self.agent.start()
        deadline = time.monotonic() + 10
        while not os.path.exists(self.plugin_socket):  # served right after the CNI socket
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent did not serve {self.plugin_socket}:\n{self.agent.log()}")
            time.sleep(0.05)

    def restart_agent(self):
        self.agent.stop()
        self.start_agent()

    def docker(self, *args, **kw):
        return self.dockerd.docker(*args, **kw)

    def close(self):
        try:
            self.dockerd.close()
        finally:
            self.agent.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
