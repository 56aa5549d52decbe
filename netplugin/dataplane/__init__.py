"""Host dataplane: one veth per container, routed host addresses, proxy-ARP gateway, anti-spoofing.

See dataplane.py for the entry point and README-style notes in each module's docstring.
"""
from netplugin.dataplane.dataplane import Dataplane
from netplugin.dataplane.model import (
    GATEWAY_V4,
    GATEWAY_V6,
    HOST_VETH_MAC,
    ROUTE_PROTO,
    EndpointSpec,
    EndpointState,
    host_ifname,
    is_host_ifname,
)
from netplugin.dataplane.reconcile import changed

__all__ = [
    "Dataplane",
    "EndpointSpec",
    "EndpointState",
    "ROUTE_PROTO",
    "GATEWAY_V4",
    "GATEWAY_V6",
    "HOST_VETH_MAC",
    "host_ifname",
    "is_host_ifname",
    "changed",
]
