"""Helpers shared by the benchmark scripts (``scripts/bench_*.py``).

Pure pieces (statistics, parsing of iperf3/sockperf output, report rendering) are unit-tested; ``stats`` is the
one definition of medians and percentiles every benchmark reports; ``cleanup`` makes every benchmark leave nothing
behind, also on Ctrl-C or SIGTERM; ``machine`` describes the box a figure came from. What a benchmark builds
(datapath_paths, policy_bench) it builds through netplugin/lab, the one home of labs, namespaces and etcd.
"""
