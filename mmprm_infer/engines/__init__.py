"""Scoring engines, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from mmprm_infer.engines.base import EncodedQuestion, Engine, NonFiniteRewardError
from mmprm_infer.engines.fast import FastEngine
from mmprm_infer.engines.reference import ReferenceEngine
from mmprm_infer.engines.tree_cache import TreeCacheEngine
from mmprm_infer.engines.vllm_pooling import VllmPoolingEngine  # imports vLLM only when it scores

ENGINES: dict[str, Callable[..., Engine]] = {}
DEFAULT_ENGINE = "fast"  # passes equivalence with the reference (tests/test_fast_engine.py)


def register_engine(name: str, factory: Callable[..., Engine]) -> None:
    ENGINES[name] = factory


def get_engine(engine: str | Engine, **options) -> Engine:
    if isinstance(engine, Engine):
        return engine
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[engine](**options)


register_engine("reference", ReferenceEngine)
register_engine("fast", FastEngine)
register_engine("tree_cache", TreeCacheEngine)
register_engine("vllm", VllmPoolingEngine)


__all__ = ["ENGINES", "DEFAULT_ENGINE", "Engine", "EncodedQuestion", "NonFiniteRewardError", "get_engine",
           "register_engine"]
