"""Which interfaces get accept_ra=2 before IPv6 forwarding is turned on (pure: link messages as dicts)."""

from netplugin.dataplane import sysctl


def link(name, accept_ra, ours=False):
    conf = {"accept_ra": accept_ra} if accept_ra is not None else None
    spec = {"AF_INET6": {"IFLA_INET6_CONF": conf}} if conf else {}
    return {"ifname": name, "af_spec": spec, "ours": ours}


def test_only_interfaces_accepting_ras_that_are_not_ours_or_lo():
    links = [
        link("lo", 1),
        link("eth0", 1),
        link("eth.100", 1),
        link("eth1", 0),
        link("eth2", 2),
        link("np0123456789a", 1, ours=True),
        link("noipv6", None),
    ]
    got = sysctl.keep_accepting_ra(links, skip=lambda msg: msg["ours"])
    assert got == {"net/ipv6/conf/eth0/accept_ra": 2, "net/ipv6/conf/eth.100/accept_ra": 2}
