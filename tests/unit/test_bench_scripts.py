"""The benchmark scripts use the project's own helpers: they import nothing from the test suite, and report
percentiles through netplugin.benchlib.stats alone (so their p99s can be compared)."""

import ast
import glob
import os

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts")
BENCHES = sorted(glob.glob(os.path.join(SCRIPTS, "bench_*.py")))


def _tree(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def test_there_are_benchmarks_to_check():
    assert len(BENCHES) >= 6


@pytest.mark.parametrize("path", BENCHES, ids=os.path.basename)
def test_benchmark_imports_nothing_from_the_tests(path):
    imported = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {m for m in imported if m == "tests" or m.startswith("tests.")}


@pytest.mark.parametrize("path", BENCHES, ids=os.path.basename)
def test_benchmark_defines_no_percentile_of_its_own(path):
    names = {n.name for n in ast.walk(_tree(path)) if isinstance(n, ast.FunctionDef)}
    assert not names & {"percentile", "quantile", "median"}
