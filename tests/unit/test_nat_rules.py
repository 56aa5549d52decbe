"""NAT-outgoing rules from pools (pure)."""

from netplugin.agent.nat import nat_rules
from netplugin.datastore.models import Pool


def test_rules_leave_pool_traffic_alone_and_masquerade_the_nat_pools():
    pools = [
        Pool(cidr="10.1.0.0/16", block_size=26, nat_outgoing=True),
        Pool(cidr="10.2.0.0/16", block_size=26),
        Pool(cidr="fd00::/48", block_size=122),
    ]
    assert nat_rules(pools) == {
        4: ["-d 10.1.0.0/16 -j RETURN", "-d 10.2.0.0/16 -j RETURN", "-s 10.1.0.0/16 -j MASQUERADE"],
        6: [],
    }
    assert nat_rules(pools[1:]) == {4: [], 6: []}
