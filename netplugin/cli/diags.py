"""``netctl diags``: one tarball with this host's agent log, its view of etcd, netfilter, ipsets, addresses,
routes and rules, BIRD's status and config, the agent's health answer and versions; secrets masked."""

import os
import socket
import time

import click

from netplugin.diags.collect import HOST_COMMANDS, Collector
from netplugin.install.systemd import systemd_running


@click.command("diags")
@click.option(
    "--run-dir",
    default="/run/netplugin",
    show_default=True,
    help="The agent's run directory (its socket, BIRD's config and socket).",
)
@click.option("--log-file", default=None, help="The agent's log file (default: the journal of netplugin.service).")
@click.option("--netns", default=None, help="Collect from this network namespace (default: the host's).")
@click.option("--output", "-o", default=None, help="Tarball to write (default: ./netplugin-diags-HOST-TIME.tar.gz).")
@click.pass_obj
def diags(obj, run_dir, log_file, netns, output):
    """Collect this host's diagnostics into one tarball for a bug report (passwords replaced by ***)."""
    host = socket.gethostname()
    top = f"netplugin-diags-{host}-{time.strftime('%Y%m%dT%H%M%S')}"
    output = output or os.path.join(os.getcwd(), top + ".tar.gz")
    c = Collector(netns, secrets=[obj.etcd_config.password])
    c.logs(log_file, use_journal=systemd_running())
    c.etcd(obj.ds)
    for name, argv in HOST_COMMANDS.items():
        c.command(name, argv)
    c.bird(run_dir)
    c.health(run_dir)
    c.versions()
    parts = c.write(output, top)
    click.echo(f"wrote {output} ({len(parts)} parts)")
    for line in c.errors:
        click.echo(f"  missing {line}", err=True)


COMMANDS = [diags]
