"""Parsing `birdc show protocols all` (BIRD 2.0.12 output) into status rows, and `netctl node status` showing them
in the same plain columns as every other listing."""

import dataclasses
import json

from click.testing import CliRunner

from netplugin.cli.bgp_cmds import node_status
from netplugin.routing.bird import parse_protocols

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
        "10.98.0.2",
        "node-to-node mesh",
        "Established",
        "2026-11-25 04:29:25",
    )
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


def _node_status(tmp_path, monkeypatch, *args):
    """`netctl node status` on rows parsed from SAMPLE: only the call to birdc is replaced (bird runs for real in
    tests/functional/test_bird.py and test_multihost.py)."""
    sock = tmp_path / "bird" / "bird.ctl"
    sock.parent.mkdir()
    sock.touch()
    monkeypatch.setattr("netplugin.routing.bird.birdc", lambda *a, **kw: SAMPLE)
    res = CliRunner().invoke(node_status, ["--run-dir", str(tmp_path), *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_node_status_is_plain_columns_like_every_listing(tmp_path, monkeypatch):
    lines = _node_status(tmp_path, monkeypatch).splitlines()
    assert lines[0].split() == ["PEER_ADDRESS", "PEER_TYPE", "STATE", "SINCE", "INFO"]
    assert [c.strip() for c in lines[1].split("  ") if c] == [
        "10.98.0.2",
        "node-to-node mesh",
        "Established",
        "2026-11-25 04:29:25",
        "up, AS 64512",
    ]
    assert len(lines) == 5 and not any(c in "".join(lines) for c in "|+")
    # the columns start where the header's do, as in `netctl ipam show` and the rest
    starts = [lines[0].index(h) for h in ("PEER_TYPE", "STATE", "SINCE", "INFO")]
    assert [lines[1][s - 2 : s] for s in starts] == ["  "] * 4 and all(lines[1][s] != " " for s in starts)


def test_node_status_json_has_every_field(tmp_path, monkeypatch):
    rows = json.loads(_node_status(tmp_path, monkeypatch, "-o", "json"))
    assert rows == [dataclasses.asdict(r) for r in parse_protocols(SAMPLE)]
    assert rows[1]["last_error"] == "Socket: Connection refused"
