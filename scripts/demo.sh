#!/usr/bin/env bash
# The demo: a multi-host cluster in network namespaces (etcd, BIRD, one agent per host), containers started
# through the CNI plugin, routes spread by BGP, and a policy applied and enforced. Run as root; safe to run twice.
# Everything it makes is removed at the end (pass --keep to leave the lab up; `scripts/lab.py down` removes it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/lab.py demo "$@"
