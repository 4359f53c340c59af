"""Imports flow one way: algorithm modules never reach up to the runners, the learner does
not depend on the reanalyser, the rings stay plain numpy, the compiled core stays torch-free.
Read from the source, so an import inside a function counts as well."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ezengine"

ALGORITHM = ["envs", "model", "search", "replay", "reanalyse", "learner", "collector",
             "evaluate", "batch", "frames", "support"]
ABOVE_ALGORITHM = ["ezengine.trainer", "ezengine.pipeline", "ezengine.agent", "ezengine.play",
                   "ezengine.cli", "ezengine.recipe", "ezengine.rundir"]


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def reaches(imports: set[str], module: str) -> bool:
    return any(name == module or name.startswith(module + ".") for name in imports)


@pytest.mark.parametrize("name", ALGORITHM)
def test_algorithm_modules_never_import_runners(name):
    imports = imported_modules(PACKAGE / f"{name}.py")
    assert not [m for m in ABOVE_ALGORITHM if reaches(imports, m)]


def test_the_learner_does_not_import_the_reanalyser():
    assert not reaches(imported_modules(PACKAGE / "learner.py"), "ezengine.reanalyse")


def test_the_rings_import_only_the_standard_library_and_numpy():
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    imports = imported_modules(PACKAGE / "rings.py")
    assert {m.split(".")[0] for m in imports} <= allowed, imports


def test_the_compiled_core_never_imports_torch():
    sources = [*ROOT.glob("ezengine_core/*.pyx"), *ROOT.glob("ezengine_core/*.pxd"),
               *ROOT.glob("ezengine_core/*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path


def test_the_rule_sees_a_violation(tmp_path):
    # The checker itself: a late import inside a function is found.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ezengine.trainer import SerialTrainer\n")
    assert reaches(imported_modules(bad), "ezengine.trainer")


def test_every_package_ships_in_a_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in [*PACKAGE.rglob("__init__.py"), *ROOT.glob("ezengine_core/__init__.py")]}
    assert found <= listed, found - listed
