"""Gather one host's diagnostics into a directory, then a tarball (as ``calicoctl node diags`` does).

Each part is one file; a part that cannot be had (etcd down, BIRD not running, no log) becomes a line in
``errors.txt`` instead, so one broken piece never costs the rest. Commands run in the host's namespace (or the
one given, for tests) through the one namespace runner; BIRD's control socket and the agent's socket are files in
its run directory. Everything is written to a private temporary directory and scrubbed of secrets (redact.py)
before it is packed.
"""

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version

from netplugin.diags.health import agent_health
from netplugin.diags.redact import redact_bird_config, redact_json, scrub
from netplugin.errors import NetpluginError
from netplugin.kernel.netns import NamespaceCommand, own_netns

ETCD_PREFIX = "/netplugin/v1/"
UNIT = "netplugin.service"
HOST_COMMANDS = {  # part -> command run in the host namespace
    "iptables-save.txt": ["iptables-save"],
    "ip6tables-save.txt": ["ip6tables-save"],
    "ipset-list.txt": ["ipset", "list"],
    "ip-addr.txt": ["ip", "-d", "addr"],
    "ip-link.txt": ["ip", "-d", "-s", "link"],
    "ip-route-4.txt": ["ip", "-4", "route", "show", "table", "all"],
    "ip-route-6.txt": ["ip", "-6", "route", "show", "table", "all"],
    "ip-rule-4.txt": ["ip", "-4", "rule"],
    "ip-rule-6.txt": ["ip", "-6", "rule"],
}
# Run in the host's namespace by the one namespace runner: print the body of a URL (exit 1 on failure).
_FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
VERSIONS = {
    "bird": ["bird", "--version"],
    "iptables": ["iptables", "-V"],
    "ipset": ["ipset", "version"],
    "iproute2": ["ip", "-V"],
}


class Collector:
    """Parts of one host's diagnostics, kept in memory until ``write``; secrets are scrubbed on the way out."""

    def __init__(self, netns=None, secrets=()):
        self.ns = NamespaceCommand(netns or own_netns(), allow_host_namespace=netns is None)
        self.parts = {}
        self.errors = []
        self.secrets = {s for s in secrets if s}

    def add(self, name, make):
        """Part ``name`` is ``make()`` (text); a failure is recorded in errors.txt instead."""
        try:
            self.parts[name] = make()
        except (NetpluginError, OSError, subprocess.SubprocessError) as e:
            self.errors.append(f"{name}: {getattr(e, 'msg', None) or e}")

    def command(self, name, argv):
        self.add(name, lambda: self._run(argv))

    def _run(self, argv):
        proc = self.ns.run(argv, check=False, what=f"run {' '.join(argv)}")
        if proc.returncode != 0:
            raise NetpluginError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[:500]}")
        return proc.stdout

    def etcd(self, ds):
        def dump():
            kvs = ds.list(ETCD_PREFIX)
            doc = {kv.key: redact_json(kv.value, self.secrets) for kv in kvs}
            return json.dumps(doc, indent=2, sort_keys=True) + "\n"

        self.add("etcd.json", dump)

    def bird(self, run_dir):
        """BIRD's sessions and config; the agent runs it in ``<run_dir>/bird`` (agent/routing.py)."""
        from netplugin.routing.bird import CONF_NAME, SOCK_NAME, birdc

        bird_dir = os.path.join(run_dir, "bird")
        self.add("bird-protocols.txt", lambda: birdc(os.path.join(bird_dir, SOCK_NAME), "show", "protocols", "all"))

        def config():
            with open(os.path.join(bird_dir, CONF_NAME)) as f:
                return redact_bird_config(f.read(), self.secrets)

        self.add("bird.conf", config)

    def health(self, run_dir):
        """The agent's health answer and, when it names a metrics listener (``--metrics-listen``), a snapshot
        of ``/metrics`` fetched from inside the host's namespace (the listener may be bound to an address only
        that namespace reaches)."""
        answer = {}

        def health():
            answer.update(agent_health(run_dir))
            return json.dumps(redact_json(answer, self.secrets), indent=2) + "\n"

        self.add("health.json", health)
        listen = answer.get("metrics_listen")
        if listen:
            self.add("metrics.txt", lambda: self._run([sys.executable, "-c", _FETCH, f"http://{listen}/metrics"]))

    def logs(self, log_file, use_journal):
        if log_file:
            self.add("agent.log", lambda: open(log_file, errors="replace").read())
        elif use_journal:
            self.command("agent.log", ["journalctl", "-u", UNIT, "--no-pager", "-o", "short-iso", "-n", "20000"])
        else:
            self.errors.append("agent.log: no journal (systemd is not running) and no --log-file given")

    def versions(self):
        lines = [
            f"netplugin {version('netplugin')}",
            f"python {platform.python_version()}",
            f"kernel {' '.join(platform.uname()[2:4])}",
        ]
        for name, argv in VERSIONS.items():
            try:
                out = self._run(argv)
                lines.append(f"{name}: {out.strip().splitlines()[0] if out.strip() else '?'}")
            except NetpluginError as e:
                lines.append(f"{name}: unknown ({e.msg})")
        self.parts["versions.txt"] = "\n".join(lines) + "\n"

    def write(self, path, top):
        """The tarball at ``path`` (mode 0600), every part under directory ``top``; returns the part names."""
        parts = dict(self.parts)
        if self.errors:
            parts["errors.txt"] = "\n".join(self.errors) + "\n"
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".diags.")
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
                now = time.time()
                for name in sorted(parts):
                    data = scrub(parts[name], self.secrets).encode()
                    info = tarfile.TarInfo(f"{top}/{name}")
                    info.size, info.mtime, info.mode = len(data), now, 0o600
                    tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return sorted(parts)
