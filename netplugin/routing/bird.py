"""Run BIRD 2 in a network namespace, apply configs safely, and read BGP session status.

Apply order (never a live file edited in place): write the text to a temporary file next to the live one,
check it with ``bird -p -c``, rename it over the live file, then ``birdc configure``. A config BIRD rejects
never reaches the live file, and the running BIRD keeps its old config.

``birdc`` talks to BIRD over its unix control socket, which lives in the filesystem, not in a network
namespace, so only ``bird`` itself is started inside the namespace.
"""

import logging
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from netplugin.errors import DataplaneError, InvalidInput, NamespaceNotFound
from netplugin.kernel.netlink import netlink
from netplugin.kernel.netns import command_prefix
from netplugin.routing.constants import BIRD_PROTO, MAIN_TABLE
from netplugin.routing.bird_config import PEER_GLOBAL, PEER_MESH, PEER_NODE, PEER_RR, PEER_RR_CLIENT

log = logging.getLogger(__name__)

CONF_NAME = "bird.conf"
SOCK_NAME = "bird.ctl"
PID_NAME = "bird.pid"
LOG_NAME = "bird.log"
_RECONFIGURED = ("Reconfigured", "Reconfiguration in progress", "queueing new config")
_CMD_TIMEOUT = 15
_SUN_PATH_MAX = 107  # a unix socket path must fit sockaddr_un.sun_path with its NUL


class BirdError(DataplaneError):
    """BIRD could not be started, stopped or reached, or refused a command."""


