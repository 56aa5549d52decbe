"""The agent's systemd unit and the few systemctl calls install and uninstall make.

The unit is ordered ``Before=docker.service`` so that dockerd, scanning /run/docker/plugins at start, finds the
plugin socket; the agent creates it early in start-up. systemctl is called only for the real root ("/") of a
machine booted with systemd (``/run/systemd/system`` exists, sd_booted(3)'s test), never for a staging root.
"""

import os
import shlex
import subprocess

from netplugin.errors import NetpluginError

UNIT_NAME = "netplugin.service"
UNIT_PATH = "/etc/systemd/system/" + UNIT_NAME


def render_unit(netplugin_bin, config_path):
    """The unit file's text for the agent started as ``netplugin_bin agent --config config_path``."""
    exec_start = shlex.join([netplugin_bin, "agent", "--config", config_path])
    return f"""[Unit]
Description=netplugin agent (routed container networking: BGP, IPAM, policy)
Documentation=netplugin agent --help
Wants=network-online.target
After=network-online.target
Before=docker.service

[Service]
Type=simple
ExecStart={exec_start}
Restart=on-failure
RestartSec=2
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"""


def systemd_running(root="/"):
    """True when ``root`` is this machine's own root and it was booted with systemd."""
    return os.path.realpath(root) == "/" and os.path.isdir("/run/systemd/system")


def systemctl(*args, check=True):
    """One systemctl call; NetpluginError with its complaint when it fails (unless ``check`` is false)."""
    try:
        proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetpluginError(f"failed to run systemctl {' '.join(args)}: {e}") from None
    if check and proc.returncode != 0:
        raise NetpluginError(f"systemctl {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc
