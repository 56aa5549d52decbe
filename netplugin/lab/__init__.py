"""Labs: netplugin clusters in network namespaces, and the pieces they are made of, for the demo, the tests and
the benchmarks (one home: tests/ keeps its fixtures and re-exports these, the benchmarks import nothing from
tests/).

A lab that outlives its command (``Lab``, ``scripts/lab.py``): plan.py decides the topology, lab.py builds and
removes it, with topology.py, bgp.py, containers.py and report.py as its parts, state.py records what was made,
system.py runs commands in lab namespaces. Helpers owned by one Python object for its lifetime (test fixtures,
benchmarks): etcd.py (also the lab's etcd), agents.py (an agent and the CNI binary), netns.py (throwaway
namespaces), dockerd.py (a dockerd per host), console.py (where our console scripts are).
"""

from netplugin.lab.lab import Lab
from netplugin.lab.plan import LabSpec, make_plan
from netplugin.lab.report import format_matrix
from netplugin.lab.system import LabError

__all__ = ["Lab", "LabError", "LabSpec", "format_matrix", "make_plan"]
