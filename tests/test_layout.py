"""The house rules of docs/architecture.md that a machine can check.

- Algorithms (inference/) import ppl_genmodels.traces, ppl_genmodels.compiled and each other, nothing of the run layer.
- The ground floor (traces, programs, compiled, streams, data, nets) imports nothing above it; models import only
  the ground floor.
- Only runs.py writes files (every file goes through runs.atomic_write).
- No function is longer than 80 lines.
- Every module is described in docs/architecture.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"ppl_genmodels": ROOT / "ppl_genmodels", "ppl_genmodels.inference": ROOT / "inference",
           "ppl_genmodels.models": ROOT / "models"}
GROUND_FLOOR = {"ppl_genmodels.traces", "ppl_genmodels.programs", "ppl_genmodels.compiled", "ppl_genmodels.data",
                "ppl_genmodels.nets", "ppl_genmodels.streams"}
MAX_FUNCTION_LINES = 80


def _modules(package: str) -> dict[str, Path]:
    return {f"{package}.{path.stem}": path for path in sorted(FOLDERS[package].glob("*.py"))}


ALL = {**_modules("ppl_genmodels"), **_modules("ppl_genmodels.inference"), **_modules("ppl_genmodels.models")}


def _package_imports(path: Path) -> set[str]:
    """Every ppl_genmodels module ``path`` imports, at any depth of the file (``from p import m`` counts as p.m)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in ALL else node.module)
    return {name for name in found if name.startswith("ppl_genmodels")}


@pytest.mark.parametrize("module", sorted(_modules("ppl_genmodels.inference")))
def test_algorithms_use_traces_compiled_and_each_other_only(module):
    allowed = {"ppl_genmodels.traces", "ppl_genmodels.compiled", "ppl_genmodels.inference"} | \
        set(_modules("ppl_genmodels.inference"))
    assert _package_imports(ALL[module]) <= allowed, module


@pytest.mark.parametrize("module", sorted(GROUND_FLOOR))
def test_the_ground_floor_imports_nothing_above_it(module):
    assert _package_imports(ALL[module]) <= GROUND_FLOOR, module


@pytest.mark.parametrize("module", sorted(_modules("ppl_genmodels.models")))
def test_models_use_the_ground_floor_only(module):
    allowed = GROUND_FLOOR | {"ppl_genmodels.models"} | set(_modules("ppl_genmodels.models"))
    assert _package_imports(ALL[module]) <= allowed, module


WRITES = [r"\bopen\([^)]*['\"][wax]b?\+?['\"]", r"\.write_(text|bytes)\(", r"\bos\.replace\(", r"\btorch\.save\(",
          r"\btempfile\.", r"\.to_csv\([^)]*(path|file|/)", r"\.to_netcdf\((?!str\(tmp\))"]


@pytest.mark.parametrize("module", sorted(m for m in ALL if m != "ppl_genmodels.runs"))
def test_only_runs_writes_files(module):
    text = ALL[module].read_text()
    hits = [pattern for pattern in WRITES if re.search(pattern, text)]
    assert not hits, f"{module} writes a file itself ({hits}); use ppl_genmodels.runs.atomic_write"


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in ALL.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {node.end_lineno - first + 1} lines")
    assert not long, "split into named steps: " + "; ".join(long)


def test_every_module_is_described_in_the_architecture_page():
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [m for m, path in ALL.items() if path.stem != "__init__" and f"`{path.name}`" not in page]
    assert not missing, f"docs/architecture.md does not describe {missing}"
