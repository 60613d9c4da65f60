"""mmprm-infer: fast, exact process-reward-model scoring and Best-of-N reranking.

    from mmprm_infer import PRM, rerank
    prm = PRM.from_pretrained("path/to/prm")
    res = rerank(question, candidates, prm=prm, aggregate="min")

The names below are imported on first use (PEP 562), so ``import mmprm_infer`` -- and ``mmprm --help`` --
does not load torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "PRM": "mmprm_infer.prm", "ScoringItem": "mmprm_infer.prm",
    "rerank": "mmprm_infer.rerank", "rerank_batch": "mmprm_infer.rerank", "RerankResult": "mmprm_infer.rerank",
    "aggregate": "mmprm_infer.aggregation", "AGGREGATIONS": "mmprm_infer.aggregation",
    "FORMATS": "mmprm_infer.formats", "get_format": "mmprm_infer.formats", "register_format": "mmprm_infer.formats",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmprm_infer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``mmprm_infer.rerank`` is both a submodule and a function: importing the submodule must not rebind the
    package's ``rerank`` to the module (the function stays, as when this package imported it eagerly)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _EXPORTS and _EXPORTS[name] == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
