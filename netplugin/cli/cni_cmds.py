"""``netctl install-cni``."""

import click

from cni.install import DEFAULT_CNI_VERSION, install_cni as install


@click.command("install-cni")
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True)
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True)
@click.option("--network", default="netplugin", show_default=True, help="Network name in the conflist.")
@click.option("--agent-socket", default="/run/netplugin/agent.sock", show_default=True)
@click.option("--mtu", default=1500, show_default=True)
@click.option(
    "--pool",
    "pools",
    multiple=True,
    help="Allocate only from these pools (repeatable; per address family, so an IPv4 pool alone leaves "
    "IPv6 addresses to any IPv6 pool).",
)
@click.option("--ipv6", is_flag=True, help="Give each container an IPv6 address as well as its IPv4 one.")
@click.option(
    "--cni-version",
    default=DEFAULT_CNI_VERSION,
    show_default=True,
    help="cniVersion of the conflist. 1.1.0 adds STATUS and GC, but runtimes built on libcni before 1.2 "
    "(Debian 12's podman, containerd, cri-o) refuse it.",
)
def install_cni(bin_dir, conf_dir, network, agent_socket, mtu, pools, ipv6, cni_version):
    """Install the CNI plugin binary and a conflist for it."""
    bin_path, conf_path = install(
        bin_dir,
        conf_dir,
        network=network,
        agent_socket=agent_socket,
        mtu=mtu,
        pools=list(pools) or None,
        cni_version=cni_version,
        ipv6=ipv6,
    )
    click.echo(f"installed {bin_path} and {conf_path}")


COMMANDS = [install_cni]
