"""Set members written by netlink (netplugin.kernel.ipset_members) and read back with ``ipset save``."""

import pytest

from netplugin.errors import DataplaneError
from netplugin.kernel.ipset import parse_save
from netplugin.kernel.ipset_members import IpsetMembers
from netplugin.lab.netns import nsexec

pytestmark = pytest.mark.functional

SETS = {
    "np-t-net4": "hash:net family inet",
    "np-t-net6": "hash:net family inet6",
    "np-t-ep4": "hash:net,iface family inet",
    "np-t-ep6": "hash:net,iface family inet6",
}


def members(ns):
    return {name: s.members for name, s in parse_save(nsexec(ns, "ipset save").stdout).items()}


def test_adds_and_deletes_of_every_set_kind_we_use_and_errors_that_name_the_member(namespaces):
    ns = namespaces.add()
    for name, kind in SETS.items():
        nsexec(ns, f"ipset create {name} {kind}")
    writer = IpsetMembers(f"/run/netns/{ns}")
    try:
        writer.write(
            [
                ("add", "np-t-net4", 4, "10.0.0.5/32"),
                ("add", "np-t-net4", 4, "10.1.0.0/16"),
                ("add", "np-t-net6", 6, "fd00::5/128"),
                ("add", "np-t-ep4", 4, "10.0.0.5/32,np0000000000a"),
                ("add", "np-t-ep6", 6, "fd00::5/128,np0000000000a"),
            ]
        )
        assert members(ns) == {
            "np-t-net4": ("10.0.0.5/32", "10.1.0.0/16"),
            "np-t-net6": ("fd00::5/128",),
            "np-t-ep4": ("10.0.0.5/32,np0000000000a",),
            "np-t-ep6": ("fd00::5/128,np0000000000a",),
        }
        # A member the set holds already, or lacks, is an error (the applier then reads back and rebuilds).
        with pytest.raises(DataplaneError, match=r"add 10\.0\.0\.5/32 in ipset np-t-net4 .*already in the set"):
            writer.write([("add", "np-t-net4", 4, "10.0.0.5/32")])
        with pytest.raises(DataplaneError, match=r"del 10\.9\.9\.9/32 in ipset np-t-net4 .*not in it"):
            writer.write([("del", "np-t-net4", 4, "10.9.9.9/32")])
        with pytest.raises(DataplaneError, match=r"ipset np-t-missing .*the set does not exist"):
            writer.write([("add", "np-t-missing", 4, "10.0.0.5/32")])
        writer.write([("del", "np-t-net4", 4, "10.0.0.5/32"), ("del", "np-t-ep4", 4, "10.0.0.5/32,np0000000000a")])
        assert members(ns)["np-t-net4"] == ("10.1.0.0/16",) and members(ns)["np-t-ep4"] == ()
    finally:
        writer.close()
