"""The package's import structure: imports point down through the README's layers (no cycle),
and the model core needs no Ray or MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from skray.dev.testing import write_labeled_folder

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

# What a fresh interpreter holds of torch after some code: its top-level packages imported.
TORCH = "sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision'})"


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter, nothing imported before it; fails on its errors."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    return result


def printed(code: str, expression: str) -> object:
    """The value of ``expression`` in a fresh interpreter after ``code``."""
    return ast.literal_eval(fresh_python(f"{code}\nprint(repr({expression}))\n").stdout)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def skray_imports(path: Path) -> set[str]:
    """The skray modules ``path`` imports anywhere in it: at module level and inside functions.

    ``from skray.label import sinks`` imports the module ``skray.label.sinks``;
    ``from skray.label.sinks import MANIFEST`` imports it too.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "skray":
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            named = submodules & MODULES.keys()
            found.update(named or {node.module})
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("skray."))
    return found


def import_graph() -> dict[str, set[str]]:
    """Every module's skray imports; a package is its ``__init__`` (``skray.io.sources``
    re-exports its formats' names, so importing it imports them)."""
    return {name: skray_imports(path) & MODULES.keys() - {name} for name, path in MODULES.items()}


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


# The README's layout, bottom up: a module imports only from its own folder or the ones
# before it. Top-level modules (``skray.cli``) are the top.
FOLDERS = ("core", "io", "weights", "inference", "report", "label", "train", "serve", "dev")

# The imports that point up a folder, each with its reason.
CROSS_LINKS = {
    # A report reads a labeling output; the output's format (parts, manifest, schema) is
    # defined once, where the job writes it, and the job writes the report when it ends.
    ("skray.report.page", "skray.label.sinks"),
    ("skray.report.review", "skray.label.sinks"),
    ("skray.report.scan", "skray.label.sinks"),
}


def folder_rank(module: str, folders=FOLDERS) -> int:
    parts = module.split(".")
    return folders.index(parts[1]) if len(parts) > 1 and parts[1] in folders else len(folders)


def upward_imports(graph: dict[str, set[str]], folders=FOLDERS, allowed=frozenset()) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if folder_rank(target, folders) > folder_rank(module, folders)
        and (module, target) not in allowed
    )


def test_every_module_lives_in_a_known_folder() -> None:
    unplaced = sorted(
        m for m in import_graph() if m.count(".") > 1 and m.split(".")[1] not in FOLDERS
    )
    assert not unplaced, f"modules in no known folder (add to FOLDERS and the README): {unplaced}"


def test_modules_import_only_from_their_own_or_lower_folders_but_the_named_cross_links() -> None:
    assert upward_imports(import_graph(), allowed=CROSS_LINKS) == []


def test_every_cross_link_is_still_used() -> None:
    graph = import_graph()
    assert sorted(link for link in CROSS_LINKS if link[1] not in graph.get(link[0], ())) == []


def test_an_import_from_a_higher_folder_is_named() -> None:
    graph = {"skray.core.model": {"skray.label.job"}, "skray.label.job": {"skray.core.model"}}
    assert upward_imports(graph) == ["skray.core.model imports skray.label.job"]
    assert upward_imports(graph, allowed={("skray.core.model", "skray.label.job")}) == []


def test_the_cycle_finder_names_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "module, skray_modules",
    [
        ("skray", {"skray"}),  # the lazy re-exports load nothing
        ("skray.core.model", {"skray", "skray.core", "skray.core.model", "skray.core.specs"}),
        (
            "skray.core.images",
            {
                "skray",
                "skray.core",
                "skray.core.errors",
                "skray.core.images",
                "skray.core.preprocessing",
                "skray.core.specs",
            },
        ),
        ("skray.core.classes", {"skray", "skray.core", "skray.core.classes"}),
    ],
)
def test_core_modules_import_without_ray_or_mlflow(module: str, skray_modules: set[str]) -> None:
    code = BLOCKED + f"import {module}\nassert not {{'ray', 'mlflow'}} & set(sys.modules)\n"
    loaded = printed(code, "sorted(m for m in sys.modules if m.split('.')[0] == 'skray')")
    assert set(loaded) == skray_modules, "what its docstring says it imports"


def test_the_whole_core_imports_without_ray_or_mlflow() -> None:
    core = sorted(m for m in MODULES if m.startswith("skray.core."))
    code = BLOCKED + "".join(f"import {m}\n" for m in core)
    code += "assert not {'ray', 'mlflow'} & set(sys.modules)\n"
    fresh_python(code)


