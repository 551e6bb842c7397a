"""The dependency rule of docs/architecture.md, enforced: a package imports only what it may.

Every ``import`` / ``from ... import`` in src/stage1 (function-local ones too) is read from the
AST, resolved to a stage1 sub-package and checked against ``ALLOWED``. ``commands.py`` modules are
the CLI edge of each package and may also import ``stage1.cli``.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stage1"

#: package -> the stage1 packages it may import (itself is always allowed). Keep in step with
#: docs/architecture.md "Who may import whom".
ALLOWED: dict[str, set[str]] = {
    "_core": set(),
    "policies": {"_core"},
    "featstore": {"_core"},
    "heads": {"_core", "policies"},
    "runs": {"_core", "featstore", "heads", "policies"},
    "finetune": {"_core", "featstore", "heads", "policies", "runs"},
    "workflows": {"_core", "featstore", "heads", "policies", "runs"},
    "cli": {"_core"},
    "miner": set(),  # the detector runs inside the subnet's environment: nothing from stage1
    "": {"cli"},  # stage1/__main__.py
}
#: the CLI edge: every package's commands.py may use the shared options and error mapping.
EDGE_EXTRA = {"cli"}


def _package(module: str) -> str | None:
    """The stage1 sub-package ``module`` belongs to; None outside stage1 or for the root package,
    which holds only ``__version__`` and imports nothing, so anyone may read it."""
    parts = module.split(".")
    if parts[0] != "stage1" or len(parts) == 1 or parts[1] == "__version__":
        return None
    return parts[1]


def _imports(text: str, here: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``text``, a module of package ``here``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, mod))
            if mod == "stage1":  # from stage1 import featstore
                out += [(node.lineno, f"stage1.{a.name}") for a in node.names]
    return out


def _file_imports(path: Path) -> list[tuple[int, str]]:
    return _imports(path.read_text(encoding="utf-8"), list(path.relative_to(SRC.parent).with_suffix("").parts[:-1]))


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def test_every_package_is_in_the_rule() -> None:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED), f"add {sorted(packages - set(ALLOWED))} to ALLOWED and docs/architecture.md"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_dependency_rule(path: Path) -> None:
    rel = path.relative_to(SRC)
    own = rel.parts[0] if len(rel.parts) > 1 else ""
    allowed = ALLOWED[own] | {own} | (EDGE_EXTRA if rel.name == "commands.py" else set())
    bad = [(line, mod) for line, mod in _file_imports(path)
           if (pkg := _package(mod)) is not None and pkg not in allowed]
    assert not bad, f"{rel}: imports {bad} but {own or 'stage1'} may only import {sorted(allowed)}"


def test_rule_checker_catches_a_violation() -> None:
    """The checker itself: relative and absolute imports of heads / featstore from policies are seen."""
    found = _imports("from stage1.heads import HEADS\nfrom ..featstore import store\nimport numpy\n"
                     "def f():\n    from . import metrics\n", ["stage1", "policies"])
    pkgs = {_package(m) for _, m in found} - {None}
    assert pkgs == {"heads", "featstore", "policies"}
    assert pkgs - {"policies"} - ALLOWED["policies"] == {"heads", "featstore"}


@pytest.mark.parametrize("module", ["stage1.policies", "stage1._core.io", "stage1.runs.layout", "stage1.cli"])
def test_light_modules_never_import_torch(module: str) -> None:
    """policies (numpy/scipy only), _core, the run-dir reader and the CLI group stay torch-free."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'zarr', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
