"""``netctl install`` and ``netctl uninstall``: the agent as a systemd service on this host, and taking it away.

install writes the unit, the CNI plugin and conflist (cni.install, as ``netctl install-cni`` does) and, if none
exists, a config file built from netctl's own etcd options (the password only as ``password_file``); it records
what it wrote in a manifest. uninstall stops and disables the service, removes the agent's kernel state
(install/kernel.py) and exactly the recorded files. ``--root`` puts every path under a directory (a staging root;
tests); systemctl runs only for the real root of a systemd host, and never with ``--no-systemctl``.
"""

import os
import socket

import click

from cni.install import install_cni
from netplugin.agent.config_file import DEFAULT_PATH as CONFIG_PATH, render_default
from netplugin.errors import NetpluginError
from netplugin.install.files import Manifest, target_of, under
from netplugin.install.kernel import DEFAULT_BPFFS_DIR, remove_kernel_state
from netplugin.install.systemd import UNIT_NAME, UNIT_PATH, render_unit, systemctl, systemd_running
from netplugin.lab.console import console_script

DOCKER_SOCKET = "/run/docker/plugins/netplugin.sock"
_ETCD_KEYS = {
    "etcd_endpoints": "endpoints",
    "etcd_ca": "ca",
    "etcd_cert": "cert",
    "etcd_key": "key",
    "etcd_user": "user",
    "etcd_password_file": "password_file",
}  # never etcd_password: not in clear


def _agent_binary():
    """The ``netplugin`` program of this installation, for the unit's ExecStart."""
    try:
        return console_script("netplugin")
    except FileNotFoundError as e:
        raise NetpluginError(str(e)) from None


def _etcd_settings(ctx):
    """netctl's own etcd options, as the config file's [etcd] table (a password given in clear is left out)."""
    params = ctx.find_root().params
    out = {key: params[name] for name, key in _ETCD_KEYS.items() if params.get(name)}
    out["endpoints"] = [e.strip() for e in out.get("endpoints", "http://127.0.0.1:2379").split(",") if e.strip()]
    return out


@click.command("install")
@click.option("--root", default="/", show_default=True, help="Install under this directory (a staging root).")
@click.option("--hostname", default=None, help="The node name put in a new config file (default: this host's).")
@click.option("--run-dir", default="/run/netplugin", show_default=True)
@click.option(
    "--docker-socket",
    default=DOCKER_SOCKET,
    show_default=True,
    help="Where the agent serves Docker's plugin API ('' for no Docker).",
)
@click.option("--cni-bin-dir", default="/opt/cni/bin", show_default=True)
@click.option("--cni-conf-dir", default="/etc/cni/net.d", show_default=True)
@click.option("--mtu", default=1500, show_default=True, help="MTU in the CNI conflist.")
@click.option("--no-cni", is_flag=True, help="Do not install the CNI plugin.")
@click.option("--no-systemctl", is_flag=True, help="Never call systemctl (also skipped when systemd is not running).")
@click.pass_context
def install(ctx, root, hostname, run_dir, docker_socket, cni_bin_dir, cni_conf_dir, mtu, no_cni, no_systemctl):
    """Install the agent's systemd unit, the CNI plugin and a default config file; enable the service."""
    manifest = Manifest.load(root)
    try:
        if not no_cni:
            manifest.makedirs(cni_bin_dir)
            manifest.makedirs(cni_conf_dir)
            paths = install_cni(
                under(root, cni_bin_dir),
                under(root, cni_conf_dir),
                agent_socket=f"{run_dir.rstrip('/')}/agent.sock",
                mtu=mtu,
            )
            for path in paths:
                manifest.record(target_of(root, path))
        if not os.path.exists(under(root, CONFIG_PATH)):
            text = render_default(
                hostname or socket.gethostname(),
                _etcd_settings(ctx),
                run_dir=run_dir,
                docker_socket=docker_socket or None,
            )
            manifest.write(CONFIG_PATH, text.encode(), 0o644)
        else:
            click.echo(f"kept the existing {under(root, CONFIG_PATH)}")  # an operator's edits survive reinstalls
        manifest.write(UNIT_PATH, render_unit(_agent_binary(), CONFIG_PATH).encode(), 0o644)
    finally:
        manifest.save()
    for target in sorted(manifest.files):
        click.echo(f"installed {under(root, target)}")
    if not no_systemctl and systemd_running(root):
        systemctl("daemon-reload")
        systemctl("enable", UNIT_NAME)
        click.echo(f"enabled {UNIT_NAME}: start it with systemctl start {UNIT_NAME}")


@click.command("uninstall")
@click.option("--root", default="/", show_default=True, help="The directory install was given.")
@click.option("--netns", default=None, help="Remove the agent's kernel state from this namespace (default: the host).")
@click.option("--bpffs-dir", default=DEFAULT_BPFFS_DIR, show_default=True, help="The agent's BPF pins.")
@click.option("--remove-endpoints", is_flag=True, help="Also delete the containers' host-side veths (np*).")
@click.option("--keep-kernel-state", is_flag=True, help="Remove only the installed files.")
@click.option("--force", is_flag=True, help="Remove installed files even if changed since install.")
@click.option("--no-systemctl", is_flag=True, help="Never call systemctl (also skipped when systemd is not running).")
def uninstall(root, netns, bpffs_dir, remove_endpoints, keep_kernel_state, force, no_systemctl):
    """Stop the agent, remove its chains, ipsets, routes and BPF pins, and exactly the files install wrote."""
    use_systemctl = not no_systemctl and systemd_running(root)
    if use_systemctl:
        systemctl("disable", "--now", UNIT_NAME, check=False)
    if not keep_kernel_state:
        for line in remove_kernel_state(netns, bpffs_dir=bpffs_dir, remove_endpoints=remove_endpoints):
            click.echo(line)
    removed, kept = Manifest.load(root).remove(force=force)
    for path in removed:
        click.echo(f"removed {path}")
    for path in kept:
        click.echo(f"kept {path}")
    if use_systemctl:
        systemctl("daemon-reload", check=False)


COMMANDS = [install, uninstall]
