"""Configuration objects, built once in the composition root (the agent's main or netctl) and passed down.

Nothing here reads the environment: the entry points' options do (click's ``envvar``), then build these.
"""

from dataclasses import dataclass, field

import click

from netplugin.errors import InvalidInput


def read_password_file(path: str) -> str:
    """The etcd password kept in a file: the preferred way (a command-line flag shows in ``ps`` to every user;
    the environment is readable by root in /proc/PID/environ and is inherited by children). One trailing
    newline, as editors and ``echo`` leave it, is not part of the password."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InvalidInput(f"cannot read the etcd password file '{path}': {e.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"the etcd password file '{path}' is not UTF-8 text") from None
    password = text[:-1] if text.endswith("\n") else text
    password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise InvalidInput(f"the etcd password file '{path}' is empty")
    return password


def resolve_password(password: str | None = None, password_file: str | None = None) -> str | None:
    """The password from ``--etcd-password`` (or NETPLUGIN_ETCD_PASSWORD) or ``--etcd-password-file`` (or
    NETPLUGIN_ETCD_PASSWORD_FILE); both at once is a mistake an operator should hear about."""
    if password and password_file:
        raise InvalidInput(
            "the etcd password is given twice: use --etcd-password-file (preferred) or "
            "--etcd-password / NETPLUGIN_ETCD_PASSWORD, not both"
        )
    return read_password_file(password_file) if password_file else password


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd. ``endpoints`` are tried in order; the first that answers is used."""

    endpoints: tuple = ("http://127.0.0.1:2379",)
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = 5.0

    def __post_init__(self):
        eps = self.endpoints
        if isinstance(eps, str):
            eps = [e for e in eps.split(",") if e.strip()]
        eps = tuple(e.strip() for e in eps)
        if not eps:
            raise InvalidInput("no etcd endpoint given")
        for e in eps:
            if not (e.startswith("http://") or e.startswith("https://")):
                raise InvalidInput(f"etcd endpoint {e!r} must start with http:// or https://")
        object.__setattr__(self, "endpoints", eps)
        if bool(self.cert) != bool(self.key):
            raise InvalidInput("etcd client certificate and key must be given together")


@dataclass(frozen=True)
class AgentConfig:
    hostname: str
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    run_dir: str = "/run/netplugin"
    node_address: str | None = None
    node_address6: str | None = None
    as_number: int | None = None
    labels: dict = field(default_factory=dict)
    mtu: int = 1500
    liveness_ttl: int = (
        8  # under the BGP hold time (9 s): a dead host with its links up leaves as fast as a vanished one
    )
    reclaim_grace: float = 600.0
    reclaim_interval: float = 30.0
    resync_interval: float = 60.0
    routing: str = "bgp"  # bgp | direct | none
    policy_setup_timeout: float = 2.0  # ADD waits this long for policy to cover the new endpoint (0: no wait)
    sync_deadline: float = 30.0  # a sync pass running longer than this, or none for resync+this, is "stalled"
    etcd_start_timeout: float = 0.0  # how long start-up waits for etcd to answer (0: until it does)
    docker_socket: str | None = None  # where the libnetwork plugin listens; None = do not serve Docker
    docker_api: str | None = None  # dockerd's API socket, to read container labels on Join
    docker_gc_interval: float = 60.0  # seconds between collections of endpoints Docker lost (0: none)
    metrics_listen: str | None = None  # ADDR:PORT of /metrics, /livez and /readyz; None = not served
    dataplane: str = "iptables"  # iptables | bpf (falls back to iptables, in one log line, if the host can't)
    bpffs: str = "/sys/fs/bpf/netplugin"  # where the bpf dataplane pins its programs and maps
    bpf_objects: str | None = None  # the built BPF objects' directory; None: build/bpf beside the source


ETCD_OPTIONS = (
    click.option(
        "--etcd-endpoints",
        envvar="NETPLUGIN_ETCD_ENDPOINTS",
        default="http://127.0.0.1:2379",
        show_default=True,
        help="Comma-separated etcd URLs (env NETPLUGIN_ETCD_ENDPOINTS).",
    ),
    click.option("--etcd-ca", envvar="NETPLUGIN_ETCD_CA_CERT", default=None, help="CA certificate for etcd TLS."),
    click.option("--etcd-cert", envvar="NETPLUGIN_ETCD_CERT", default=None, help="Client certificate for etcd."),
    click.option("--etcd-key", envvar="NETPLUGIN_ETCD_KEY", default=None, help="Client key for etcd."),
    click.option("--etcd-user", envvar="NETPLUGIN_ETCD_USERNAME", default=None, help="etcd user name."),
    click.option(
        "--etcd-password",
        envvar="NETPLUGIN_ETCD_PASSWORD",
        default=None,
        help="etcd password (env NETPLUGIN_ETCD_PASSWORD); shows in ps: prefer --etcd-password-file.",
    ),
    click.option(
        "--etcd-password-file",
        envvar="NETPLUGIN_ETCD_PASSWORD_FILE",
        default=None,
        help="File holding the etcd password (env NETPLUGIN_ETCD_PASSWORD_FILE; preferred, mode 0600).",
    ),
)


def etcd_options(command):
    """The etcd connection options, the same for ``netplugin agent`` and ``netctl`` (and so for the agent's
    config file, whose ``[etcd]`` keys come from them)."""
    for option in reversed(ETCD_OPTIONS):
        command = option(command)
    return command


def etcd_config(etcd_endpoints, etcd_ca, etcd_cert, etcd_key, etcd_user, etcd_password, etcd_password_file):
    """The EtcdConfig those options describe (InvalidInput for a bad combination)."""
    return EtcdConfig(
        endpoints=etcd_endpoints,
        ca_cert=etcd_ca,
        cert=etcd_cert,
        key=etcd_key,
        username=etcd_user,
        password=resolve_password(etcd_password, etcd_password_file),
    )
