"""Layers point one way (#18): core, then train, then integrations, then the commands on top.

Every import is checked, the ones inside functions too: a module may import its own layer or a
lower one, never a higher one.  The commands (the CLI entry points) may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"mmprm_infer": "mmprm_infer", "kernels": "mmprm_infer.kernels", "train": "mmprm_infer.train",
            "integrations": "mmprm_infer.integrations"}
COMMANDS = {"mmprm_infer.cli", "mmprm_infer.demo", "mmprm_infer.evaluation.cli", "mmprm_infer.train.annotate",
            "mmprm_infer.train.synthetic.pipeline", "mmprm_infer.train.train_cli"}
RANKS = {"core": 0, "train": 1, "integrations": 2, "commands": 3}


def layer(module: str) -> str:
    if module in COMMANDS:
        return "commands"
    for prefix, name in (("mmprm_infer.train", "train"), ("mmprm_infer.integrations", "integrations")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "core"


def modules():
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            yield ".".join([package, *parts]), path, is_package


def imports(module: str, path: Path, is_package: bool):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                # "from . import x" may name a submodule
                names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
                yield from names
            elif node.module:
                yield node.module


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, path, is_package in modules():
        for target in imports(module, path, is_package):
            if target.startswith("mmprm_infer") and RANKS[layer(target)] > RANKS[layer(module)]:
                upward.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert upward == []


def test_general_training_code_never_imports_the_synthetic_recipe():
    """The synthetic task (``mmprm_infer.train.synthetic``) is one recipe on top of the general
    training code: only the recipe itself and the commands may import it."""
    recipe = "mmprm_infer.train.synthetic"
    inward = []
    for module, path, is_package in modules():
        if module in COMMANDS or module == recipe or module.startswith(recipe + "."):
            continue
        if layer(module) not in ("core", "train"):
            continue
        for target in imports(module, path, is_package):
            if target == recipe or target.startswith(recipe + "."):
                inward.append(f"{module} imports {target}")
    assert inward == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The scan itself: an upward import, even one inside a function, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mmprm_infer.integrations.server import create_app\n")
    assert [t for t in imports("mmprm_infer.prm", bad, False) if RANKS[layer(t)] > 0] == [
        "mmprm_infer.integrations.server"]
