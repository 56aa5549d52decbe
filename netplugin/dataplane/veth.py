"""The one veth builder: create, replace and delete the pair of an endpoint, for CNI and Docker alike.

The host end is always ``host_ifname(endpoint)`` with the fixed MAC ee:ee:ee:ee:ee:ee; the other end is made
directly in the namespace given by an open fd (the container's for CNI, the host's own for Docker, whose
libnetwork moves it into the sandbox). Creation is exclusive: a name already taken answers None, and the
caller decides whether what it finds is its own pair (converge) or a leftover (``replace``). Every link this
module creates is deleted again by the caller's undo stack (an ExitStack) if a later step of the ADD fails.
"""

import errno
import logging

from netplugin.dataplane.model import HOST_VETH_MAC
from netplugin.kernel.rtnl import Batch
from netplugin.dataplane.undo import quietly
from netplugin.errors import AlreadyExists, NotFound

log = logging.getLogger(__name__)


def is_pair(a, b) -> bool:
    """True when links ``a`` and ``b`` (of one namespace's view) are the two ends of one veth pair."""
    return (
        a.get(("linkinfo", "kind")) == "veth"
        and b.get(("linkinfo", "kind")) == "veth"
        and a.get("link") == b["index"]
        and b.get("link") == a["index"]
    )


def create(hnl, name, peer, peer_fd, mtu, peer_mac, what, undo):
    """Create the pair; the host link as the kernel echoed it (its delete pushed on ``undo``), or None if
    either name is taken. ``peer_mac`` None lets the kernel choose."""
    batch = Batch()
    req = batch.veth(
        name,
        HOST_VETH_MAC,
        mtu,
        peer,
        peer_fd,
        mtu,
        peer_mac and peer_mac.lower(),
        f"create veth {name} ({peer}) for {what}",
    )
    failures, echoes = hnl.commit(batch)
    if failures:
        if failures[0].errno == errno.EEXIST:
            return None
        raise failures[0].error()
    undo.callback(quietly, delete, hnl, name, f"veth {name} of {what}")
    msg = echoes.get(id(req)) or hnl.link(name=name)
    if msg is None:
        raise NotFound(f"failed to create veth {name} for {what}: it vanished right after creation")
    return msg


def replace(hnl, stale, name, peer, peer_fd, mtu, peer_mac, what, undo):
    """Delete the leftover links named in ``stale`` (an earlier incarnation of this endpoint: a crash, an
    answer that never arrived; of use to no one, so not undone) and create the pair anew."""
    for link in stale:
        log.info("replacing stale link %s of %s", link, what)
        delete(hnl, link, f"stale link {link} of {what}")
    msg = create(hnl, name, peer, peer_fd, mtu, peer_mac, what, undo)
    if msg is None:
        raise AlreadyExists(f"failed to create veth {name} for {what}: a link by that name keeps reappearing")
    return msg


def delete(hnl, name, what):
    batch = Batch()
    batch.link_del(f"delete {what}", name=name)
    hnl.run(batch)
