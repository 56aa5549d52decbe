"""The real ``netctl`` console script against a real etcd: tables, JSON and YAML; ``ipam check`` exit codes;
manual release; and every expected error as exactly one line on stderr with etcd left exactly as it was."""

import json
import os
import subprocess

import pytest
import yaml

from netplugin.config import EtcdConfig
from netplugin.datastore import keys
from netplugin.datastore.client import Datastore
from netplugin.datastore.models import Allocation, Block, Node
from netplugin.errors import PoolExhausted
from netplugin.ipam.allocator import IPAM, AssignRequest
from netplugin.lab.console import console_script
from netplugin.lab.etcd import EtcdServer, free_port
from netplugin.nodes import Liveness, NodeRegistry

pytestmark = pytest.mark.functional


def netctl(endpoint, *args, env_endpoint=True, timeout=30):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETPLUGIN_ETCD_")}
    cmd = [console_script("netctl")]
    if env_endpoint:
        env["NETPLUGIN_ETCD_ENDPOINTS"] = endpoint
    else:
        cmd += ["--etcd-endpoints", endpoint]
    return subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run(etcd_server):
    """netctl against the test etcd; asserts success unless told otherwise."""

    def _run(*args, ok=True):
        res = netctl(etcd_server.endpoint, *args)
        if ok:
            assert res.returncode == 0, res.stderr
            assert res.stderr == ""
        return res

    return _run


@pytest.fixture
def fails(etcd, etcd_server):
    """Runs a netctl command that must fail cleanly: non-zero, one line on stderr, etcd unchanged."""

    def _fails(*args, match, endpoint=None):
        before = etcd.dump()
        res = netctl(endpoint or etcd_server.endpoint, *args)
        after = etcd.dump()
        assert res.returncode != 0, res.stdout
        lines = res.stderr.splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith("netctl: error: ") and "Traceback" not in res.stderr
        assert match in lines[0], lines[0]
        assert res.stdout == ""
        assert after == before
        return lines[0]

    return _fails


@pytest.fixture
def populated(etcd):
    """Two pools, two live hosts and a dead one, with some allocations."""
    ipam = IPAM(etcd)
    ipam.add_pool("10.10.0.0/24")
    ipam.add_pool("fd00:10::/112")
    reg = NodeRegistry(etcd)
    reg.register(Node(name="h1", address="192.0.2.1", address_autodetected=True, labels={"rack": "r1"}))
    reg.register(Node(name="h2", address="192.0.2.2", address6="2001:db8::2", as_number=65002, route_reflector=True))
    lives = [Liveness(etcd, "h1", ttl=30), Liveness(etcd, "h2", ttl=30)]
    for life in lives:
        assert life.beat()
    ipam.assign("c1", "h1", [AssignRequest(4), AssignRequest(6)])
    ipam.auto_assign("c2", "h1")
    ipam.auto_assign("c3", "h2")
    yield ipam
    for life in lives:
        etcd.revoke_lease(life.lease)


def table(stdout):
    """Rows of a netctl table as lists of cells (header first)."""
    return [line.split() for line in stdout.strip().splitlines()]


# --- pools ---------------------------------------------------------------------------------------------------------


def test_pool_add_list_rm(etcd, run):
    res = run("pool", "add", "10.10.0.0/16", "--nat-outgoing")
    assert table(res.stdout)[1][:2] == ["10.10.0.0/16", "26"]
    assert json.loads(run("pool", "add", "fd00:10::/112", "-o", "json").stdout) == {
        "cidr": "fd00:10::/112",
        "block_size": 122,
        "nat_outgoing": False,
        "disabled": False,
    }
    IPAM(etcd).auto_assign("c1", "h1")

    rows = table(run("pool", "list").stdout)
    assert rows[0] == ["CIDR", "BLOCK_SIZE", "BLOCKS", "USED", "NAT_OUTGOING", "DISABLED"]
    assert rows[1:] == [["10.10.0.0/16", "26", "1", "1", "yes", "no"], ["fd00:10::/112", "122", "0", "0", "no", "no"]]
    as_json = json.loads(run("pool", "list", "-o", "json").stdout)
    assert as_json == [
        {"cidr": "10.10.0.0/16", "block_size": 26, "blocks": 1, "used": 1, "nat_outgoing": True, "disabled": False},
        {"cidr": "fd00:10::/112", "block_size": 122, "blocks": 0, "used": 0, "nat_outgoing": False, "disabled": False},
    ]
    assert yaml.safe_load(run("pool", "list", "-o", "yaml").stdout) == as_json

    assert run("pool", "rm", "fd00:10::/112").stdout.strip() == "removed pool fd00:10::/112"
    assert [p["cidr"] for p in json.loads(run("pool", "list", "-o", "json").stdout)] == ["10.10.0.0/16"]


