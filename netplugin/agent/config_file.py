"""The agent's TOML config file: every ``netplugin agent`` option, flags and environment overriding it.

The file's keys are derived from the click command itself (one list of options, so a new flag is at once a
config key): an option ``--run-dir`` is ``run_dir``; the ``--etcd-*`` options live in an ``[etcd]`` table
(``endpoints``, ``ca``, ``cert``, ``key``, ``user``, ``password_file`` and, discouraged, ``password``); repeatable
``--label`` is a ``[labels]`` table. The file becomes click's ``default_map``, so the precedence is: command line,
then environment, then file, then built-in default. Unknown keys and wrong types fail in one line naming
``file:key``, before anything starts.
"""

import json
import os
import tomllib

import click

from netplugin.errors import InvalidInput

DEFAULT_PATH = "/etc/netplugin/agent.toml"
ETCD_TABLE = "etcd"
LABELS_TABLE = "labels"
_NOT_IN_FILE = {"config"}


def file_key(param):
    """The config-file key of a click option: (table or None, key)."""
    if param.name.startswith("etcd_"):
        return ETCD_TABLE, param.name[len("etcd_") :]
    if param.name == "labels":
        return None, LABELS_TABLE
    return None, param.name


def load(path):
    """The parsed TOML document; InvalidInput naming the file when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise InvalidInput(f"cannot read the config file '{path}': {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"{path}: not valid TOML: {e}") from None


def default_map(command, doc, path):
    """click's default_map for ``command`` from the TOML document ``doc`` (read from ``path``)."""
    params = {file_key(p): p for p in command.params if isinstance(p, click.Option) and p.name not in _NOT_IN_FILE}
    out = {}
    for key, value in doc.items():
        if key == ETCD_TABLE:
            if not isinstance(value, dict):
                raise InvalidInput(f"{path}:{key}: must be a table ([{key}])")
            for sub, v in value.items():
                param = params.get((ETCD_TABLE, sub))
                if param is None:
                    raise InvalidInput(f"{path}:{key}.{sub}: unknown key")
                out[param.name] = _check(param, v, f"{path}:{key}.{sub}")
            continue
        param = params.get((None, key))
        if param is None:
            raise InvalidInput(f"{path}:{key}: unknown key")
        out[param.name] = _check(param, value, f"{path}:{key}")
    return out


def _check(param, value, where):
    """``value`` as click would take it from the command line, or InvalidInput saying what ``where`` must be."""
    if param.name == "labels":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise InvalidInput(f'{where}: must be a table of strings (labels: KEY = "VALUE")')
        return [f"{k}={v}" for k, v in value.items()]
    if param.name == "etcd_endpoints" and isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise InvalidInput(f"{where}: must be a URL or a list of URLs")
        return ",".join(value)
    kind = param.type
    if isinstance(kind, click.Choice):
        if value not in kind.choices:
            raise InvalidInput(f"{where}: must be one of {', '.join(map(repr, kind.choices))}, not {value!r}")
        return value
    if kind is click.INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{where}: must be a whole number, not {value!r}")
        return value
    if kind is click.FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{where}: must be a number, not {value!r}")
        return float(value)
    if kind is click.BOOL:
        if not isinstance(value, bool):
            raise InvalidInput(f"{where}: must be true or false, not {value!r}")
        return value
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: must be a string, not {value!r}")
    return value


def apply(ctx, param, value):
    """Eager callback of ``--config``: load the file (the default path only if it exists) into the defaults."""
    path = value
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return None
        path = DEFAULT_PATH
    try:
        ctx.default_map = {**(ctx.default_map or {}), **default_map(ctx.command, load(path), path)}
    except InvalidInput as e:
        click.echo(f"netplugin: error: {e.msg}", err=True)
        ctx.exit(1)
    return path


def config_option(command):
    """The ``--config FILE`` option, processed before every other option."""
    return click.option(
        "--config",
        "config",
        default=None,
        is_eager=True,
        expose_value=False,
        callback=apply,
        metavar="FILE",
        help=f"TOML config file with any of these options (default: {DEFAULT_PATH} if it "
        "exists); flags and environment override it.",
    )(command)


def render_default(hostname, etcd, run_dir="/run/netplugin", docker_socket=None):
    """A starting config file for ``netctl install``; ``etcd`` is the [etcd] table (never a password in clear)."""
    lines = [
        "# netplugin agent configuration: every `netplugin agent --help` option is a key (--run-dir: run_dir;",
        "# --etcd-* in [etcd]; --label in [labels]). Flags and NETPLUGIN_* environment variables override it.",
        f"hostname = {_toml(hostname)}",
        f"run_dir = {_toml(run_dir)}",
    ]
    if docker_socket:
        lines.append(f"docker_socket = {_toml(docker_socket)}")
    lines += ["", "[etcd]"] + [f"{k} = {_toml(v)}" for k, v in etcd.items() if k != "password"]
    if "password_file" not in etcd:
        lines += ['# user = "netplugin"', '# password_file = "/etc/netplugin/etcd-password"  # mode 0600']
    lines += [
        '# (`password = "..."` works too but is discouraged: prefer password_file)',
        "",
        "[labels]",
        '# rack = "r1"',
        "",
    ]
    return "\n".join(lines)


def _toml(value):
    """A TOML basic string or array of them: JSON's string escapes are all valid TOML escapes."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)
