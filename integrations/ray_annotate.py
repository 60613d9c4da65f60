"""MCTS annotation on Ray: `mmprm annotate --ray [ADDRESS]`.

The driver decides what is left to do (``train.mcts.prepare_annotation``:
finished trees on disk are skipped, so a killed driver resumes with the same
command), saves the question images, and streams the questions through Ray
Data to a pool of annotation actors.  Each actor builds its own policy once
from a picklable factory (the synthetic recipe's policy, an OpenAI-compatible endpoint,
or an in-actor vLLM engine with its own tensor parallelism) and runs the
OmegaPRM search of one question at a time.  Finished trees come back to the
driver, which writes each one once, atomically: a lost worker costs only its
question in flight, which Ray retries on a restarted actor.

Paths: images are saved under ``OUT_DIR/images`` by the driver; on a
multi-node cluster OUT_DIR must be on storage every node reads (the policy
gets the image path).
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
from collections.abc import Callable, Iterable
from typing import Any

from mmprm_infer.integrations.policy import OpenAIPolicy, TransformersPolicy
from mmprm_infer.integrations.ray_cluster import connect, data_context, map_to_actors, plan_actors
from mmprm_infer.policy import Policy
from mmprm_infer.train.mcts import (
    AnnotationProgress,
    AnnotationStats,
    MCTSConfig,
    prepare_annotation,
    search_question,
    tree_path,
    with_saved_image,
    write_json_atomic,
)

__all__ = ["ray_annotate", "openai_policy_factory", "hf_policy_factory", "vllm_policy_factory"]


class AnnotationWorker:
    """A Ray Data actor: one policy, one question per call."""

    def __init__(self, policy_factory: Callable[[], Policy], config: MCTSConfig, verifier=None):
        self.policy, self.config, self.verifier = policy_factory(), config, verifier

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"id": [], "tree": [], "rollouts": [], "error": []}
        for payload in batch["item"]:
            item = pickle.loads(payload)
            try:
                tree, rollouts = search_question(item, self.policy, self.config, self.verifier)
            except Exception as exc:  # noqa: BLE001 - the question fails, the run goes on
                tree, rollouts, error = None, 0, f"{type(exc).__name__}: {exc}"
            else:
                error = ""
            out["id"].append(item.id)
            out["tree"].append(pickle.dumps(tree))
            out["rollouts"].append(rollouts)
            out["error"].append(error)
        return out


def ray_annotate(problems: Iterable[Any], policy_factory: Callable[[], Policy], out_dir,
                 config: MCTSConfig | None = None,
                 *, verifier=None, text_only: bool = False, progress: bool = True, address: str | None = "auto",
                 workers: int | None = None, worker_cpus: float = 1, worker_gpus: float = 0) -> AnnotationStats:
    """``train.mcts.annotate`` on a Ray cluster: same trees, same files, same resumption.

    ``policy_factory``: a picklable callable building the policy inside each
    worker (see the ``*_policy_factory`` helpers).  ``workers``: questions in
    flight (default: the cluster's CPUs / ``worker_cpus``; with
    ``worker_gpus`` > 0 on a cluster with GPUs, its GPUs / ``worker_gpus``:
    ``ray_cluster.plan_actors``)."""
    config = config or MCTSConfig()
    run = prepare_annotation(problems, out_dir, config, text_only)
    todo = [with_saved_image(item, run.out) for item in run.todo]
    if not todo:
        return AnnotationProgress(run, False).close()
    ray = connect(address)
    data_context(ray, preserve_order=False)  # write each tree as soon as it is done
    plan = plan_actors(None if workers is None else max(1, workers), worker_cpus, worker_gpus)
    plan = dataclasses.replace(plan, actors=min(plan.actors, len(todo)))  # no idle actors
    ds = ray.data.from_items([{"item": pickle.dumps(it)} for it in todo], override_num_blocks=len(todo))
    trees = map_to_actors(ds, AnnotationWorker, plan, {"policy_factory": policy_factory, "config": config,
                                                        "verifier": verifier})
    tracker = AnnotationProgress(run, progress, desc=f"annotate (ray x{plan.actors})")
    written: set[str] = set()
    try:
        for row in trees.iter_rows():
            qid = row["id"]
            if qid in written:  # a retried question that had already come back: keep the first
                continue
            if row["error"]:
                tracker.done(qid, None, row["error"])
                continue
            write_json_atomic(tree_path(run.out, qid), pickle.loads(row["tree"]))
            written.add(qid)
            tracker.done(qid, int(row["rollouts"]), None)
    finally:
        stats = tracker.close()
    return stats


# --------------------------------------------------------------------------
# policy factories (module-level functions + partial: picklable for the workers)
# --------------------------------------------------------------------------
def _openai_policy(base_url: str, model: str, api_key: str | None, sampling: dict) -> Policy:
    return OpenAIPolicy(base_url, model, api_key, **sampling)


def openai_policy_factory(base_url: str, model: str, api_key: str | None = None, **sampling) -> Callable[[], Policy]:
    """Rollouts from an OpenAI-compatible server (e.g. `vllm serve`) reachable from every node."""
    return functools.partial(_openai_policy, base_url, model, api_key, sampling)


def _hf_policy(path: str, seed: int | None, sampling: dict) -> Policy:
    # transformers: heavy, loaded where used
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, InternVLForConditionalGeneration

    vision = "InternVLForConditionalGeneration" in (AutoConfig.from_pretrained(path).architectures or [])
    model = (InternVLForConditionalGeneration if vision else AutoModelForCausalLM).from_pretrained(path)
    return TransformersPolicy(model, AutoTokenizer.from_pretrained(path), seed=seed, **sampling)


def hf_policy_factory(path: str, seed: int | None = 0, **sampling) -> Callable[[], Policy]:
    """Rollouts from a local transformers checkpoint (a causal LM, or a native InternVL), loaded in each
    worker; seeded, so a rerun samples the same rollouts."""
    return functools.partial(_hf_policy, str(path), seed, sampling)


def _vllm_policy(model: str, tensor_parallel_size: int, llm_kwargs: dict, sampling: dict) -> Policy:
    import vllm  # vllm: optional (the vllm extra)

    from mmprm_infer.integrations.vllm_policy import VLLMPolicy  # lazy: it imports torch, transformers, PIL

    return VLLMPolicy(vllm.LLM(model=model, tensor_parallel_size=tensor_parallel_size, **llm_kwargs), **sampling)


def vllm_policy_factory(model: str, tensor_parallel_size: int = 1, llm_kwargs: dict | None = None,
                        **sampling) -> Callable[[], Policy]:
    """A vLLM engine inside each worker: with ``tensor_parallel_size`` 1 give the worker one GPU;
    above that, vLLM places its own shards through Ray (``distributed_executor_backend="ray"``)."""
    return functools.partial(_vllm_policy, model, tensor_parallel_size, dict(llm_kwargs or {}), sampling)
