"""``netplugin agent``: run the per-host agent until SIGTERM."""

import logging
import signal
import sys

import click

from netplugin.agent.config_file import config_option
from netplugin.config import AgentConfig, etcd_config, etcd_options
from netplugin.errors import NetpluginError


class _Logfmt(logging.Formatter):
    """One structured line per event: ``ts=... level=... logger=... msg``."""

    def format(self, record):
        line = (
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d} "
            f"level={record.levelname} logger={record.name} {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _labels(values):
    out = {}
    for item in values:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"label {item!r} must be KEY=VALUE")
        out[k] = v
    return out


@click.group()
@click.version_option(package_name="netplugin", prog_name="netplugin")
def main():
    """netplugin: routed container networking with etcd-backed IPAM and policy."""


@main.command()
@config_option
@click.option("--hostname", required=True, help="This node's name in the cluster.")
@etcd_options
@click.option(
    "--run-dir", default="/run/netplugin", show_default=True, help="Sockets, BIRD config and state of this agent."
)
@click.option("--node-address", help="IPv4 address for BGP and direct routes (default: autodetected).")
@click.option("--node-address6", help="IPv6 address for BGP.")
@click.option("--as-number", type=int, help="This node's AS number (default: the cluster's).")
@click.option("--label", "labels", multiple=True, help="Node label KEY=VALUE (repeatable).")
@click.option("--mtu", type=int, default=1500, show_default=True)
@click.option("--routing", type=click.Choice(["bgp", "direct", "none"]), default="bgp", show_default=True)
@click.option(
    "--docker-socket", default=None, help="Serve the Docker plugin here (e.g. /run/docker/plugins/netplugin.sock)."
)
@click.option("--docker-api", default=None, help="dockerd's API socket, to read container labels.")
@click.option("--liveness-ttl", type=int, default=8, show_default=True)
@click.option(
    "--reclaim-grace",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds a dead host's addresses are kept before reclamation.",
)
@click.option("--reclaim-interval", type=float, default=30.0, show_default=True)
@click.option("--resync-interval", type=float, default=60.0, show_default=True)
@click.option(
    "--policy-setup-timeout",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds ADD waits for policy to cover a new container (0: return at once).",
)
@click.option(
    "--etcd-start-timeout",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds start-up waits for etcd to answer, retrying with back-off (0: until it does).",
)
@click.option(
    "--metrics-listen",
    default=None,
    help="Serve Prometheus /metrics and the /livez and /readyz probes on ADDR:PORT (default: off).",
)
@click.option(
    "--dataplane",
    type=click.Choice(["iptables", "bpf"]),
    default="iptables",
    show_default=True,
    help="bpf: tc programs for anti-spoofing and redirects (iptables if the host cannot run them).",
)
@click.option(
    "--bpffs",
    default="/sys/fs/bpf/netplugin",
    show_default=True,
    help="Directory on a bpf filesystem for the bpf dataplane's pinned programs and maps.",
)
@click.option(
    "--bpf-objects",
    envvar="NETPLUGIN_BPF_OBJECTS",
    default=None,
    help="Directory of the built BPF objects (default: build/bpf beside the source).",
)
@click.option("--log-level", default="INFO", show_default=True)
def agent(
    hostname,
    etcd_endpoints,
    etcd_ca,
    etcd_cert,
    etcd_key,
    etcd_user,
    etcd_password,
    etcd_password_file,
    run_dir,
    node_address,
    node_address6,
    as_number,
    labels,
    mtu,
    routing,
    docker_socket,
    docker_api,
    liveness_ttl,
    reclaim_grace,
    reclaim_interval,
    resync_interval,
    policy_setup_timeout,
    etcd_start_timeout,
    metrics_listen,
    dataplane,
    bpffs,
    bpf_objects,
    log_level,
):
    """Run the per-host agent until SIGTERM."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Logfmt())
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    logging.getLogger("waitress").setLevel(logging.WARNING)
    from netplugin.agent.daemon import Agent

    try:
        cfg = AgentConfig(
            hostname=hostname,
            etcd=etcd_config(
                etcd_endpoints, etcd_ca, etcd_cert, etcd_key, etcd_user, etcd_password, etcd_password_file
            ),
            run_dir=run_dir,
            node_address=node_address,
            node_address6=node_address6,
            as_number=as_number,
            labels=_labels(labels),
            mtu=mtu,
            routing=routing,
            docker_socket=docker_socket,
            docker_api=docker_api,
            liveness_ttl=liveness_ttl,
            reclaim_grace=reclaim_grace,
            reclaim_interval=reclaim_interval,
            resync_interval=resync_interval,
            policy_setup_timeout=policy_setup_timeout,
            etcd_start_timeout=etcd_start_timeout,
            metrics_listen=metrics_listen,
            dataplane=dataplane,
            bpffs=bpffs,
            bpf_objects=bpf_objects,
        )
        the_agent = Agent(cfg)
        signal.signal(signal.SIGTERM, lambda *_: the_agent._stop.set())
        signal.signal(signal.SIGINT, lambda *_: the_agent._stop.set())
        the_agent.start()
    except NetpluginError as e:
        click.echo(f"netplugin: error: {e.msg}", err=True)
        sys.exit(1)
    try:
        the_agent.run_forever()
    finally:
        the_agent.stop()


if __name__ == "__main__":
    main()
