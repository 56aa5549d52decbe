#!/usr/bin/env bash
# Run the whole test suite (unit + functional with real etcd, BIRD, iptables, dockerd, podman) as root.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check --quiet .            # the lint and the formatter configured in pyproject.toml
.venv/bin/ruff format --check --quiet .
exec .venv/bin/python -m pytest -p no:cacheprovider -q -ra "$@"
