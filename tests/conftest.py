"""Shared fixtures: real etcd, throwaway namespaces. Cleanup is registered before anything is made."""

import os

import pytest

from netplugin.kernel.bpf import build
from netplugin.lab.bpflab import mounted_bpffs
from netplugin.lab.etcd import EtcdServer
from netplugin.lab.netns import NamespaceSet


def pytest_configure(config):
    """Refuse to start unless root, in one line: skipping the functional half would report green for a run that
    tested nothing of the dataplane, and the unit half assumes root's view of the machine too."""
    if os.geteuid() != 0:
        raise pytest.UsageError(
            "netplugin's test suite must run as root (it makes network namespaces, iptables "
            "rules, real etcd, BIRD, dockerd and podman): run sudo scripts/test.sh"
        )


@pytest.fixture(scope="session")
def etcd_server():
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd(etcd_server):
    """A clean /netplugin/ tree in the session's etcd for each test."""
    from netplugin.datastore.client import Datastore
    from netplugin.config import EtcdConfig

    ds = Datastore(EtcdConfig(endpoints=[etcd_server.endpoint]))
    ds.delete_prefix("/netplugin/")
    yield ds
    ds.delete_prefix("/netplugin/")


@pytest.fixture
def namespaces():
    nss = NamespaceSet()
    try:
        yield nss
    finally:
        nss.close()


@pytest.fixture
def host_factory(etcd_server, namespaces, tmp_path):
    """Make host namespaces each running a real agent that reaches the session's etcd."""
    from netplugin.lab.agents import AgentProcess

    agents = []

    def make(name=None, extra_args=()):
        ns = namespaces.add()
        etcd_server.bridge_into(ns)
        agent = AgentProcess(ns, name or ns, etcd_server.endpoint, str(tmp_path / f"run-{ns}"), extra_args=extra_args)
        agents.append(agent)
        agent.start()
        return agent

    try:
        yield make
    finally:
        for agent in agents:
            agent.stop()


@pytest.fixture
def bpffs(tmp_path):
    with mounted_bpffs(tmp_path / "bpffs") as p:
        yield p


@pytest.fixture(scope="session")
def bpf_objects(tmp_path_factory):
    """Every program variant, compiled once per session from the sources (not the set-up's build dir)."""
    out = tmp_path_factory.mktemp("bpf-build")
    return {v: build.compile_one(src, out, v) for src in build.PROGS.glob("*.c") for v in build.VARIANTS}
