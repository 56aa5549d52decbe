"""The lab's etcd: one member or a real three-member cluster, in the root namespace on loopback ports.

Hosts reach it the way tests do (tests/etcd.py): each member also listens on a unix socket, and a ``socat`` in
every host namespace forwards 127.0.0.1:<member's port> to that socket. Every namespace therefore uses the same
etcd URLs as the root namespace, and no link or route into the root namespace is ever made. etcd's data lives on
tmpfs, where fsync costs nothing.
"""
import os
import socket
import time
import urllib.request

from netplugin.lab import system
from netplugin.lab.system import LabError

HOST = "127.0.0.1"


def _free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def member_specs(data_dir, count):
    """Names, ports and directories of ``count`` members (ports picked now, free at this moment)."""
    return [{"name": f"m{i}", "client_port": _free_port(), "peer_port": _free_port(),
             "dir": os.path.join(data_dir, f"m{i}")} for i in range(1, count + 1)]


def endpoints(members):
    return [f"http://{HOST}:{m['client_port']}" for m in members]


def _command(member, members, token):
    cluster = ",".join(f"{m['name']}=http://{HOST}:{m['peer_port']}" for m in members)
    url = f"http://{HOST}:{member['client_port']}"
    return [
        "etcd", "--name", member["name"], "--data-dir", os.path.join(member["dir"], "data"),
        # The unix socket path is relative to the working directory (the member's dir); see socket_path().
        "--listen-client-urls", f"{url},unix://etcd.sock:0", "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://{HOST}:{member['peer_port']}",
        "--initial-advertise-peer-urls", f"http://{HOST}:{member['peer_port']}",
        "--initial-cluster", cluster, "--initial-cluster-state", "new", "--initial-cluster-token", token,
        # Progress notifications every 3 s (etcd's default is 10 min) keep a quiet watch from reaching the agents'
        # read deadline (datastore/watch.py), so they never reconnect for silence.
        "--experimental-watch-progress-notify-interval", "3s",
        "--log-level", "error", "--logger", "zap",
    ]


def start(state, members, token, timeout=30.0):
    """Start every member (recording each pid in ``state`` as it starts), then wait until all are healthy."""
    for m in members:
        os.makedirs(m["dir"], mode=0o700, exist_ok=True)
    for m in members:
        proc = system.spawn(_command(m, members, token), os.path.join(m["dir"], "etcd.log"), cwd=m["dir"])
        state.add_process(f"etcd {m['name']}", proc.pid, _started(proc.pid))
    deadline = time.monotonic() + timeout
    for m, url in zip(members, endpoints(members)):
        while not healthy(url):
            if time.monotonic() > deadline:
                raise LabError(f"starting etcd: member {m['name']} ({url}) not healthy within {timeout:.0f}s; "
                               f"see {m['dir']}/etcd.log")
            time.sleep(0.1)


def _started(pid):
    for _ in range(50):  # /proc/PID appears with the fork; the start time is there at once, but be patient
        st = system.start_time(pid)
        if st is not None:
            return st
        time.sleep(0.01)
    return None


def healthy(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return b'"true"' in r.read()
    except OSError:
        return False


def socket_path(member):
    """etcd names its socket 'etcd.sock:0'; socat reads ':' as a separator, so it gets a symlink without one."""
    link = os.path.join(member["dir"], "etcd.sock")
    if not os.path.islink(link):
        os.symlink("etcd.sock:0", link)
    return link


def bridge_into(state, ns, members, timeout=10.0):
    """socat in ``ns`` for every member: 127.0.0.1:<client port> there reaches the member. Waits until each
    bridge answers."""
    for m in members:
        proc = system.spawn(system.in_ns(ns, [
            "socat", f"TCP-LISTEN:{m['client_port']},bind={HOST},reuseaddr,fork",
            f"UNIX-CONNECT:{socket_path(m)}"]), os.path.join(state.dir, "logs", f"socat-{ns}.log"))
        state.add_process(f"socat {ns} {m['name']}", proc.pid, _started(proc.pid), save=False)
    state.save()
    deadline = time.monotonic() + timeout
    for m in members:
        while True:
            probe = system.run(system.in_ns(ns, ["socat", "-u", "OPEN:/dev/null", f"TCP:{HOST}:{m['client_port']}"]),
                               f"probing the etcd bridge in {ns}", check=False)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise LabError(f"bridging etcd member {m['name']} into {ns}: no answer within {timeout:.0f}s")
            time.sleep(0.05)
