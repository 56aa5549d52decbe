#!/usr/bin/env bash
# The demo: a multi-host cluster in network namespaces (etcd, BIRD, one agent per host), containers started
# through the CNI plugin, routes spread by BGP, and a policy applied and enforced. Run as root; safe to run twice.
# The lab stays up afterwards so you can explore it (`.venv/bin/python scripts/lab.py status|exec|run`);
# `.venv/bin/python scripts/lab.py down` removes everything (or pass --down-after).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/lab.py demo "$@"
