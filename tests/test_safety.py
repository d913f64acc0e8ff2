"""No pickle anywhere in the package: weights and checkpoints are safetensors only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mnistsum_cli

PACKAGE = Path(mnistsum_cli.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def pickle_uses(tree: ast.AST) -> list[str]:
    """Imports of pickle-like modules, and torch.load / torch.save / pickle.* calls."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                found.append(f"from {node.module} import ...")
            if node.module == "torch" and any(a.name in ("load", "save") for a in node.names):
                found.append(f"from torch import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load"):
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                safe = (
                    weights_only
                    and isinstance(weights_only[0].value, ast.Constant)
                    and weights_only[0].value.value is True
                )
                if not safe:
                    found.append(f"{name}(...) without weights_only=True (line {node.lineno})")
            if name.endswith("torch.save"):
                found.append(f"{name}(...) (line {node.lineno}): pickles")
    return found


def test_package_sources_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"app.py", "transactions.py", "loop.py", "checkpoint.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_pickle(path: Path) -> None:
    uses = pickle_uses(ast.parse(path.read_text(), filename=str(path)))
    assert not uses, f"{path.name}: {uses}"


@pytest.mark.parametrize(
    "source, bad",
    [
        ("import pickle", True),
        ("import pickle as p", True),
        ("from pickle import loads", True),
        ("import torch\ntorch.load('x')", True),
        ("import torch\ntorch.load('x', weights_only=False)", True),
        ("import torch\ntorch.load('x', weights_only=True)", False),
        ("from torch import load", True),
        ("import torch\ntorch.save({}, 'x')", True),
        ("from safetensors.torch import load_file\nload_file('x')", False),
        ("import json\njson.loads('{}')", False),
    ],
)
def test_the_scanner_itself(source: str, bad: bool) -> None:
    assert bool(pickle_uses(ast.parse(source))) is bad
