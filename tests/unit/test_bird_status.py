"""Parsing `birdc show protocols all` (BIRD 2.0.12 output) into status rows, and the status table."""
from netplugin.routing.bird import BgpStatusRow, format_status_table, parse_protocols

SAMPLE = """\
BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
devices    Device     ---        up     2026-11-25 04:29:21  

kernel4    Kernel     master4    up     2026-11-25 04:29:21  
  Channel ipv4
    State:          UP
    Table:          master4

mesh_node_b_893a227a BGP        ---        up     2026-11-25 04:29:25  Established   
  Description:    node-to-node mesh: node-b
  BGP state:          Established
    Neighbor address: 10.98.0.2
    Neighbor AS:      64512
    Local AS:         64512
    Neighbor ID:      10.98.0.2
    Local capabilities
      Multiprotocol
        AF announced: ipv4
    Session:          internal AS4
    Source address:   10.98.0.1
    Hold timer:       6.157/9
  Channel ipv4
    State:          UP
    BGP Next hop:   10.98.0.1

peer_tor1  BGP        ---        start  2026-11-25 04:29:21  Active        Socket: Connection refused
  Description:    global: tor1
  BGP state:          Active
    Neighbor address: 10.98.0.77
    Neighbor AS:      65000
    Local AS:         64512
    Connect delay:    1.718/5
    Last error:       Socket: Connection refused
  Channel ipv4
    State:          DOWN

rrc6_node_c BGP        ---        up     12:00:01.123  Established
  Description:    route reflector client: node-c
  BGP state:          Established
    Neighbor address: fd00::3
    Neighbor AS:      64512

rr_other   BGP        ---        down   2026-11-25 04:29:21
  BGP state:          Down
    Neighbor address: 10.98.0.9
    Neighbor AS:      64512
"""


def test_parse_protocols_rows():
    rows = {r.name: r for r in parse_protocols(SAMPLE)}
    assert set(rows) == {"mesh_node_b_893a227a", "peer_tor1", "rrc6_node_c", "rr_other"}  # BGP only
    mesh = rows["mesh_node_b_893a227a"]
    assert (mesh.peer_address, mesh.peer_type, mesh.state, mesh.since) == (
        "10.98.0.2", "node-to-node mesh", "Established", "2026-11-25 04:29:25")
    assert mesh.info == "up, AS 64512" and mesh.last_error == ""
    tor = rows["peer_tor1"]
    assert (tor.peer_type, tor.state, tor.proto_state) == ("global", "Active", "start")
    assert tor.info == "start, AS 65000, Socket: Connection refused"
    v6 = rows["rrc6_node_c"]
    assert (v6.peer_address, v6.peer_type, v6.since) == ("fd00::3", "route reflector client", "12:00:01.123")
    other = rows["rr_other"]  # no description: type from the name prefix
    assert (other.peer_type, other.state, other.proto_state) == ("route reflector", "Down", "down")


def test_rows_sorted_by_peer_address_and_empty_output():
    assert [r.peer_address for r in parse_protocols(SAMPLE)] == ["10.98.0.2", "10.98.0.77", "10.98.0.9", "fd00::3"]
    assert parse_protocols("BIRD 2.0.12 ready.\nName Proto Table State Since Info\n") == []


def test_format_status_table():
    rows = [BgpStatusRow("mesh_b", "10.98.0.2", "node-to-node mesh", "Established", "2026-11-25 04:29:25",
                         "up, AS 64512")]
    table = format_status_table(rows).splitlines()
    assert table[0] == table[2] == table[-1] and set(table[0]) == {"+", "-"}
    assert table[1].split("|")[1:-1] == [" PEER ADDRESS ", " PEER TYPE         ", " STATE       ",
                                         " SINCE               ", " INFO         "]
    assert "| 10.98.0.2    | node-to-node mesh | Established | 2026-11-25 04:29:25 | up, AS 64512 |" in table
    assert len({len(line) for line in table}) == 1
