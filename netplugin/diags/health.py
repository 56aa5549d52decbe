"""The local agent's health answer, read from its CNI API socket: for ``netctl health --local`` and the diags
tarball (here, below the CLI, so that diags never imports the CLI that imports it)."""

import json
import os

from netplugin.docker.dockerapi import _UnixConnection
from netplugin.errors import NetpluginError, NotFound


def agent_health(run_dir, timeout=5.0):
    """The local agent's health answer (a dict), read from its socket."""
    path = os.path.join(run_dir, "agent.sock")
    if not os.path.exists(path):
        raise NotFound(f"no agent socket at {path}: is the agent running here (--run-dir)?")
    conn = _UnixConnection(path, timeout)
    try:
        conn.request("GET", "/v1/health")
        body = conn.getresponse().read()
    except OSError as e:
        raise NetpluginError(f"asking the agent at {path} for its health: {e}") from None
    finally:
        conn.close()
    try:
        return json.loads(body)
    except ValueError:
        raise NetpluginError(f"the agent at {path} answered its health with something that is not JSON") from None
