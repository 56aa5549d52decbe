"""Re-exported for the test suite: the helpers live in netplugin/lab/console.py, where the benchmarks use them too."""
from netplugin.lab.console import console_script

__all__ = ["console_script"]
