"""Secrets stay out of sight: the etcd password read from a file by netctl and the agent (not on their command
lines), BIRD's config (BGP passwords) readable by its owner only, whatever the umask."""

import os
import stat

import pytest

from netplugin.config import EtcdConfig
from netplugin.datastore.client import Datastore
from netplugin.lab.agents import AgentProcess
from netplugin.lab.etcd import EtcdServer
from netplugin.routing.bird import BirdConfigWriter, BirdProcess
from netplugin.routing.bird_config import render_bird_config
from netplugin.routing.model import BgpNode, RoutingInput
from tests.functional.test_netctl import netctl

pytestmark = pytest.mark.functional


def test_bird_config_is_0600_from_creation_even_with_a_wide_umask(tmp_path):
    writer = BirdConfigWriter(BirdProcess(str(tmp_path), netns="npt-never-started"))
    node = BgpNode("host-1", "10.99.0.1")
    old = os.umask(0)
    try:
        assert writer.apply(render_bird_config(RoutingInput(node=node, nodes=(node,)))) is True
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(writer.bird.conf_path).st_mode)
    assert mode == 0o600, oct(mode)


@pytest.fixture
def auth_etcd():
    server = EtcdServer()
    try:
        server.start()
        server.enable_auth("root", "pw-in-a-file")
        yield server
    finally:
        server.close()


def test_netctl_and_agent_take_the_etcd_password_from_a_file(auth_etcd, namespaces, tmp_path):
    pw = tmp_path / "etcd-password"
    pw.write_text("pw-in-a-file\n")
    pw.chmod(0o600)
    res = netctl(
        auth_etcd.endpoint, "--etcd-user", "root", "--etcd-password-file", str(pw), "pool", "add", "10.71.0.0/24"
    )
    assert res.returncode == 0, res.stderr
    res = netctl(
        auth_etcd.endpoint,
        "--etcd-user",
        "root",
        "--etcd-password-file",
        str(pw),
        "--etcd-password",
        "x",
        "pool",
        "list",
    )
    assert res.returncode != 0 and "given twice" in res.stderr, res.stderr
    res = netctl(
        auth_etcd.endpoint, "--etcd-user", "root", "--etcd-password-file", str(tmp_path / "nope"), "pool", "list"
    )
    assert res.returncode != 0 and "cannot read the etcd password file" in res.stderr, res.stderr

    ns = namespaces.add()
    auth_etcd.bridge_into(ns)
    agent = AgentProcess(
        ns,
        ns,
        auth_etcd.endpoint,
        str(tmp_path / "run"),
        extra_args=["--etcd-user", "root", "--etcd-password-file", str(pw)],
    )
    try:
        agent.start()
        cmdline = open(f"/proc/{agent.proc.pid}/cmdline", "rb").read()
        assert b"pw-in-a-file" not in cmdline
        authed = Datastore(EtcdConfig(endpoints=[auth_etcd.endpoint], username="root", password="pw-in-a-file"))
        assert authed.get(f"/netplugin/v1/nodes/{ns}") is not None  # it registered: it logged in
    finally:
        agent.stop()
    bad = AgentProcess(
        ns,
        ns,
        auth_etcd.endpoint,
        str(tmp_path / "run2"),
        extra_args=["--etcd-user", "root", "--etcd-password-file", str(tmp_path / "nope")],
    )
    with pytest.raises(RuntimeError, match="cannot read the etcd password file"):
        bad.start(timeout=10)
