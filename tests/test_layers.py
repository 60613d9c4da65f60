"""Layers point one way: core, then train, then the test fixtures, then integrations, then the synthetic
recipe, then the commands on top.

Every import is checked, the ones inside functions too: a module may import its own layer or a
lower one, never a higher one.  Layers are folders, so a new module needs no entry here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"mmprm_infer": "mmprm_infer", "kernels": "mmprm_infer.kernels", "train": "mmprm_infer.train",
            "integrations": "mmprm_infer.integrations"}
# package prefix -> layer, most specific first; anything else under mmprm_infer is the core
LAYERS = (("mmprm_infer.cli", "commands"), ("mmprm_infer.train.synthetic", "recipes"),
          ("mmprm_infer.integrations", "integrations"), ("mmprm_infer.testing", "testing"),
          ("mmprm_infer.train", "train"))
RANKS = {"core": 0, "train": 1, "testing": 2, "integrations": 3, "recipes": 4, "commands": 5}


def layer(module: str) -> str:
    for prefix, name in LAYERS:
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
        if layer(module) in ("commands", "recipes"):
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


def test_layers_are_folders():
    """The rule is by folder: a command, the recipe and a fixture are placed by where they live."""
    assert layer("mmprm_infer.cli.score") == layer("mmprm_infer.cli") == "commands"
    assert layer("mmprm_infer.train.synthetic.pipeline") == "recipes"
    assert layer("mmprm_infer.train.trainer") == "train"
    assert layer("mmprm_infer.testing.tiny") == "testing"
    assert layer("mmprm_infer.io.records") == layer("mmprm_infer.kernels.step_reward") == "core"
    assert layer("mmprm_infer.training") == "core"  # a prefix is a whole package name, not a string prefix
