"""Registries in one style: every built-in is registered by a ``register_*`` call where its registry lives
(a package's ``__init__``, or the one module of a single-module registry), never as a side effect of
importing the module that defines it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# register function -> the file whose top level registers the built-ins
OWNERS = {
    "register_format": "mmprm_infer/formats/__init__.py",
    "register_engine": "mmprm_infer/engines/__init__.py",
    "register_adapter": "mmprm_infer/models/__init__.py",
    "register_aggregation": "mmprm_infer/aggregation.py",
    "register_strategy": "mmprm_infer/selection.py",
}
BUILT_INS = {
    "mmprm_infer.formats:FORMATS": ["custom", "math-shepherd", "mm-prm", "qwen2.5-math-prm", "rlhflow", "skywork",
                                    "token-classification", "visualprm", "vl-prm"],
    "mmprm_infer.engines:ENGINES": ["fast", "reference", "tree_cache", "vllm"],
    "mmprm_infer.models:ADAPTERS": ["causal_lm", "internvl", "qwen2_5_vl", "qwen2_prm", "token_classification",
                                    "value_head"],
    "mmprm_infer.aggregation:AGGREGATIONS": ["last", "max", "mean", "mean_odd", "min", "prod", "sum_logit",
                                             "sum_logprob"],
    "mmprm_infer.selection:STRATEGIES": ["best_of_n", "majority_vote", "weighted_vote"],
}


def _register_calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in OWNERS:
            yield node.func.id


def test_built_ins_are_registered_only_by_their_registry():
    elsewhere = []
    for folder in ("mmprm_infer", "kernels", "train", "integrations"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            elsewhere += [f"{rel} calls {name}" for name in _register_calls(path) if OWNERS[name] != rel]
    assert elsewhere == []


def test_registries_start_empty_and_are_filled_by_calls():
    """No dict literal of built-ins beside the calls: one style."""
    for spec in BUILT_INS:
        module, registry = spec.split(":")
        rel = next(r for r in OWNERS.values() if r.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                   == module)
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        values = [node.value for node in tree.body if isinstance(node, ast.AnnAssign)
                  and isinstance(node.target, ast.Name) and node.target.id == registry]
        assert len(values) == 1 and isinstance(values[0], ast.Dict) and not values[0].keys, \
            f"{rel}: {registry} must start as an empty dict"
    for name, rel in OWNERS.items():
        assert name in set(_register_calls(ROOT / rel)), f"{rel} registers no built-in with {name}"


def test_importing_a_registry_registers_every_built_in():
    """In a fresh process, importing the registry is enough: ``engine="tree_cache"`` needs no import of
    engines.tree_cache by the caller, an InternVL adapter none of models.internvl."""
    script = ("import importlib, json, sys\n"
              "out = {}\n"
              "for spec in sys.argv[1:]:\n"
              "    module, name = spec.split(':')\n"
              "    out[spec] = sorted(getattr(importlib.import_module(module), name))\n"
              "print(json.dumps(out))\n")
    order = ["mmprm_infer.models:ADAPTERS", "mmprm_infer.engines:ENGINES", "mmprm_infer.formats:FORMATS",
             "mmprm_infer.aggregation:AGGREGATIONS", "mmprm_infer.selection:STRATEGIES"]
    assert sorted(order) == sorted(BUILT_INS)
    proc = subprocess.run([sys.executable, "-c", script, *order], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == BUILT_INS
