"""Run a command in a network namespace given by path, or in our own when the path is None.

``nsenter --net=PATH`` switches only the short-lived child; the calling thread never changes namespace.
"""
import logging
import os
import subprocess

from netplugin.errors import DataplaneError, NotFound

log = logging.getLogger(__name__)


def run_in_netns(netns: str | None, argv: list, action: str, input: str | None = None, timeout: float = 20):
    """Run ``argv`` (inside ``netns`` if given) and return its stdout; failures say what was being done."""
    if netns is not None:
        if not os.path.exists(netns):
            raise NotFound(f"failed to {action}: netns '{netns}' does not exist")
        argv = ["nsenter", f"--net={netns}", "--"] + list(argv)
    log.debug("run %s", argv)
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise DataplaneError(f"failed to {action}: {e.filename} is not installed") from None
    except subprocess.TimeoutExpired:
        raise DataplaneError(f"failed to {action}: {argv[0]} did not finish within {timeout}s") from None
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().replace("\n", "; ") or f"exit status {proc.returncode}"
        raise DataplaneError(f"failed to {action}: {reason}")
    return proc.stdout
