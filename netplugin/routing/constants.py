"""Kernel route protocol numbers shared by the dataplane and routing.

The protocol number is how each writer recognises its own routes in the kernel table (``ip route show proto
N``): a reconciler only ever deletes routes carrying its own number, so several writers share one table safely.
"""

# Container /32 (/128) routes and owned-block blackholes written by the dataplane. BIRD's kernel protocol
# learns routes with this number and advertises the ones outside our blocks ("borrowed" addresses).
ROUTE_PROTO = 80

# Routes to other hosts' blocks written by direct mode (netplugin/routing/direct.py), no BGP daemon involved.
DIRECT_PROTO = 81

# Routes BIRD installs always carry RTPROT_BIRD; BIRD 2 hard-codes it (netlink.c), so it cannot be changed
# from the config. It is already distinct from ROUTE_PROTO and DIRECT_PROTO, which is all we need.
BIRD_PROTO = 12

# Kernel metric of routes BIRD installs. Above the dataplane's metric 0 so that, should the same IPv4 prefix
# ever exist twice, the dataplane's own route wins.
BIRD_KERNEL_METRIC = 32

# The kernel's main routing table.
MAIN_TABLE = 254
