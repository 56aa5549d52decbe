"""Helpers shared by the benchmark scripts (``scripts/bench_*.py``).

Pure pieces (statistics, parsing of iperf3/sockperf output, report rendering) are unit-tested; ``stats`` is the
one definition of medians and percentiles every benchmark reports; ``cleanup`` makes every benchmark leave nothing
behind, also on Ctrl-C or SIGTERM; ``machine`` describes the box a figure came from. Nothing here builds
namespaces: the scripts build them with netplugin/lab.
"""
