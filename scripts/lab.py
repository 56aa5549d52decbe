#!/usr/bin/env python3
"""Multi-host netplugin labs in network namespaces (run as root with the project's virtualenv python):

    python scripts/lab.py demo                      # 3 hosts, 2 containers each, ping matrix; stays up
    python scripts/lab.py up --hosts 4 --racks 2    # build a lab (see --help of each command)
    python scripts/lab.py run h1 web --label app=web
    python scripts/lab.py exec web -- ip addr
    python scripts/lab.py status | ping | down

The logic lives in netplugin/lab/ so tests and benchmarks build the same labs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netplugin.lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
