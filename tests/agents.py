"""What only the tests need beside netplugin/lab/agents.py (the agent and CNI helpers the benchmarks use too)."""

import json
import os

from netplugin.lab.console import console_script
from netplugin.lab.netns import run


def netctl_install_cni(bin_dir, conf_dir, network, agent_socket, *options):
    """``netctl install-cni`` as an operator runs it (defaults unless ``options`` say otherwise); the conflist."""
    run(
        [
            console_script("netctl"),
            "install-cni",
            "--bin-dir",
            bin_dir,
            "--conf-dir",
            conf_dir,
            "--network",
            network,
            "--agent-socket",
            agent_socket,
            *options,
        ],
        timeout=30,
    )
    with open(os.path.join(conf_dir, f"10-{network}.conflist")) as f:
        return json.load(f)