def test_pool_set_changes_nat_and_disables_allocation(etcd, run, fails):
    run("pool", "add", "10.12.0.0/24")
    assert json.loads(run("pool", "set", "10.12.0.0/24", "--nat-outgoing", "-o", "json").stdout)["nat_outgoing"]
    disabled = json.loads(run("pool", "set", "10.12.0.0/24", "--disable", "-o", "json").stdout)
    assert disabled == {"cidr": "10.12.0.0/24", "block_size": 26, "nat_outgoing": True, "disabled": True}
    with pytest.raises(PoolExhausted):  # a disabled pool hands out nothing
        IPAM(etcd).auto_assign("c1", "h1")
    enabled = json.loads(run("pool", "set", "10.12.0.0/24", "--enable", "--no-nat-outgoing", "-o", "json").stdout)
    assert not enabled["disabled"] and not enabled["nat_outgoing"]
    assert IPAM(etcd).auto_assign("c1", "h1")
    fails("pool", "set", "10.13.0.0/24", "--disable", match="pool 10.13.0.0/24 does not exist")
    fails("pool", "set", "10.12.0.0/24", match="nothing to change")


def test_empty_listings(etcd, run):
    assert run("pool", "list").stdout.strip() == "no pools"
    assert run("ipam", "show").stdout.strip() == "no blocks"
    assert run("node", "list").stdout.strip() == "no nodes"
    assert json.loads(run("pool", "list", "-o", "json").stdout) == []
    assert yaml.safe_load(run("node", "list", "-o", "yaml").stdout) == []


# --- ipam show / check / release -------------------------------------------------------------------------------------


def test_ipam_show(populated, run):
    expected = [
        {"block": "10.10.0.0/26", "pool": "10.10.0.0/24", "host": "h1", "used": 2, "free": 62},
        {"block": "10.10.0.64/26", "pool": "10.10.0.0/24", "host": "h2", "used": 1, "free": 63},
        {"block": "fd00:10::/122", "pool": "fd00:10::/112", "host": "h1", "used": 1, "free": 63},
    ]
    rows = table(run("ipam", "show").stdout)
    assert rows[0] == ["BLOCK", "POOL", "HOST", "USED", "FREE"]
    assert rows[1:] == [[r["block"], r["pool"], r["host"], str(r["used"]), str(r["free"])] for r in expected]
    assert json.loads(run("ipam", "show", "-o", "json").stdout) == expected
    assert yaml.safe_load(run("ipam", "show", "-o", "yaml").stdout) == expected


def test_node_list(populated, etcd, run):
    NodeRegistry(etcd).register(Node(name="h3", address="192.0.2.3"))  # registered, never alive
    rows = table(run("node", "list").stdout)
    assert rows[0] == ["NAME", "ALIVE", "ADDRESS", "ADDRESS6", "AS", "ROUTE_REFLECTOR", "LABELS"]
    assert rows[1] == ["h1", "yes", "192.0.2.1", "(autodetected)", "no", "rack=r1"]  # empty cells collapse
    assert rows[2] == ["h2", "yes", "192.0.2.2", "2001:db8::2", "65002", "yes"]
    assert rows[3] == ["h3", "no", "192.0.2.3", "no"]
    as_json = json.loads(run("node", "list", "-o", "json").stdout)
    assert [(n["name"], n["alive"], n["address"]) for n in as_json] == [
        ("h1", True, "192.0.2.1 (autodetected)"),
        ("h2", True, "192.0.2.2"),
        ("h3", False, "192.0.2.3"),
    ]
    assert as_json[1]["as"] == 65002 and as_json[1]["route_reflector"] is True
    assert yaml.safe_load(run("node", "list", "-o", "yaml").stdout) == as_json


def test_ipam_check_exit_codes(populated, etcd, run):
    res = run("ipam", "check")
    assert res.stdout.strip() == "ipam check: clean"
    assert json.loads(run("ipam", "check", "-o", "json").stdout) == []
    # A leak: an allocation nobody's handle knows about.
    kv = etcd.get(keys.block("10.10.0.0/26"))
    block = Block.from_dict(kv.value)
    block.allocations["20"] = Allocation("lost", "h1", block.next_seq)
    block.next_seq += 1
    etcd.put(keys.block("10.10.0.0/26"), block.to_dict())
    res = run("ipam", "check", ok=False)
    assert res.returncode == 1 and res.stderr == ""
    rows = table(res.stdout)
    assert rows[0][:3] == ["KIND", "ADDRESS", "BLOCK"]
    assert rows[1][:2] == ["orphan-allocation", "10.10.0.20"] and len(rows) == 2
    res = run("ipam", "check", "-o", "json", ok=False)
    assert res.returncode == 1
    findings = json.loads(res.stdout)
    assert [(f["kind"], f["address"], f["handle"]) for f in findings] == [("orphan-allocation", "10.10.0.20", "lost")]
    res = run("ipam", "check", "-o", "yaml", ok=False)
    assert res.returncode == 1 and yaml.safe_load(res.stdout) == findings
    # Repaired by hand, the check is clean again.
    assert run("ipam", "release", "--ip", "10.10.0.20").stdout.strip() == "released 10.10.0.20 (was held by lost)"
    assert run("ipam", "check").returncode == 0


