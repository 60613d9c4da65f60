"""The vLLM plugin's speedup measured on ONE vLLM engine, its calls interleaved, so machine load hits both alike.

    python -m bench.plugin_ratio                      # W1, block sizes 128 (vLLM's CPU default) and 32, 5 rounds

Each round scores the workload's candidates twice on the same engine (prefix caching on, the package's plugin):
once with ``PoolingParams(skip_reading_prefix_cache=True)`` (every token computed, what stock vLLM does) and once
with the plugin's default (the question read from the cache), the prefix cache emptied before each call.  The
ratio of the two medians is the plugin's speedup; per computed token, the two modes show whether vLLM's time
follows the tokens it computes.  Settings as bench.run's vLLM columns (same cores, max_num_batched_tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.vllm_engine import VllmStepPooler

REPO = Path(__file__).resolve().parent.parent


def run_block_size(prm, path, inputs, block_size: int, rounds: int, threads: int) -> dict:
    from vllm import PoolingParams
    from vllm.inputs import TokensPrompt

    encoded = prm.encode(inputs.question, inputs.candidates)
    prompts = [TokensPrompt(prompt_token_ids=c.input_ids) for c in encoded.candidates]
    max_model_len = ((max(len(c.input_ids) for c in encoded.candidates) + 16 + 255) // 256) * 256
    engine = VllmStepPooler(path, prm, max_model_len=max_model_len, threads=threads, omp_bind=f"0-{threads - 1}",
                            prefix_reuse=True, block_size=block_size)
    tag = engine.settings["pooler"]["step_tag_id"]
    modes = {"no cache (stock vLLM's work)": PoolingParams(step_tag_id=tag, skip_reading_prefix_cache=True),
             "plugin (question from the cache)": PoolingParams(step_tag_id=tag)}
    times = {m: [] for m in modes}
    tokens = {}
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for mode, params in modes.items():
                engine.reset_prefix_cache()
                t0 = time.perf_counter()
                outs = engine.llm.encode(prompts, params, pooling_task="token_classify", use_tqdm=False)
                dt = time.perf_counter() - t0
                if r:
                    times[mode].append(dt)
                total = sum(len(p["prompt_token_ids"]) for p in prompts)
                tokens[mode] = total - sum(int(o.num_cached_tokens or 0) for o in outs)
    finally:
        engine.close()
    med = {m: statistics.median(t) for m, t in times.items()}
    stock, plugin = med.values()
    return {"block_size": block_size, "times": times, "median_s": med, "computed_tokens": tokens,
            "speedup": stock / plugin,
            "ms_per_computed_token": {m: 1000 * med[m] / tokens[m] for m in modes}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plugin_ratio", description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=("W1", "W3"), default="W1")
    p.add_argument("--block-sizes", default="128,32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench" / ".cache")
    args = p.parse_args(argv)
    from mmprm_infer import PRM

    w = workloads.base_workloads(args.workload, False)[0]
    path = workloads.text_checkpoint(w.model, args.cache_dir)
    prm = PRM.from_pretrained(path, format=workloads.TEXT_FORMAT, dtype="float32")
    inputs = workloads.make_inputs(prm, w, (), None)
    result = {"workload": w.label(), "loadavg_start": list(os.getloadavg()), "runs": []}
    for block_size in [int(b) for b in args.block_sizes.split(",")]:
        run = run_block_size(prm, path, inputs, block_size, args.rounds, args.threads)
        result["runs"].append(run)
        print(f"{w.label()} block {block_size}: " + "; ".join(
            f"{m}: median {run['median_s'][m]:.3f} s over {run['computed_tokens'][m]} computed tokens "
            f"({run['ms_per_computed_token'][m]:.3f} ms/token)" for m in run["median_s"])
            + f"; plugin speedup {run['speedup']:.2f}x", flush=True)
    result["loadavg_end"] = list(os.getloadavg())
    out = args.out or REPO / "bench" / "results" / f"plugin_ratio_{args.workload}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"JSON: {out}; load average {result['loadavg_start'][0]:.2f} at start, {result['loadavg_end'][0]:.2f} "
          "at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
