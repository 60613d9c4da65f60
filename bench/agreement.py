"""How often bf16 scoring picks the fp32 reference's best-of-N candidate, over many W1-like questions.

    python -m bench.agreement --seeds 200                     # W1 model, N=16, P=1000, S=200, fast bf16
    python -m bench.agreement --seeds 50 --oracle reference   # the fp32 reference engine as the oracle
    python -m bench.agreement --engines fast,reference        # also the bf16 reference: what bf16 itself costs

Each seed draws a new question and N candidates with the W1 workload's
generator (``bench.workloads.make_inputs``, ``Workload.seed``) on the W1
checkpoint.  The oracle (the fp32 reference engine, or the fp32 fast engine,
which equals it to 1e-6 and is ~7x cheaper) scores them; each bf16 engine
scores the same ids; best-of-N takes each aggregation's argmax.  Reported per
engine and aggregation: the share of questions whose pick is the oracle's,
and for the others the oracle's gap between its pick and the bf16 pick (a gap
below bf16's error is a near-tie, not a wrong ranking).  A measurement, not a
test: run it on any machine; it prints the CPU and load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import workloads
from bench.run import REPO, _load
from mmprm_infer.aggregation import aggregate

AGGREGATIONS = ("min", "mean", "last", "prod")


def best(rewards: list[list[float]], how: str) -> tuple[int, list[float]]:
    scores = [aggregate(r, how) for r in rewards]
    return max(range(len(scores)), key=lambda i: (scores[i], -i)), scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--first-seed", type=int, default=1)
    p.add_argument("--oracle", choices=("reference", "fast"), default="fast",
                   help="fp32 engine whose best-of-N is the truth (fast equals reference to 1e-6)")
    p.add_argument("--engines", default="fast", help="engines run in bf16 (comma list: fast,reference)")
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--suffix-tokens", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench" / ".cache")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "agreement.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = workloads.W1.with_(n_candidates=args.candidates, prompt_tokens=args.prompt_tokens,
                              suffix_tokens=args.suffix_tokens)
    prm32 = _load(base, args.cache_dir, "float32")[0]
    prm16 = _load(base, args.cache_dir, "bfloat16")[0]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    same = {e: {how: 0 for how in AGGREGATIONS} for e in engines}
    gaps: dict = {e: {how: [] for how in AGGREGATIONS} for e in engines}
    max_diff = {e: 0.0 for e in engines}
    start = time.perf_counter()
    for n, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds), 1):
        inputs = workloads.make_inputs(prm32, base.with_(seed=seed))
        truth = prm32.score(inputs.question, inputs.candidates, engine=args.oracle)
        for e in engines:
            got = prm16.score(inputs.question, inputs.candidates, engine=e)
            max_diff[e] = max(max_diff[e], max(abs(a - b) for x, y in zip(truth, got) for a, b in zip(x, y)))
            for how in AGGREGATIONS:
                (i, scores), (j, _) = best(truth, how), best(got, how)
                same[e][how] += i == j
                if i != j:
                    gaps[e][how].append(scores[i] - scores[j])
        if n % 10 == 0 or n == args.seeds:
            print(f"  {n}/{args.seeds} questions, {time.perf_counter() - start:.0f} s: " + "; ".join(
                f"{e} " + ", ".join(f"{how} {same[e][how] / n:.1%}" for how in AGGREGATIONS) for e in engines),
                flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    described = {e: prm16.engine(e).describe(prm16.adapter) for e in engines if hasattr(prm16.engine(e), "describe")}
    result = {"seeds": args.seeds, "first_seed": args.first_seed, "oracle": f"{args.oracle} fp32",
              "engines_bf16": engines, "workload": base.label(), "cpu": cpu,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
              "loadavg_end": os.getloadavg(), "max_abs_diff": max_diff, "described": described,
              "agreement": {e: {how: same[e][how] / args.seeds for how in AGGREGATIONS} for e in engines},
              "disagreement_gaps": gaps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{base.label()}, {args.seeds} questions, oracle {args.oracle} fp32; {cpu}, "
          f"{result['cpu_capability']}")
    for e in engines:
        how_run = described.get(e, {}).get("compute_dtype", "bfloat16")
        print(f"  {e} bf16 (computes in {how_run}), max |reward diff| {max_diff[e]:.2e}")
        for how in AGGREGATIONS:
            g = sorted(gaps[e][how])
            print(f"    best-of-N by {how:<5} same pick {same[e][how] / args.seeds:.1%}"
                  + (f"; oracle gaps where it differs: median {g[len(g) // 2]:.2e}, max {g[-1]:.2e}" if g else ""))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
