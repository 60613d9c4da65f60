"""The patch itself: three small changes to vLLM's classes, each a wrapper or a replacement method written here.

1. ``StepPool.forward`` (the pooler): maps each step-tag position to the hidden-state row that was computed for it
   (``positions.reward_rows``), instead of indexing the computed rows with prompt positions; under chunked prefill
   it drops the chunks a preempted request computed before it restarted.
2. ``KVCacheManager.get_computed_blocks`` (the scheduler): a token-wise pooling request's prefix-cache hit is cut
   back to whole blocks before its first reward position (``positions.cache_hit_limit``), so every reward is
   computed by the model; other requests get vLLM's hit unchanged.
3. ``PoolingParams._merge_default_parameters``: a STEP request with a step tag reads the prefix cache by default
   (vLLM sets ``skip_reading_prefix_cache=True`` for every token-wise task); a value the caller set is kept.

Importing this module imports vLLM; ``apply()`` is idempotent.
"""

from __future__ import annotations

import torch

from mmprm_infer.integrations.vllm_plugin.positions import (
    TOKEN_TASKS,
    PooledRowsError,
    block_aligned,
    cache_hit_limit,
    computed_offset,
    reward_rows,
)

# Set on StepPool once patched: what the library's vLLM engine checks (it must not import this package).
MARKER = "mmprm_prefix_reuse"


def _step_pool_forward(self, hidden_states: torch.Tensor, pooling_metadata) -> list[torch.Tensor | None]:
    """StepPool.forward reading rewards from the computed tail of each prompt (see positions.py)."""
    from vllm.model_executor.layers.pooler.tokwise.methods import AllPool  # vllm: optional (the vllm extra)
    from vllm.utils.torch_utils import async_tensor_h2d  # vllm: optional (the vllm extra)

    if self.enable_chunked_prefill:
        _drop_stale_chunks(pooling_metadata)
    pooled = AllPool.forward(self, hidden_states, pooling_metadata)  # per request: the computed tail, or None
    token_ids = pooling_metadata.get_prompt_token_ids_cpu()
    out: list[torch.Tensor | None] = []
    for data, ids, params in zip(pooled, token_ids, pooling_metadata.pooling_params):
        if data is None:  # a chunked prefill that has not finished
            out.append(None)
            continue
        if params.returned_token_ids:
            data = data[:, params.returned_token_ids]
        prompt_len = int(ids.shape[0])
        if params.step_tag_id is None:  # every position is pooled: all must have been computed
            if computed_offset(prompt_len, data.shape[0]) != 0:
                raise PooledRowsError(
                    f"STEP pooling without a step tag pools all {prompt_len} positions, but only the last "
                    f"{data.shape[0]} were computed; such requests must not read the prefix cache")
        else:
            positions = (ids == params.step_tag_id).nonzero(as_tuple=True)[0].tolist()
            rows = reward_rows(positions, prompt_len, data.shape[0])
            data = data[async_tensor_h2d(torch.tensor(rows, dtype=torch.long), data.device)]
        out.append(data)
    return out


def _drop_stale_chunks(pooling_metadata) -> None:
    """Keep each request's stored prefill chunks contiguous with the chunk computed now.

    AllPool concatenates a request's chunks when its prefill finishes.  A request that was preempted and resumed
    restarts its prefill (from a prefix-cache hit that may differ from the first one), but vLLM keeps its earlier
    chunks: their rows would shift every reward (stock vLLM then reads wrong rows even without prefix caching).
    Chunks that do not end where this step's chunk starts are dropped here, by position bookkeeping on vLLM's
    per-request PoolingStates."""
    cursor = pooling_metadata.get_pooling_cursor()
    starts = (cursor.seq_lens_cpu - cursor.num_scheduled_tokens_cpu).tolist()
    for state, start, end in zip(pooling_metadata.pooling_states, starts, cursor.seq_lens_cpu.tolist()):
        if state.hidden_states_cache and getattr(state, "mmprm_next_position", None) != start:
            state.clean()
        state.mmprm_next_position = end


