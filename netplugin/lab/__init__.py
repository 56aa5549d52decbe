"""Multi-host labs: netplugin clusters in network namespaces, for the demo, the tests and the benchmarks."""
from netplugin.lab.lab import Lab
from netplugin.lab.plan import LabSpec, make_plan
from netplugin.lab.report import format_matrix
from netplugin.lab.system import LabError

__all__ = ["Lab", "LabError", "LabSpec", "format_matrix", "make_plan"]
