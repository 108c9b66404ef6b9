"""The package's layers are strict: a module imports only from lower layers (or its own sub-package), training and
inference never import each other, and only the entry points compose everything. Imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "crackclf"

#: Lowest first. A module of one layer may import from any layer below it; siblings in one layer stay independent.
LAYERS: list[set[str]] = [
    {"__init__", "errors"},
    {"utils", "distributed"},
    {"tracking"},
    {"data", "metrics", "plots"},
    {"models"},  # the network and the LightningModule, scored by metrics
    {"bundle", "config"},
    {"experiments"},
    {"training", "inference"},
    {"serving"},
    {"train", "cli"},  # the entry points
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """``crackclf.data.split`` → ``data``; ``crackclf`` → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def crackclf_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported crackclf module) for every import in ``path``, top level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "crackclf":
            if node.module == "crackclf":  # `from crackclf import plots` names a module; PROCESS_STARTED does not
                found += [(node.lineno, f"crackclf.{a.name}" if a.name in RANK else "crackclf") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "crackclf"]
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        importer = unit_of(".".join(relative.with_suffix("").parts))
        assert importer in RANK, f"{relative}: add its package to LAYERS in this test"
        for line, module in crackclf_imports(path):
            imported = unit_of(module)
            assert imported in RANK, f"{relative}:{line}: {module} is not in LAYERS"
            if imported == importer:
                continue
            if RANK[imported] >= RANK[importer]:
                problems.append(f"{relative}:{line} ({importer}, layer {RANK[importer]}) imports {module} "
                                f"({imported}, layer {RANK[imported]})")
    return problems


def test_no_module_imports_upward_or_across():
    assert violations() == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule itself can fail: a data module importing training is reported."""
    fake = tmp_path / "crackclf"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("def f():\n    from crackclf.training.focus import HardExampleFocus\n")
    (fake / "training").mkdir()
    (fake / "training" / "ok.py").write_text("from crackclf.data.bad import f\nfrom crackclf.inference import x\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert violations() == [
        "crackclf/data/bad.py:2 (data, layer 3) imports crackclf.training.focus (training, layer 7)",
        "crackclf/training/ok.py:2 (training, layer 7) imports crackclf.inference (inference, layer 7)",
    ]
