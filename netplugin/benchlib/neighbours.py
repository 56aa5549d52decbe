"""Permanent ARP entries for a lab's fabric, so that a benchmark measures netplugin and not the shared kernel's
neighbour table overflowing."""

from netplugin.lab import system


def pin_neighbours(lab):
    """Make every host's neighbours on its rack segment permanent entries.

    The lab's hosts are namespaces of one kernel, and the kernel's ARP table is shared by all namespaces: past
    ``gc_thresh3`` (1,024 by default, a root-namespace sysctl we must not change) it refuses new entries
    ("neighbour: arp_cache: neighbor table overflow!" in dmesg) and ARP fails until garbage collection frees
    some. Every host pinging a new container on every other host needs about two entries per pair of hosts, so
    a 50-host lab overflows after about ten hosts have a container, and convergence then measures ARP retries
    (seconds to tens of seconds), not netplugin. Real hosts each have their own table. Permanent entries are not
    counted against the limit, so the bench pins the fabric's neighbours up front."""
    by_rack = {}
    for h in lab.live_hosts():
        mac = system.ns_run(
            h.namespace, ["cat", "/sys/class/net/eth0/address"], f"reading the MAC address of {h.name}"
        ).stdout.strip()
        by_rack.setdefault(h.rack, []).append((h, mac))
    for members in by_rack.values():
        for h, _ in members:
            system.ip_batch(
                h.namespace,
                [
                    f"neigh replace {o.address} lladdr {mac} dev eth0 nud permanent"
                    for o, mac in members
                    if o.name != h.name
                ],
                f"pinning the neighbours of {h.name}",
            )
