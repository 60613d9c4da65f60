"""A vLLM plugin that lets token-wise PRM pooling (STEP, token_classify) reuse the prefix cache.

Installed with the package as the ``vllm.general_plugins`` entry point ``mmprm_prefix_reuse``, so vLLM calls
``register()`` in every process it starts (front end, engine core, workers).  With it, an
``LLM(..., runner="pooling", enable_prefix_caching=True)`` whose pooler is STEP with a step tag (Math-Shepherd
style through ``convert="classify"``, or ``Qwen2ForProcessRewardModel``) computes a shared question once: each
request's cache hit stops before its first step tag, and the pooler reads every tag from the hidden states that
were computed.  Requests that are not token-wise pooling are untouched.  docs/vllm_plugin.md explains the change.

On a vLLM outside ``versions.TESTED_VLLM_VERSIONS`` (or one whose classes moved) nothing is patched and an error
naming the tested versions is logged; ``status()`` says which happened in this process.
"""

from __future__ import annotations

import logging

from mmprm_infer.integrations.vllm_plugin.versions import (
    ALLOW_UNTESTED_ENV,
    TESTED_VLLM_VERSIONS,
    installed_vllm_version,
    version_refusal,
)

logger = logging.getLogger("mmprm_infer.vllm_plugin")

__all__ = ["register", "status", "TESTED_VLLM_VERSIONS", "ALLOW_UNTESTED_ENV"]


def register() -> None:
    """vLLM's entry point: patch this process's vLLM, or log loudly why not (never raises into vLLM)."""
    from mmprm_infer.integrations.vllm_plugin import patches  # lazy: it imports torch, numpy

    if status().startswith("active"):  # vLLM loads plugins once per process; a second call changes nothing
        return
    version = installed_vllm_version()
    reason = refusal(version)
    if reason is not None:
        patches.mark(f"refused: {reason}")
        logger.error("mmprm-infer vLLM plugin not applied: %s", reason)
        return
    patches.apply(f"active: mmprm-infer prefix reuse for token-wise pooling on vLLM {version}")
    logger.info("mmprm-infer vLLM plugin: token-wise pooling reads the prefix cache (vLLM %s)", version)


def refusal(version: str) -> str | None:
    """Why this process's vLLM must not be patched (an untested version, or classes that moved); None: patch."""
    from mmprm_infer.integrations.vllm_plugin import patches  # lazy: it imports torch, numpy

    reason = version_refusal(version)
    if reason is None:
        missing = patches.missing_targets()
        if missing:
            reason = (f"vLLM {version} lacks what the patch changes ({', '.join(missing)}); tested on "
                      f"{', '.join(TESTED_VLLM_VERSIONS)}: token-wise pooling keeps vLLM's own behaviour")
    return reason


def status() -> str:
    """'active: ...', 'refused: <why>', or 'not loaded' (vLLM has not called register() in this process)."""
    from mmprm_infer.integrations.vllm_plugin.patches import MARKER, targets  # lazy: it imports torch, numpy

    return getattr(targets()["pooler"][0], MARKER, "not loaded")

