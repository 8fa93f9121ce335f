"""The package's import structure: imports point down through the README's layers (no cycle),
and the model core needs no Ray or MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "skray"

# Any import of these (or of a submodule) raises, as if they were not installed.
BLOCKED = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "mlflow"}:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocked())
"""


def skray_imports(path: Path) -> set[str]:
    """The skray modules ``path`` imports anywhere in it: at module level and inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "skray"
        ):
            if node.module == "skray":  # from skray import tracking
                found.update(
                    f"skray.{alias.name}"
                    for alias in node.names
                    if (PACKAGE / f"{alias.name}.py").is_file()
                )
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("skray."))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {f"skray.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: skray_imports(path) & modules.keys() - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            if cycle := visit(target, path + [node]):
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start, []):
            return cycle
    return None


def test_the_import_graph_of_the_package_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The README's layout, bottom up: a module imports only from its own layer or the ones before.
LAYERS = (
    ("model", "classes", "images", "crops", "device_decode"),
    ("net", "storage", "config", "sources"),
    ("weights", "tracking", "resolver"),
    ("quantize", "classifier", "batching"),
    (
        "plan",
        "lease",
        "sinks",
        "commit",
        "predictor",
        "metrics",
        "label",
        "label_tracking",
        "scan",
        "thumbnails",
        "report_charts",
        "report",
        "review",
    ),
    ("datasets", "train", "evaluate", "sweep", "compare"),
    ("serve_api", "serving", "serve_launch"),
    ("embedded", "testing", "demo", "cli"),
)


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    layer = {f"skray.{m}": i for i, names in enumerate(layers) for m in names}
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if layer[target] > layer[module]
    )


def test_every_module_has_a_layer_and_imports_only_from_its_own_or_lower_ones() -> None:
    graph = import_graph()
    unplaced = sorted(m for m in graph if m.removeprefix("skray.") not in sum(LAYERS, ()))
    assert not unplaced, f"modules in no layer (add them to LAYERS and the README): {unplaced}"
    assert upward_imports(graph) == []


def test_an_import_from_a_higher_layer_is_named() -> None:
    graph = {"skray.model": {"skray.label"}, "skray.label": {"skray.model"}}
    assert upward_imports(graph) == ["skray.model imports skray.label"]


def test_the_cycle_finder_names_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "module, skray_modules",
    [
        ("skray.model", {"skray", "skray.model"}),  # "the part of skray a user can take alone"
        ("skray.images", {"skray", "skray.model", "skray.images"}),
        ("skray.classes", {"skray", "skray.classes"}),
    ],
)
def test_core_modules_import_without_ray_or_mlflow(module: str, skray_modules: set[str]) -> None:
    code = BLOCKED + (
        f"import {module}\n"
        "assert not {'ray', 'mlflow'} & set(sys.modules)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'skray'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    assert set(ast.literal_eval(result.stdout)) == skray_modules, (
        "what its docstring says it imports"
    )


def test_blocking_works_on_a_module_that_needs_mlflow() -> None:
    code = BLOCKED + "import skray.tracking\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100
    )
    assert "mlflow is blocked" in result.stderr
