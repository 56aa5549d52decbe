"""Shared fixtures: real etcd, throwaway namespaces. Cleanup is registered before anything is made."""
import os

import pytest

from tests.etcd import EtcdServer
from tests.netns import NamespaceSet


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="functional tests need root")
        for item in items:
            if "functional" in item.keywords:
                item.add_marker(skip)


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
    from tests.agents import AgentProcess
    agents = []

    def make(name=None, extra_args=()):
        ns = namespaces.add()
        etcd_server.bridge_into(ns)
        agent = AgentProcess(ns, name or ns, etcd_server.endpoint, str(tmp_path / f"run-{ns}"),
                             extra_args=extra_args)
        agents.append(agent)
        agent.start()
        return agent

    try:
        yield make
    finally:
        for agent in agents:
            agent.stop()
