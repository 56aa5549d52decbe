"""Remove the kernel state an agent leaves in its host namespace, for ``netctl uninstall``.

Each kind of state goes through the module that owns it: netfilter chains through the one table writer (asked
to remove our ``np-`` chains and our hook rules in built-in chains, nothing else, and on nf_tables a table
left wholly empty), ipsets through the ipset writer (our ``np-`` sets, after the rules using them are gone),
routes carrying our protocol numbers (dataplane and direct mode) through the netlink layer, our endpoint veths
(only when asked: they carry running containers) and the BPF pins under the agent's bpffs directory. Run it
after the agent stopped, or the agent puts everything back.
"""

import errno
import os
import shutil
import socket

from netplugin.dataplane.model import is_host_ifname
from netplugin.kernel.ipset import Ipsets
from netplugin.kernel.netfilter import BUILTINS, NetfilterTable
from netplugin.kernel.netlink import netlink
from netplugin.kernel.netns import NamespaceCommand, own_netns
from netplugin.kernel.rtnl import Batch
from netplugin.routing.constants import DIRECT_PROTO, MAIN_TABLE, ROUTE_PROTO

OUR_PROTOS = (ROUTE_PROTO, DIRECT_PROTO)
DEFAULT_BPFFS_DIR = "/sys/fs/bpf/netplugin"


def remove_kernel_state(netns=None, bpffs_dir=DEFAULT_BPFFS_DIR, remove_endpoints=False):
    """Remove our state from ``netns`` (None: the namespace this runs in, the host's); returns lines saying what."""
    ns = NamespaceCommand(netns or own_netns(), allow_host_namespace=netns is None)
    done = []
    for family in (4, 6):
        for table in BUILTINS:
            plan = NetfilterTable(ns, family, table=table).remove_ours()
            if not plan.empty():
                done.append(
                    f"iptables {table} (IPv{family}): removed {len(plan.stale)} chains and {len(plan.hook_del)}"
                    " hook rules"
                )
    sets = Ipsets(ns)
    plan = sets.plan({}, sets.read())
    lines = [f"destroy {name}" for name in plan.stale]  # temporary sets too: nothing of ours stays
    sets.restore(lines, "destroy our ipsets")
    if lines:
        done.append(f"ipsets: destroyed {', '.join(plan.stale)}")
    with netlink(netns) as nl:
        if remove_endpoints:
            batch = Batch()
            names = []
            for link in nl.links():
                name = link.get("ifname")
                if is_host_ifname(name):
                    batch.link_del(f"delete link {name}", index=link["index"])
                    names.append(name)
            nl.run(batch)
            if names:
                done.append(f"links: deleted {', '.join(names)}")
        batch = Batch()
        for proto in OUR_PROTOS:
            for msg in nl.routes(family=socket.AF_UNSPEC, table=MAIN_TABLE, proto=proto):
                if msg["family"] not in (socket.AF_INET, socket.AF_INET6) or msg["proto"] != proto:
                    continue
                dst = msg.get("dst") or ("0.0.0.0" if msg["family"] == socket.AF_INET else "::")
                batch.route(
                    "del",
                    f"{dst}/{msg['dst_len']}",
                    f"delete route {dst}/{msg['dst_len']} proto {proto}",
                    oif=msg.get("oif"),
                    priority=msg.get("priority"),
                    proto=proto,
                    kind=msg["type"],
                    scope=msg["scope"],
                    table=MAIN_TABLE,
                    ok=(errno.ESRCH,),
                )
        nl.run(batch)
        if len(batch):
            done.append(f"routes: deleted {len(batch)} of protocols {', '.join(map(str, OUR_PROTOS))}")
    if bpffs_dir and os.path.isdir(bpffs_dir):
        shutil.rmtree(bpffs_dir)
        done.append(f"BPF pins: removed {bpffs_dir}")
    return done
