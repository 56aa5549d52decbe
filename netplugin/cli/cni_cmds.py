"""``netctl install-cni``."""
import click


@click.command("install-cni")
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True)
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True)
@click.option("--network", default="netplugin", show_default=True, help="Network name in the conflist.")
@click.option("--agent-socket", default="/run/netplugin/agent.sock", show_default=True)
@click.option("--mtu", default=1500, show_default=True)
@click.option("--pool", "pools", multiple=True, help="Restrict the network to these pools.")
@click.option("--cni-version", default="1.1.0", show_default=True,
              help="cniVersion of the conflist (podman 4 understands up to 1.0.0).")
def install_cni(bin_dir, conf_dir, network, agent_socket, mtu, pools, cni_version):
    """Install the CNI plugin binary and a conflist for it."""
    from cni.install import install_cni as install
    bin_path, conf_path = install(bin_dir, conf_dir, network=network, agent_socket=agent_socket, mtu=mtu,
                                  pools=list(pools) or None, cni_version=cni_version)
    click.echo(f"installed {bin_path} and {conf_path}")


COMMANDS = [install_cni]
