"""Kernel route protocol numbers of the routing writers, beside the dataplane's own.

The protocol number is how each writer recognises its own routes in the kernel table (``ip route show proto
N``): a reconciler only ever deletes routes carrying its own number, so several writers share one table safely.
The dataplane's number (ROUTE_PROTO) and the main table are defined by the dataplane, the lower layer, and
imported here because BIRD's kernel protocol and direct mode must know them.
"""

from netplugin.dataplane.model import MAIN_TABLE, ROUTE_PROTO

__all__ = ["ROUTE_PROTO", "MAIN_TABLE", "DIRECT_PROTO", "BIRD_PROTO", "BIRD_KERNEL_METRIC"]

# Routes to other hosts' blocks written by direct mode (netplugin/routing/direct.py), no BGP daemon involved.
DIRECT_PROTO = 81

# Routes BIRD installs always carry RTPROT_BIRD; BIRD 2 hard-codes it (netlink.c), so it cannot be changed
# from the config. It is already distinct from ROUTE_PROTO and DIRECT_PROTO, which is all we need.
BIRD_PROTO = 12

# Kernel metric of routes BIRD installs. Above the dataplane's metric 0 so that, should the same IPv4 prefix
# ever exist twice, the dataplane's own route wins.
BIRD_KERNEL_METRIC = 32
