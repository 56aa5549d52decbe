"""``netctl``: the operator's CLI. Every expected failure is one line on stderr and a non-zero exit."""

import logging
import sys

import click

from netplugin.config import etcd_config, etcd_options
from netplugin.errors import NetpluginError


class Context:
    """Built lazily so ``netctl --help`` and local-only commands never need etcd."""

    def __init__(self, etcd_config):
        self.etcd_config = etcd_config
        self._ds = None

    @property
    def ds(self):
        if self._ds is None:
            from netplugin.datastore.client import Datastore

            self._ds = Datastore(self.etcd_config)
        return self._ds


class Cli(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NetpluginError as e:
            click.echo(f"netctl: error: {e.msg}", err=True)
            sys.exit(1)


@click.group(cls=Cli)
@click.version_option(package_name="netplugin", prog_name="netctl")
@etcd_options
@click.option("-v", "--verbose", is_flag=True, help="Log debug output to stderr.")
@click.pass_context
def cli(ctx, etcd_endpoints, etcd_ca, etcd_cert, etcd_key, etcd_user, etcd_password, etcd_password_file, verbose):
    """Operate a netplugin cluster: pools, IPAM, nodes, BGP peers, policy; apply/delete/get resource files."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = etcd_config(etcd_endpoints, etcd_ca, etcd_cert, etcd_key, etcd_user, etcd_password, etcd_password_file)
    except NetpluginError as e:
        raise click.UsageError(e.msg)
    ctx.obj = Context(cfg)


def _register():
    from netplugin.cli import (
        bgp_cmds,
        bpf_cmds,
        cni_cmds,
        diags,
        health_cmds,
        install_cmds,
        ipam_cmds,
        node_cmds,
        policy_cmds,
        resource_cmds,
    )

    for mod in (
        ipam_cmds,
        node_cmds,
        cni_cmds,
        bgp_cmds,
        health_cmds,
        policy_cmds,
        resource_cmds,
        install_cmds,
        diags,
        bpf_cmds,
    ):
        for command in mod.COMMANDS:
            cli.add_command(command)
    for command in bgp_cmds.NODE_COMMANDS + health_cmds.NODE_COMMANDS:
        node_cmds.node.add_command(command)


_register()
