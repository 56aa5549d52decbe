"""A lab's "containers": namespaces wired by the real CNI binary exactly as a runtime calls it, and what runs
in them (exec, ping, the ping matrix). A mixin of ``Lab``, which owns ``plan``, ``state`` and ``name``.

A container may join another CNI network than the lab's own (``network``): the conflist is the host's, with
that network's name, which is all the plugin reads it from.
"""

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from netplugin.errors import InvalidInput
from netplugin.lab import system
from netplugin.lab.plan import check_container_name
from netplugin.lab.state import LabState, locked
from netplugin.lab.system import LabError
from netplugin.lab.topology import CNI_NETWORK


class Containers:
    def containers(self):
        return dict(self.state.data["containers"])

    def container(self, name):
        try:
            return self.state.data["containers"][name]
        except KeyError:
            raise LabError(f"lab {self.name} has no container {name!r}") from None

    def run_container(self, host_name, name, ip=None, labels=None, network=CNI_NETWORK):
        """A "container" (a namespace) on ``host_name`` wired by the real CNI binary (ADD), exactly as a runtime
        would call it, on CNI network ``network``. Returns its record: name, host, netns, ip, labels, network.
        Nothing is left behind on failure."""
        check_container_name(name)
        h = self.plan.host(host_name)
        if self.state.data["hosts"].get(h.name, {}).get("killed"):
            raise LabError(f"starting container {name}: host {host_name} was killed")
        labels = dict(labels or {})
        for k, v in labels.items():
            if not k or not isinstance(v, str):
                raise InvalidInput(f"invalid label {k!r}={v!r}")
        ns = self.plan.container_namespace(name)
        with locked(self.plan.state_dir, f"starting container {name}"):
            self.state.data = LabState.load(self.state.dir, self.name).data  # another command may have added one
            if name in self.state.data["containers"]:
                raise LabError(f"container {name} already exists on {self.state.data['containers'][name]['host']}")
            rec = {
                "name": name,
                "host": h.name,
                "netns": ns,
                "container_id": f"{self.name}-{name}",
                "ip": None,
                "labels": labels,
                "network": network,
                "created": time.time(),
            }
            self.state.data["containers"][name] = rec
            self.state.add_namespace(ns)
            try:
                system.add_netns(ns)
                result = self._cni(h, "ADD", rec, ip=ip)
                rec["ip"] = result["ips"][0]["address"].split("/")[0]
                rec["mac"] = (result.get("interfaces") or [{}])[-1].get("mac")
                self.state.save()
            except BaseException:
                try:
                    self._cni(h, "DEL", rec, check=False)
                finally:
                    system.delete_netns(ns)
                    self.state.data["containers"].pop(name, None)
                    self.state.forget_namespace(ns)
                raise
        return dict(rec)

    def remove_container(self, name):
        """CNI DEL, then the namespace goes. Idempotent for a container the state knows."""
        with locked(self.plan.state_dir, f"removing container {name}"):
            self.state.data = LabState.load(self.state.dir, self.name).data
            rec = self.container(name)
            h = self.plan.host(rec["host"])
            if not self.state.data["hosts"].get(h.name, {}).get("killed"):
                self._cni(h, "DEL", rec)
            system.delete_netns(rec["netns"])
            del self.state.data["containers"][name]
            self.state.forget_namespace(rec["netns"])

    def _cni(self, h, command, rec, ip=None, check=True):
        with open(os.path.join(h.conf_dir, f"10-{CNI_NETWORK}.conflist")) as f:
            conflist = json.load(f)
        conf = dict(conflist["plugins"][0], cniVersion=conflist["cniVersion"], name=rec.get("network", CNI_NETWORK))
        if rec["labels"]:
            conf["args"] = {"labels": rec["labels"]}
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": rec["container_id"],
            "CNI_NETNS": f"/run/netns/{rec['netns']}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": self.plan.cni_bin_dir,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        if ip:
            env["CNI_ARGS"] = f"IP={ip}"
        # The runtime runs the plugin in the host's namespace; it forwards to the agent's unix socket.
        p = system.run(
            system.in_ns(h.namespace, [os.path.join(self.plan.cni_bin_dir, "netplugin")]),
            f"CNI {command} of {rec['name']} on {h.name}",
            check=False,
            input=json.dumps(conf),
            env=env,
        )
        out = {}
        if p.stdout.strip():
            try:
                out = json.loads(p.stdout)
            except ValueError:
                out = {"msg": p.stdout.strip()}
        if check and p.returncode != 0:
            msg = out.get("msg") or p.stderr.strip() or f"exit status {p.returncode}"
            details = f" ({out['details']})" if out.get("details") else ""
            raise LabError(f"CNI {command} of container {rec['name']} on {h.name} failed: {msg}{details}")
        return out

    def exec(self, name, argv, capture=True, timeout=60):
        """Run ``argv`` inside container ``name``; the CompletedProcess (never raises on a non-zero exit)."""
        rec = self.container(name)
        cmd = system.in_ns(rec["netns"], argv)
        if capture:
            return system.run(cmd, f"running {argv[0]} in {name}", check=False, timeout=timeout)
        return subprocess.run(cmd)

    def ping(self, src, address, timeout=1):
        """One echo from container ``src`` to ``address``; True when answered."""
        return self.exec(src, ["ping", "-c", "1", "-W", str(timeout), "-q", address]).returncode == 0

    def ping_matrix(self, names=None, timeout=1):
        """{(src, dst): reachable} for every ordered pair of containers, pinged in parallel."""
        names = sorted(names or self.state.data["containers"])
        pairs = [(s, d) for s in names for d in names if s != d]
        with ThreadPoolExecutor(max_workers=8) as pool:
            ok = list(pool.map(lambda p: self.ping(p[0], self.container(p[1])["ip"], timeout), pairs))
        return dict(zip(pairs, ok))

    def wait_reachable(self, names=None, timeout=30):
        """Poll until every container reaches every other; the matrix of the last round."""
        deadline = time.monotonic() + timeout
        while True:
            matrix = self.ping_matrix(names)
            if all(matrix.values()) or time.monotonic() > deadline:
                return matrix
            time.sleep(0.2)
