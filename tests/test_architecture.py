"""The import layers of docs/ARCHITECTURE.md, read from the source: spaces/ <- objectives/ <-
results/ <- search/, no circle (function-level imports included, so none hides one), no
optuna below results/, and bad input refused before torch is imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("spaces", "objectives", "results", "search")  # each may import those before it


def modules() -> dict[str, Path]:
    found = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            name = f"compsearch.{layer}" + ("" if path.stem == "__init__" else f".{path.stem}")
            found[name] = path
    return found


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
            # `from compsearch.search import api` imports the module compsearch.search.api
            found += [(f"{node.module}.{alias.name}", id(node) in top) for alias in node.names]
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {target for target, _ in imports(path) if target in known and target != name}
        for name, path in known.items()
    }


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_imports_point_from_higher_layers_to_lower_ones_only():
    upward = [
        f"{source} imports {target}"
        for source, targets in graph().items()
        for target in targets
        if layer(target) > layer(source)
    ]
    assert upward == []


def test_no_import_circle_even_through_function_level_imports():
    edges = graph()
    state: dict[str, str] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_spaces_and_objectives_never_import_optuna():
    users = [
        f"{name} imports {target}"
        for name, path in modules().items()
        if layer(name) <= LAYERS.index("objectives")
        for target, _ in imports(path)
        if target.split(".")[0] == "optuna"
    ]
    assert users == []


def test_the_layers_are_really_used():
    """The graph this file checks is not empty: each layer imports the one below it."""
    edges = graph()
    for upper, lower in zip(LAYERS[1:], LAYERS, strict=False):
        assert any(
            layer(target) == LAYERS.index(lower)
            for source, targets in edges.items()
            if layer(source) == LAYERS.index(upper)
            for target in targets
        ), f"{upper}/ imports nothing of {lower}/"


PROBE = """
import sys
from compsearch.search.cli import main
code = main(sys.argv[1:])
print("torch" in sys.modules, code)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--budget-params", "2e6", "--budget-kb", "300", "--epochs", "1"],
        ["run", "--budget-params", "2e6", "--budget-kb", "300", "--space", "missing.toml"],
        ["run", "--budget-params", "10", "--budget-kb", "0.1"],  # below the smallest model
        ["run", "--budget-params", "2e6", "--budget-kb", "300", "--teacher", "notes.txt"],
        ["run", "--budget-params", "2e6", "--budget-kb", "300", "--dataset", "mnist"],  # no files
        ["export", "--trial", "first"],
        ["show", "--study", "../up"],
        ["show", "--study", "missing"],
        ["plot"],
    ],
)
def test_bad_input_is_refused_before_torch_is_imported(tmp_path, args):
    (tmp_path / "notes.txt").write_text("not a model")
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.stdout.split() == ["False", "2"], result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_import_compsearch_loads_neither_torch_nor_optuna():
    probe = "import sys, compsearch; print([m for m in ('torch', 'optuna') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_the_errors_the_command_line_expects_are_real_error_types():
    """main() names them rather than importing them; a renamed or moved one must fail here."""
    import importlib

    from compsearch.search.cli import EXPECTED_ERRORS, expected

    for name in EXPECTED_ERRORS:
        module, _, qualname = name.rpartition(".")
        kind = getattr(importlib.import_module(module), qualname)
        assert issubclass(kind, Exception) and expected(kind("x"))
    assert not expected(ValueError("an internal error")) and not expected(KeyError("x"))
