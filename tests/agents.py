"""The agent and CNI helpers live in netplugin/lab/agents.py (re-exported here for the test suite), where the
benchmarks use them too; what only the tests need stays here."""
import json
import os

from netplugin.lab.agents import AgentProcess, CniBinary, rmtree, tempdir
from netplugin.lab.console import console_script
from netplugin.lab.netns import run

__all__ = ["AgentProcess", "CniBinary", "netctl_install_cni", "rmtree", "tempdir"]


def netctl_install_cni(bin_dir, conf_dir, network, agent_socket, *options):
    """``netctl install-cni`` as an operator runs it (defaults unless ``options`` say otherwise); the conflist."""
    run([console_script("netctl"), "install-cni", "--bin-dir", bin_dir, "--conf-dir", conf_dir, "--network", network,
         "--agent-socket", agent_socket, *options], timeout=30)
    with open(os.path.join(conf_dir, f"10-{network}.conflist")) as f:
        return json.load(f)
