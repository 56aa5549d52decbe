"""Host dataplane: one veth per container, routed host addresses, proxy-ARP gateway, anti-spoofing.

backend.py is the interface the agent programs against (endpoints, host setup, policy, NAT-outgoing);
dataplane.py is the host side of today's implementation, veth.py its one veth builder (CNI and Docker),
endpoint.py/docker_link.py the two ways a container end is placed, reconcile.py the level-triggered repair.
This package imports only netplugin.kernel and netplugin.errors (tests/unit/test_layering.py).
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
    random_mac,
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
    "random_mac",
    "changed",
]
