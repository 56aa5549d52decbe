"""The package layering stays true: each package imports only the packages its row of ``ALLOWED`` names.

Lower layers (errors, kernel, datastore, ipam, dataplane) know nothing of the layers above them, so a second
dataplane backend or another front door can be added without touching them, and nothing has an import cycle.
A package is a top-level module or directory (``policy``, ``cni``) or one under ``netplugin`` (``netplugin.ipam``);
imports inside one package are free. Imports inside functions count too: they are still dependencies.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOPS = ("netplugin", "policy", "cni")

_BASE = {"netplugin.errors"}
# package -> the packages it may import (besides itself). Lowest layers first.
ALLOWED = {
    "netplugin.errors": set(),
    "netplugin.loops": _BASE,
    "netplugin.config": _BASE,
    "netplugin.kernel": _BASE,
    "netplugin.datastore": _BASE,
    "netplugin.nodes": _BASE | {"netplugin.datastore"},
    "netplugin.ipam": _BASE | {"netplugin.datastore", "netplugin.nodes"},
    "netplugin.dataplane": _BASE | {"netplugin.kernel"},
    "netplugin.routing": _BASE | {"netplugin.kernel", "netplugin.dataplane"},
    "policy": _BASE | {"netplugin.kernel", "netplugin.datastore"},
    "netplugin.service": _BASE | {"netplugin.dataplane", "netplugin.datastore", "netplugin.ipam", "netplugin.nodes"},
    "netplugin.resources": _BASE | {"netplugin.datastore", "netplugin.ipam", "policy"},
    "cni": _BASE,
    "netplugin.docker": _BASE
    | {
        "netplugin.loops",
        "netplugin.config",
        "netplugin.dataplane",
        "netplugin.datastore",
        "netplugin.ipam",
        "netplugin.nodes",
        "netplugin.service",
    },
}
# The composition root and the tools above it may import any layer below, never each other's insides.
_LOW = set(ALLOWED)
ALLOWED["netplugin.agent"] = _LOW
ALLOWED["netplugin.install"] = _LOW
ALLOWED["netplugin.diags"] = _LOW
# netctl install finds the installed console scripts through netplugin.lab.console.
ALLOWED["netplugin.cli"] = _LOW | {"netplugin.agent", "netplugin.install", "netplugin.diags", "netplugin.lab"}
ALLOWED["netplugin.lab"] = _LOW
ALLOWED["netplugin.benchlib"] = _LOW | {"netplugin.agent", "netplugin.lab"}


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "netplugin" and len(parts) > 1 else parts[0]


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imports_of(path: str) -> set:
    """Every project module ``path`` imports (``from netplugin import loops`` is ``netplugin.loops``)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "netplugin":
                out |= {f"netplugin.{a.name}" for a in node.names}
            else:
                out.add(node.module)
    return {m for m in out if m.split(".")[0] in TOPS}


def package_graph() -> dict:
    """package -> {imported package: [modules that import it]}."""
    graph = {}
    for top in TOPS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                src = package_of(_module_name(path))
                edges = graph.setdefault(src, {})
                for mod in imports_of(path):
                    dst = package_of(mod)
                    if dst != src:
                        edges.setdefault(dst, []).append(_module_name(path))
    return graph


def cycles(graph: dict) -> list:
    """Each import cycle once, as a list of packages (depth-first search)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


GRAPH = package_graph()


def test_every_package_has_a_row():
    assert set(GRAPH) <= set(ALLOWED) | {"netplugin"}, "add the new package to ALLOWED at its layer"


@pytest.mark.parametrize("package", sorted(GRAPH))
def test_package_imports_only_what_its_layer_allows(package):
    extra = {dst: mods for dst, mods in GRAPH[package].items() if dst not in ALLOWED.get(package, set())}
    assert not extra, f"{package} imports above its layer: " + "; ".join(
        f"{dst} from {', '.join(sorted(set(mods)))}" for dst, mods in sorted(extra.items())
    )


def test_no_package_import_cycle():
    assert cycles({src: set(edges) for src, edges in GRAPH.items()}) == []


def test_the_allowed_table_itself_has_no_cycle():
    assert cycles(ALLOWED) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
