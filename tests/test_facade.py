"""The library's shape: a cheap façade that reaches everything, and layers that point one way."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import revlib

SOURCE = Path(revlib.__file__).resolve().parent
INFRASTRUCTURE = (
    "runtime", "claims", "data", "training", "measure", "timeline", "analysis", "verify", "plotting", "settings", "_checks",
)
CHAPTERS = (
    "backprop", "residual", "reversible", "adjoint", "reversible_heun", "linear_backprop", "checkpoint", "momentum",
    "pytorch_tools", "frontier", "planner",
)  # book order


def imported_revlib_modules(module: str) -> set[str]:
    """The revlib modules ``module`` imports at run time (not under ``if TYPE_CHECKING:``)."""
    tree = ast.parse((SOURCE / f"{module}.py").read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("revlib."):
            found.add(node.module.split(".")[1])
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("revlib."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_import_revlib_loads_nothing_heavy_and_no_chapter_module() -> None:
    code = "import sys, json, revlib; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
    for heavy in ("matplotlib", "sklearn", "tqdm", *(f"revlib.{m}" for m in CHAPTERS)):
        assert heavy not in loaded, f"import revlib loads {heavy}"


def test_every_public_name_resolves() -> None:
    for name in revlib.__all__:
        assert getattr(revlib, name) is not None, name
    for module in revlib._SUBMODULES:
        loaded = getattr(revlib, module)
        assert hasattr(loaded, "__all__"), f"revlib.{module} has no __all__"
        for name in loaded.__all__:
            assert hasattr(loaded, name), f"revlib.{module}.__all__ names {name}, which it does not define"
    assert revlib.reversible.ReversibleSequence is revlib.ReversibleSequence


def test_an_unknown_name_lists_what_exists() -> None:
    with pytest.raises(AttributeError, match=r"has no attribute 'ReversibleSequnce'.*reversible.*ReversibleSequence"):
        revlib.ReversibleSequnce  # noqa: B018


def test_no_module_re_exports_what_it_imports_by_accident() -> None:
    """Names a module takes from elsewhere are not in its __all__ (e.g. PyTorch's checkpoint function)."""
    for module in revlib._SUBMODULES:
        loaded = importlib.import_module(f"revlib.{module}")
        for name in loaded.__all__:
            value = getattr(loaded, name)
            defined_in = getattr(value, "__module__", loaded.__name__)
            is_type_alias = defined_in in ("typing", "collections.abc")  # e.g. LossName = Literal[...]
            assert defined_in in (loaded.__name__, None) or is_type_alias or not callable(value), (
                f"revlib.{module}.{name} comes from {defined_in}"
            )
    assert not hasattr(revlib.checkpoint, "checkpoint"), "torch.utils.checkpoint.checkpoint is not a revlib name"


def test_infrastructure_imports_no_chapter_module() -> None:
    for module in INFRASTRUCTURE:
        chapters = imported_revlib_modules(module) & set(CHAPTERS)
        assert not chapters, f"revlib.{module} imports {sorted(chapters)}"
    assert not imported_revlib_modules("settings") & {*CHAPTERS, "blocks"}, "settings are data"


def test_chapter_modules_import_only_earlier_ideas_and_nothing_imports_the_capstone() -> None:
    for position, module in enumerate(CHAPTERS):
        later = imported_revlib_modules(module) & set(CHAPTERS[position + 1 :])
        assert not later, f"revlib.{module} imports the later {sorted(later)}"
    for capstone in ("frontier", "planner"):
        importers = [path.stem for path in SOURCE.glob("*.py") if capstone in imported_revlib_modules(path.stem)]
        assert importers == [], f"the capstone {capstone} is imported by {importers}"