def test_ipam_release(populated, etcd, run):
    v4, v6 = populated.get_handle("c1")[0].addresses
    res = run("ipam", "release", "--handle", "c1")
    assert res.stdout.strip() == f"released {', '.join(sorted([v4, v6]))}"
    assert etcd.get(keys.handle("c1")) is None
    before = etcd.dump()
    assert run("ipam", "release", "--handle", "c1").stdout.strip() == "handle c1 holds nothing"  # idempotent
    assert etcd.dump() == before
    c3 = populated.get_handle("c3")[0]
    (addr,) = c3.addresses
    assert run("ipam", "release", "--ip", addr).stdout.strip() == f"released {addr} (was held by c3)"
    assert etcd.get(keys.handle("c3")) is None
    assert run("ipam", "check").returncode == 0


def test_endpoint_flag_and_env_agree(populated, etcd_server):
    by_env = netctl(etcd_server.endpoint, "pool", "list", "-o", "json")
    by_flag = netctl(etcd_server.endpoint, "pool", "list", "-o", "json", env_endpoint=False)
    assert by_env.returncode == by_flag.returncode == 0
    assert json.loads(by_env.stdout) == json.loads(by_flag.stdout) != []


# --- errors: one line, non-zero, nothing changed ------------------------------------------------------------------


def test_errors_are_one_line_and_change_nothing(populated, fails):
    fails("pool", "add", "10.10.0.128/25", match="overlaps existing pool 10.10.0.0/24")
    fails("pool", "add", "10.0.0.0/8", match="overlaps existing pool 10.10.0.0/24")
    fails("pool", "add", "10.10.0.0/24", match="already exists")
    fails("pool", "add", "not-a-cidr", match="is not a CIDR")
    fails("pool", "add", "10.20.0.0/33", match="is not a CIDR")
    fails("pool", "add", "10.20.0.1/24", match="host bits")
    fails("pool", "add", "10.20.0.0/24", "--block-size", "8", match="does not fit")
    fails("pool", "rm", "10.10.0.0/24", match="still has 3 allocated")
    fails("pool", "rm", "fd00:10::/112", match="still has 1 allocated")
    fails("pool", "rm", "not-a-cidr", match="is not a CIDR")
    fails("pool", "rm", "10.99.0.0/24", match="does not exist")
    fails("ipam", "release", "--ip", "192.0.2.77", match="192.0.2.77 is not in any pool")
    fails("ipam", "release", "--ip", "10.10.0.200", match="10.10.0.200 is not allocated")
    fails("ipam", "release", "--ip", "nonsense", match="is not an IP address")
    fails("ipam", "release", "--handle", "a/b", match="invalid handle name")


def test_etcd_unreachable_names_the_endpoint(populated, fails):
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (
        ["pool", "list"],
        ["pool", "add", "10.50.0.0/24"],
        ["ipam", "show"],
        ["ipam", "check"],
        ["node", "list"],
        ["ipam", "release", "--handle", "c1"],
    ):
        line = fails(*args, match="etcd unreachable", endpoint=dead)
        assert dead in line


def test_user_and_password_options():
    server = EtcdServer()
    try:
        server.start()
        server.enable_auth("root", "pw")
        res = netctl(server.endpoint, "--etcd-user", "root", "--etcd-password", "pw", "pool", "add", "10.70.0.0/24")
        assert res.returncode == 0, res.stderr
        res = netctl(server.endpoint, "--etcd-user", "root", "--etcd-password", "wrong", "pool", "list")
        assert res.returncode == 1 and len(res.stderr.splitlines()) == 1 and "authentication failed" in res.stderr
        res = netctl(server.endpoint, "pool", "list")
        assert res.returncode == 1 and "user name is empty" in res.stderr
        authed = Datastore(EtcdConfig(endpoints=[server.endpoint], username="root", password="pw"))
        assert list(authed.dump()) == [keys.pool("10.70.0.0/24")]
    finally:
        server.close()
