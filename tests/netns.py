"""Re-exported for the test suite: the helpers live in netplugin/lab/netns.py, where the benchmarks use them too."""
from netplugin.lab.netns import NamespaceSet, kill_pids, nsexec, run, stop_process, unique

__all__ = ["NamespaceSet", "kill_pids", "nsexec", "run", "stop_process", "unique"]