def test_configs_validate_without_torch() -> None:
    """A CLI checking its config, a driver planning, a Tune trial resolving its config: none
    computes with torch, and each would pay seconds of CPU to import it."""
    code = (
        "import skray.core.specs, skray.core.preprocessing, skray.inference.precision\n"
        "import skray.io.config, skray.label.config, skray.train.config, skray.serve.config\n"
        "from skray.label.config import LabelConfig\n"
        "LabelConfig(input='in', output='out').fingerprint()\n"
    )
    assert printed(code, TORCH) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["label", "--input", "in/", "--output", "out/", "--set", "actors.maxx=3"],
        ["train", "--set", "optim.learning_rate=0.1"],
    ],
)
def test_a_bad_label_or_train_config_fails_before_torch_is_imported(argv) -> None:
    """A typo in a ``ray job submit`` command fails in a second, not after seconds of imports."""
    code = f"from skray.cli import main\ncode = main({argv!r})"
    assert printed(code, f"(code, {TORCH})") == (2, [])


def test_the_labeling_read_tasks_import_no_torch() -> None:
    """Most of a run's processes are read tasks, which read and crop with Pillow and numpy:
    torch's import would cost each of them seconds of CPU and hundreds of MB."""
    assert printed("import skray.label.read, skray.core.crops, skray.core.images", TORCH) == []


def test_the_training_read_tasks_read_and_crop_without_torch(tmp_path) -> None:
    """Ray starts a training run's read tasks in fresh processes whenever more run at once than
    there are CPUs, mid-epoch: each would pay torch's import again. Both the random training
    crop and the eval crop of a unit come out of a process that never imported torch."""
    write_labeled_folder(str(tmp_path), classes=2, per_class=4)
    code = (
        "import pyarrow as pa\n"
        "from skray.core.preprocessing import PreprocessingConfig\n"
        "from skray.train.datasets import discover, read_labeled\n"
        f"data = discover({str(tmp_path)!r})\n"
        "units = pa.Table.from_pylist([data.units[0].to_row()])\n"
        "eval_cfg = PreprocessingConfig(image_size=32).model_dump()\n"
        "crops = [b['image'].shape for train in (True, False)\n"
        "         for b in read_labeled(units, data, 32, train, eval_cfg, {}, 8)]\n"
    )
    assert printed(code, f"(crops, {TORCH})") == ([(8, 3, 32, 32)] * 2, [])


def test_the_processes_that_label_and_serve_import_no_torchvision() -> None:
    """Importing torchvision runs ``torch._dynamo`` (over a second of CPU): every read task,
    model actor and replica would pay it for the eval crop, which needs only Pillow."""
    code = "import skray.label.predictor, skray.serve.replica, skray.train.evaluate"
    dynamo = "sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:1]"
    assert printed(code, f"{TORCH} + {dynamo}") == ["torch"]


def test_a_training_worker_imports_mlflow_only_where_it_logs() -> None:
    """Every Ray Train worker imports the loop at each start and restart; only rank 0 logs, so
    only its process pays MLflow's import (1.6 s of CPU): the module imports none, and the
    loop imports the store only inside its ``if rank == 0:`` branch."""
    assert printed("import skray.train.loop", "'mlflow' in sys.modules") is False

    tree = ast.parse(MODULES["skray.train.loop"].read_text())
    rank0 = [
        n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "rank == 0"
    ]
    stores = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        and n.module == "skray.weights"
        and any(alias.name == "store" for alias in n.names)
    ]
    assert stores and all(any(n in ast.walk(branch) for branch in rank0) for n in stores)


def test_the_first_names_a_user_imports_load_on_first_use() -> None:
    code = BLOCKED + (
        "import skray\n"
        "model = skray.create_model('skresnext14_8x4d_half')\n"
        "assert skray.Classifier.__module__ == 'skray.inference.classifier'\n"
        "assert 'skray.inference.classifier' in sys.modules\n"
    )
    assert printed(code, "type(model).__name__") == "SKResNeXt"


def test_blocking_works_on_a_module_that_needs_mlflow() -> None:
    code = BLOCKED + "import skray.weights.store\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100
    )
    assert "mlflow is blocked" in result.stderr


def test_the_tests_mirror_the_package() -> None:
    """A test folder per subpackage, named as it is; cross-cutting tests (cli, imports) at top."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders <= set(FOLDERS), f"test folders with no subpackage: {folders - set(FOLDERS)}"
    top = {p.stem.removeprefix("test_") for p in tests.glob("test_*.py")}
    assert top <= {"cli", "imports"}, f"tests to move into their subpackage's folder: {top}"
