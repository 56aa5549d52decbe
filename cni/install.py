"""Install the CNI plugin binary and its network config list where a container runtime finds them.

Both files are written to a temporary name in their target directory and renamed into place, so a runtime
scanning ``/etc/cni/net.d`` or executing ``/opt/cni/bin/netplugin`` never sees half a file. Running it again
rewrites identical content: installing is idempotent.
"""

import json
import os
import subprocess
import sys
import tempfile

import netaddr

from netplugin.errors import InvalidInput, NetpluginError

PLUGIN_TYPE = "netplugin"
SYSTEM_PYTHON = "/usr/bin/python3"
PLUGIN_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py")
# Run by the plugin's interpreter: plugin.py (on stdin) compiled, its code object printed base64-encoded.
_COMPILE = (
    "import binascii, marshal, sys; code = compile(sys.stdin.buffer.read(), 'cni/plugin.py', 'exec'); "
    "sys.stdout.write(binascii.b2a_base64(marshal.dumps(code), newline=False).decode())"
)
CNI_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
# The newest version today's runtimes read: libcni before 1.2 (Debian 12's 1.1.2, hence its podman 4.3, containerd
# and cri-o) refuses a 1.1.0 conflist ("unsupported CNI result version"). 1.1.0 (STATUS, GC) stays on request.
DEFAULT_CNI_VERSION = "1.0.0"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def install_cni(
    bin_dir,
    conf_dir,
    network="netplugin",
    agent_socket="/run/netplugin/agent.sock",
    mtu=1500,
    python=None,
    pools=None,
    cni_version=DEFAULT_CNI_VERSION,
    ipv6=False,
):
    """Write ``bin_dir/netplugin`` and ``conf_dir/10-<network>.conflist``; return their paths.

    ``python`` is the interpreter named in the plugin's shebang (default: ``default_plugin``'s). ``pools`` are
    CIDRs put in the plugin's ``ipam`` section. ``cni_version`` is the conflist's cniVersion. ``ipv6`` gives every
    container an IPv6 address too (``ipam.assign_ipv6``), from any IPv6 pool unless ``pools`` names some.
    """
    conflist = render_conflist(network, agent_socket, mtu, pools, cni_version, ipv6)
    script = render_plugin(python) if python else default_plugin()
    bin_path = os.path.join(bin_dir, PLUGIN_TYPE)
    conf_path = os.path.join(conf_dir, f"10-{network}.conflist")
    _write_atomic(bin_path, script, 0o755)
    _write_atomic(conf_path, (json.dumps(conflist, indent=2) + "\n").encode(), 0o644)
    return bin_path, conf_path


def render_conflist(network, agent_socket, mtu, pools=None, cni_version=DEFAULT_CNI_VERSION, ipv6=False):
    """The network config list as a dict, after checking every input."""
    if (
        not isinstance(network, str)
        or not network
        or not network[0].isalnum()
        or not network.isascii()
        or not set(network) <= _NAME_CHARS
    ):
        raise InvalidInput(f"invalid CNI network name {network!r}: use letters, digits, '_', '.', '-'")
    if not isinstance(agent_socket, str) or not os.path.isabs(agent_socket):
        raise InvalidInput(f"agent socket {agent_socket!r} must be an absolute path")
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535:  # the agent's range
        raise InvalidInput(f"MTU {mtu!r} must be a whole number from 576 to 65535")
    if cni_version not in CNI_VERSIONS:
        raise InvalidInput(f"CNI version {cni_version!r} is not one of {', '.join(CNI_VERSIONS)}")
    plugin = {"type": PLUGIN_TYPE, "agent_socket": agent_socket, "mtu": mtu}
    if not isinstance(ipv6, bool):
        raise InvalidInput(f"ipv6 {ipv6!r} must be true or false")
    ipam = {}
    if pools:
        ipam["pools"] = [_cidr(p) for p in pools]
    if ipv6:
        ipam["assign_ipv6"] = True
    if ipam:
        plugin["ipam"] = ipam
    plugin["capabilities"] = {"ips": True}
    return {"cniVersion": cni_version, "name": network, "plugins": [plugin]}


def default_plugin():
    """The plugin for the system's python3 when it can run it, else for the interpreter running this.

    The plugin is stdlib-only, so it needs no virtualenv: a binary naming the installer's venv would break when
    that venv is removed or rebuilt. And the distribution's build starts faster than a self-built one: VERSION
    took 10.9 ms with Debian's /usr/bin/python3 against 12.2 ms with a pyenv 3.11 here, on every CNI call.
    """
    if os.access(SYSTEM_PYTHON, os.X_OK):
        try:
            return render_plugin(SYSTEM_PYTHON)
        except NetpluginError:  # older than the plugin needs
            pass
    return render_plugin(sys.executable)


def render_plugin(python):
    """A launcher for ``python``: its shebang, then plugin.py's code object as compiled by that interpreter.

    Why precompiled: a script is compiled from source on every run, and compiling plugin.py costs about 5 ms, a
    third of what VERSION costs in all; decoding the code object costs well under one. The interpreter that will
    run it compiles it (bytecode and marshal's format are its own), so nothing depends on the installer's version.
    Tracebacks name cni/plugin.py and its line numbers. The flags go in one word (``-IS``): Linux hands everything
    after the interpreter path to it as a single argument, and python rejects ``"-I -S"``.
    """
    if not isinstance(python, str) or not os.path.isabs(python) or any(c.isspace() for c in python):
        raise InvalidInput(f"plugin interpreter {python!r} must be an absolute path without spaces")
    if not os.access(python, os.X_OK):
        raise InvalidInput(f"plugin interpreter {python} is not an executable file")
    with open(PLUGIN_SOURCE, "rb") as f:
        source = f.read()
    try:
        p = subprocess.run([python, "-IS", "-c", _COMPILE], input=source, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetpluginError(f"plugin interpreter {python} could not be run: {err}") from err
    if p.returncode != 0 or not p.stdout:
        why = (p.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise NetpluginError(
            f"plugin interpreter {python} could not compile the CNI plugin: {why}",
            "the plugin needs Python 3.10 or later",
        )
    return (
        (
            f"#!{python} -IS\n# netplugin's CNI plugin, compiled from cni/plugin.py by netctl install-cni\n"
            "import binascii, marshal\nexec(marshal.loads(binascii.a2b_base64(b'"
        ).encode()
        + p.stdout
        + b"')))\n"
    )


def _cidr(value):
    try:
        net = netaddr.IPNetwork(value)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise InvalidInput(f"pool {value!r} is not a CIDR")
    if net.ip != net.network:
        raise InvalidInput(f"pool {value} has host bits set; did you mean {net.cidr}?")
    return str(net.cidr)


def _write_atomic(path, data, mode):
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    except OSError as err:
        raise NetpluginError(f"failed to create {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise NetpluginError(f"failed to write {path}: {err.strerror or err}") from err
        raise
