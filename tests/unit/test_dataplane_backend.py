"""The iptables backend implements the whole dataplane interface, with the interface's own parameters, so a
second backend (eBPF) can be checked against the same list and the agent never needs more than it names."""

import inspect

import pytest

from netplugin.agent.backend import IptablesBackend
from netplugin.agent.bpf_backend import BpfBackend
from netplugin.dataplane.backend import Backend


def _methods(cls):
    return {name: fn for name, fn in vars(cls).items() if callable(fn) and not name.startswith("_")}


def test_the_interface_names_the_jobs_the_agent_has():
    assert set(_methods(Backend)) == {
        "setup_host",
        "enable_ipv6",
        "add_endpoint",
        "remove_endpoint",
        "add_docker_endpoint",
        "remove_docker_endpoint",
        "check_endpoint",
        "reconcile",
        "converge_blocks",
        "apply_policy",
        "set_nat_outgoing",
    }


@pytest.mark.parametrize("cls", [IptablesBackend, BpfBackend])
def test_each_backend_implements_every_method_with_the_same_parameters(cls):
    backend = (
        IptablesBackend(None, None, None)
        if cls is IptablesBackend
        else BpfBackend(IptablesBackend(None, None, None), None)
    )
    assert isinstance(backend, Backend)
    for name, fn in _methods(Backend).items():
        mine = getattr(cls, name)
        assert list(inspect.signature(mine).parameters) == list(inspect.signature(fn).parameters), name


def test_a_backend_missing_a_method_is_not_one():
    class Partial:
        def setup_host(self):
            return {}

    assert not isinstance(Partial(), Backend)