def _capped_get_computed_blocks(original):
    def get_computed_blocks(self, request):
        blocks, num_hit, boundary = original(self, request)
        params = request.pooling_params
        if num_hit == 0 or params is None or params.task not in TOKEN_TASKS:
            return blocks, num_hit, boundary
        limit = cache_hit_limit(params.task, params.step_tag_id, request.prompt_token_ids)
        if limit is None or num_hit <= limit:
            return blocks, num_hit, boundary
        managers = self.coordinator.single_type_managers
        if len(managers) != 1:  # hybrid KV layouts: no partial hit is known to be safe, so none is used
            return self.empty_kv_cache_blocks, 0, 0
        keep = block_aligned(limit, managers[0].block_size)
        if keep == 0:
            return self.empty_kv_cache_blocks, 0, 0
        return self.truncate_computed_blocks(blocks, keep), keep, 0

    get_computed_blocks.__wrapped__ = original
    get_computed_blocks.__doc__ = (original.__doc__ or "") + "\n(mmprm-infer plugin: token-wise pooling hits are " \
        "capped before the first pooled position.)"
    return get_computed_blocks


def _step_reads_cache_by_default(original):
    def _merge_default_parameters(self, model_config) -> None:
        chosen = self.skip_reading_prefix_cache
        original(self, model_config)
        if chosen is None and self.task in TOKEN_TASKS and self.step_tag_id is not None:
            # The cap and the pooler above make this exact: rewards are computed, the question is reused.
            self.skip_reading_prefix_cache = False

    _merge_default_parameters.__wrapped__ = original
    return _merge_default_parameters


def targets() -> dict[str, tuple[type, str]]:
    """What is patched: name -> (class, attribute).  Importing these is the structural part of the version check."""
    from vllm.model_executor.layers.pooler.tokwise.methods import StepPool  # vllm: optional (the vllm extra)
    from vllm.pooling_params import PoolingParams  # vllm: optional (the vllm extra)
    from vllm.v1.core.kv_cache_manager import KVCacheManager  # vllm: optional (the vllm extra)

    return {"pooler": (StepPool, "forward"), "cache_cap": (KVCacheManager, "get_computed_blocks"),
            "default": (PoolingParams, "_merge_default_parameters")}


def missing_targets() -> list[str]:
    """The classes/methods the patch needs that this vLLM lacks (empty when all are there)."""
    try:
        found = targets()
    except ImportError as exc:
        return [f"import failed: {exc}"]
    missing = [f"{cls.__name__}.{attr}" for cls, attr in found.values() if not callable(getattr(cls, attr, None))]
    from vllm.v1.core.kv_cache_manager import KVCacheManager  # vllm: optional (the vllm extra)

    for helper in ("truncate_computed_blocks",):
        if not callable(getattr(KVCacheManager, helper, None)):
            missing.append(f"KVCacheManager.{helper}")
    return missing


def apply(status: str) -> None:
    """Patch vLLM (once per process) and mark StepPool with ``status``."""
    found = targets()
    step_pool = found["pooler"][0]
    if getattr(step_pool, MARKER, "").startswith("active"):
        return
    # vLLM's step pooler class, patched in place
    step_pool.forward = _step_pool_forward  # type: ignore[attr-defined]
    manager, attr = found["cache_cap"]
    setattr(manager, attr, _capped_get_computed_blocks(getattr(manager, attr)))
    params, attr = found["default"]
    setattr(params, attr, _step_reads_cache_by_default(getattr(params, attr)))
    setattr(step_pool, MARKER, status)


def mark(status: str) -> None:
    """Record why the patch was not applied (what the library's engine reports)."""
    try:
        step_pool = targets()["pooler"][0]
    except ImportError:
        return
    setattr(step_pool, MARKER, status)
