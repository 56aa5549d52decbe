"""Where tests and benchmarks find our console scripts (``netctl``, ``netplugin``): beside the interpreter
running them.

``pip install -e .`` puts them in the environment's scripts directory; asking ``sysconfig`` for it (rather than
naming a checkout's ``.venv``) makes the suite run from a clone in any folder.
"""

import os
import sysconfig


def console_script(name):
    """Absolute path of console script ``name`` of the running environment; a clear error if not installed."""
    path = os.path.join(sysconfig.get_path("scripts"), name)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"console script {name!r} not found at {path}: run scripts/setup.sh, then the "
            "tests with that environment's python (.venv/bin/python -m pytest)"
        )
    return path