def _run(args, what, timeout=_CMD_TIMEOUT):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise BirdError(f"{what}: {args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise BirdError(f"{what}: {' '.join(args)} did not finish within {timeout}s") from None


def check_config(path, bird="bird"):
    """Parse a config file with ``bird -p``; InvalidInput with BIRD's message (and the lines around it) if bad."""
    p = _run([bird, "-p", "-c", path], f"checking BIRD config {path}")
    if p.returncode == 0:
        return
    msg = (p.stderr.strip() or p.stdout.strip() or f"bird -p exited with {p.returncode}").splitlines()[-1]
    msg = re.sub(r"^bird: ", "", msg)
    raise InvalidInput(f"BIRD rejected config {path}: {msg}", details=_context(path, msg))


def _context(path, msg, around=3):
    """The numbered lines around the line BIRD complains about, for the operator's log."""
    m = re.search(r":(\d+):\d+ ", msg)
    if not m:
        return ""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    n = int(m.group(1))
    return "\n".join(
        f"{i:5d}{'>' if i == n else ' '} {lines[i - 1]}"
        for i in range(max(1, n - around), min(len(lines), n + around) + 1)
    )


def birdc(sock, *command, birdc_bin="birdc", timeout=_CMD_TIMEOUT):
    """One birdc command; returns its output without the greeting. BirdError if BIRD cannot be reached."""
    what = f"running 'birdc {' '.join(command)}' on {sock}"
    p = _run([birdc_bin, "-s", sock, *command], what, timeout)
    out = p.stdout
    if "Unable to connect to server control socket" in out + p.stderr:
        raise BirdError(f"{what}: BIRD is not running (cannot connect to its control socket)")
    lines = [line for line in out.splitlines() if not re.match(r"^BIRD [\w.\-]+ ready\.$", line)]
    if p.returncode != 0:
        raise BirdError(f"{what}: {' '.join(lines).strip() or p.stderr.strip() or p.returncode}")
    return "\n".join(lines)


def _ns_prefix(netns, what):
    """Command prefix running a program in ``netns`` (a name under /run/netns or a path), or none for None."""
    try:
        return command_prefix(netns)
    except NamespaceNotFound:
        raise BirdError(f"{what}: network namespace {netns} does not exist") from None


class BirdProcess:
    """One BIRD daemon: config, control socket, pid file and log under ``run_dir``.

    ``netns`` is required on purpose: a namespace name (``ip netns``), a path such as /proc/PID/ns/net, or an
    explicit None for "the namespace this process runs in". A forgotten argument must not silently mean the
    host's namespace.
    """

    def __init__(self, run_dir, netns, bird="bird", birdc="birdc"):
        self.run_dir = os.path.abspath(run_dir)
        self.netns = netns
        self.bird_bin = bird
        self.birdc_bin = birdc
        self.conf_path = os.path.join(self.run_dir, CONF_NAME)
        self.sock_path = os.path.join(self.run_dir, SOCK_NAME)
        self.pid_path = os.path.join(self.run_dir, PID_NAME)
        self.log_path = os.path.join(self.run_dir, LOG_NAME)
        self._proc = None

    def birdc(self, *command, timeout=_CMD_TIMEOUT):
        return birdc(self.sock_path, *command, birdc_bin=self.birdc_bin, timeout=timeout)

    def running(self):
        """True when a BIRD answers on our control socket."""
        if not os.path.exists(self.sock_path):
            return False
        try:
            self.birdc("show", "status", timeout=5)
            return True
        except BirdError:
            return False

    def left_routes(self):
        """True when the kernel of our namespace holds routes a BIRD wrote (``proto bird``): a BIRD was killed
        or stopped with ``birdc graceful restart`` and its forwarding state is still in place."""
        what = f"reading BIRD's routes in {self.netns or 'this namespace'}"
        try:
            with netlink(self.netns) as nl:
                return any(
                    nl.routes(family=family, table=MAIN_TABLE, proto=BIRD_PROTO)
                    for family in (socket.AF_INET, socket.AF_INET6)
                )
        except NamespaceNotFound:
            raise BirdError(f"{what}: network namespace {self.netns} does not exist") from None
        except DataplaneError as e:
            raise BirdError(f"{what}: {e.msg}") from None

    def start(self, timeout=10.0, recover=None):
        """Start BIRD with the config at ``conf_path`` and wait until it answers; a running BIRD is kept.

        ``recover`` starts it in graceful restart recovery (``bird -R``): it keeps the kernel routes it finds until
        its sessions are back, and tells its peers it kept forwarding. None means: when ``left_routes()``. A fresh
        BIRD must not recover: it would hold back every kernel route for ``graceful restart wait`` seconds
        whenever one configured peer is down.
        """
        if self.running():
            return
        if not os.path.exists(self.conf_path):
            raise BirdError(f"starting BIRD: no config at {self.conf_path}; apply one first")
        if len(self.sock_path.encode()) > _SUN_PATH_MAX:
            raise BirdError(
                f"starting BIRD: control socket path {self.sock_path} is longer than "
                f"{_SUN_PATH_MAX} bytes; use a shorter run directory"
            )
        check_config(self.conf_path, self.bird_bin)
        if recover is None:
            recover = self.left_routes()
        cmd = _ns_prefix(self.netns, "starting BIRD") + [
            self.bird_bin,
            "-f",
            "-c",
            self.conf_path,
            "-s",
            self.sock_path,
            "-P",
            self.pid_path,
        ]
        if recover:
            cmd.append("-R")
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            # Own session: signals meant for the agent's process group do not take BIRD down with it.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise BirdError(f"starting BIRD in {self.netns or 'this namespace'} failed: {self._log_tail()}")
            if self.running():
                log.info(
                    "BIRD started (pid %s) in %s%s",
                    self._proc.pid,
                    self.netns or "this namespace",
                    " in graceful restart recovery" if recover else "",
                )
                return
            time.sleep(0.05)
        self.stop()
        raise BirdError(f"starting BIRD: no answer on {self.sock_path} within {timeout}s: {self._log_tail()}")

    def pid(self):
        """BIRD's pid from our child or from the pid file (a BIRD started by an earlier agent), or None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        # Only a BIRD using our socket: a reused pid must never be signalled.
        if os.path.basename(argv[0]) == os.path.basename(self.bird_bin).encode() and self.sock_path.encode() in argv:
            return pid
        return None

    def stop(self, timeout=5.0):
        """Stop BIRD (TERM, then KILL after ``timeout``); idempotent. BIRD withdraws its kernel routes."""
        pid = self.pid()
        if pid is not None:
            self._signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._alive(pid):
                time.sleep(0.05)
            if self._alive(pid):
                log.warning("BIRD (pid %s) ignored SIGTERM for %ss; killing it", pid, timeout)
                self._signal(pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self._alive(pid):
                    time.sleep(0.05)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        for path in (self.sock_path, self.pid_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _alive(self, pid):
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        return os.path.exists(f"/proc/{pid}") and not _is_zombie(pid)

    @staticmethod
    def _signal(pid, sig):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _log_tail(self, n=5):
        try:
            with open(self.log_path, errors="replace") as f:
                return " | ".join(f.read().splitlines()[-n:]) or "(empty log)"
        except OSError:
            return "(no log)"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class BirdConfigWriter:
    """Applies rendered config text to a BirdProcess: check, atomic rename, reload; one apply at a time."""

    def __init__(self, bird):
        self.bird = bird
        self._lock = threading.Lock()

    def apply(self, text):
        """Make ``text`` BIRD's config. Returns False when it already was. Raises InvalidInput (old config
        kept, live file untouched) when BIRD rejects it, BirdError when a running BIRD fails to reload."""
        with self._lock:
            old = _read(self.bird.conf_path)
            if old == text:
                return False
            os.makedirs(self.bird.run_dir, mode=0o700, exist_ok=True)
            tmp = _write_temp(self.bird.run_dir, text)
            try:
                check_config(tmp, self.bird.bird_bin)
                os.replace(tmp, self.bird.conf_path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            if not self.bird.running():
                log.info("BIRD config written to %s (BIRD not running)", self.bird.conf_path)
                return True
            try:
                reply = self.bird.birdc("configure")
                if not any(ok in reply for ok in _RECONFIGURED):
                    raise BirdError(f"reloading BIRD config {self.bird.conf_path}: {' '.join(reply.split())}")
            except BirdError:
                # Keep the file equal to what BIRD runs, so the next apply retries the change.
                if old is None:
                    os.unlink(self.bird.conf_path)
                else:
                    os.replace(_write_temp(self.bird.run_dir, old), self.bird.conf_path)
                raise
            log.info("BIRD reconfigured from %s", self.bird.conf_path)
            return True


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_temp(directory, text):
    """A new file holding ``text``, mode 0600 from its creation (mkstemp), never widened: BIRD's config holds
    BGP passwords, and BIRD runs as root. The rename keeps the mode, so the live file is 0600 too."""
    fd, tmp = tempfile.mkstemp(prefix=f".{CONF_NAME}.", dir=directory)
    try:
        os.fchmod(fd, 0o600)  # mkstemp's mode already; said explicitly, before any content is written
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


# --- status -------------------------------------------------------------------------------------------------

_PREFIX_TYPES = (("mesh", PEER_MESH), ("rrc", PEER_RR_CLIENT), ("rr", PEER_RR), ("peer", PEER_GLOBAL))
_KNOWN_TYPES = (PEER_MESH, PEER_RR, PEER_RR_CLIENT, PEER_GLOBAL, PEER_NODE)
_HEADER = re.compile(
    r"^(?P<name>\S+)\s+(?P<proto>\S+)\s+(?P<table>\S+)\s+(?P<state>\S+)\s+"
    r"(?P<since>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\S+)\s*(?P<info>.*?)\s*$"
)


@dataclass(frozen=True)
class BgpStatusRow:
    """One BGP session as `netctl node status` shows it."""

    name: str
    peer_address: str
    peer_type: str
    state: str  # BGP state: Established, Active, Connect, Idle, OpenSent, OpenConfirm, Down
    since: str
    info: str  # protocol state, neighbor AS and the last error, if any
    proto_state: str = ""
    neighbor_as: str = ""
    last_error: str = ""


def parse_protocols(text):
    """BgpStatusRows from ``show protocols all`` output (other protocols skipped), sorted by peer address."""
    rows, cur = [], None

    def finish():
        if cur is None or cur["proto"] != "BGP":
            return
        desc = cur["attrs"].get("Description", "")
        peer_type = desc.split(":", 1)[0] if desc.split(":", 1)[0] in _KNOWN_TYPES else _type_from_name(cur["name"])
        state = cur["attrs"].get("BGP state", cur["info"].split(" ")[0] if cur["info"] else "")
        info = [cur["state"]]
        if cur["attrs"].get("Neighbor AS"):
            info.append(f"AS {cur['attrs']['Neighbor AS']}")
        if cur["attrs"].get("Last error"):
            info.append(cur["attrs"]["Last error"])
        rows.append(
            BgpStatusRow(
                name=cur["name"],
                peer_address=cur["attrs"].get("Neighbor address", ""),
                peer_type=peer_type,
                state=state,
                since=cur["since"],
                info=", ".join(info),
                proto_state=cur["state"],
                neighbor_as=cur["attrs"].get("Neighbor AS", ""),
                last_error=cur["attrs"].get("Last error", ""),
            )
        )

    for line in text.splitlines():
        if not line.strip() or line.startswith("Name ") or re.match(r"^BIRD \S+ ready\.", line):
            continue
        if not line[0].isspace():
            finish()
            m = _HEADER.match(line)
            cur = m.groupdict() if m else None
            if cur is not None:
                cur["attrs"] = {}
            continue
        if cur is not None and ":" in line:
            key, value = line.strip().split(":", 1)
            cur["attrs"].setdefault(key.strip(), value.strip())
    finish()
    return sorted(rows, key=lambda r: (r.peer_address, r.name))


def _type_from_name(name):
    for prefix, peer_type in _PREFIX_TYPES:
        if re.match(rf"^{prefix}6?_", name):
            return peer_type
    return "unknown"


def bgp_status(sock, birdc_bin="birdc"):
    """The BGP sessions of the BIRD behind control socket ``sock``."""
    return parse_protocols(birdc(sock, "show", "protocols", "all", birdc_bin=birdc_bin))
