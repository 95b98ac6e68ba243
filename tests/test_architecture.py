"""The layers' import rules (docs/architecture.md): the model library knows nothing of Ray or HTTP, the HTTP face
never loads torch (every Ingress replica imports it; torch alone is most of a replica's memory), and no module
imports, however lazily, one that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bcnn", "deployments", "serve_app", "batch", "load")


def _imported(path: Path) -> set[str]:
    """Every dotted name a module imports anywhere in its source (a function's import included): `from a.b import
    c` names `a.b` and `a.b.c`."""
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named.add(node.module)
            named.update(f"{node.module}.{alias.name}" for alias in node.names)
    return named


def _imports(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of `package` imports, by module path."""
    return {str(path.relative_to(ROOT)): {name.split(".")[0] for name in _imported(path)}
            for path in sorted((ROOT / package).rglob("*.py"))}


def test_the_model_library_imports_no_serving_code() -> None:
    forbidden = {"ray", "starlette", "deployments", "serve_app", "load", "batch"}
    offending = {module: names & forbidden for module, names in _imports("bcnn").items() if names & forbidden}
    assert not offending


def test_nothing_under_serve_app_loads_torch() -> None:
    """In a fresh interpreter, as an Ingress replica starts: every module under serve_app/, and what they import."""
    code = ("import importlib, pkgutil, sys, serve_app\n"
            "for m in pkgutil.walk_packages(serve_app.__path__, 'serve_app.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(n for n in ('torch', 'torchvision', 'onnxruntime', 'onnx') if n in sys.modules))\n")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout == "[]\n", loaded.stderr[-2000:]
    assert not {m: n for m, n in _imports("serve_app").items() if "torch" in n}


def _module_graph() -> dict[str, set[str]]:
    """Our modules and the ones of ours each imports."""
    paths = {".".join(path.relative_to(ROOT).with_suffix("").parts): path
             for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    return {module: {name for name in _imported(path) if name in paths and name != module}
            for module, path in paths.items()}


def test_no_import_circle() -> None:
    graph = _module_graph()
    assert graph["bcnn.weights"] and graph["serve_app.http"]  # the graph sees imports at all
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        raise AssertionError(f"an import circle: {' -> '.join(e.args[1])}") from None


def test_no_measurement_imports_another() -> None:
    """Each scenario of `python -m load` builds on the runner and the shared tools (load generators, CPU by role,
    the bare model's timing, the benchmark devices), never on another scenario: `make bench`'s list is
    load/__main__.py's alone."""
    from load.__main__ import SCENARIOS

    scenarios = set(SCENARIOS.values()) - {"load.__main__"}
    graph = _module_graph()
    assert scenarios < graph.keys() and graph["load.service"]
    assert not {module: graph[module] & scenarios for module in graph if graph[module] & scenarios}
