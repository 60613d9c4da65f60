"""Ray scale-out: throughput of `mmprm score --ray` with 1 and 2 CPU actors on the W1 model.

    python -m bench.ray_scaling                    # 16 W1 questions x 16 candidates (P=1000, S=200)
    python -m bench.ray_scaling --questions 8 --quick

One run, one machine, one input file: the single-machine path (`mmprm score`
without --ray, 1 and 2 torch threads) and the Ray path with 1 and 2 actors of
1 CPU each on a local Ray cluster.  Each Ray job starts its actors (loading
the model) inside the timed region, so the report gives both the whole job and
the steady rate after the first window came back.  Every output file must be
identical to the single-machine one (checked).  Results: bench/results/ray_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads

REPO = Path(__file__).resolve().parent.parent


def write_questions(prm, base: workloads.Workload, n_questions: int, path: Path) -> int:
    """n_questions W1 questions (different seeds), one JSONL line each; returns the candidate count."""
    candidates = 0
    with open(path, "w", encoding="utf-8") as f:
        for q in range(n_questions):
            inputs = workloads.make_inputs(prm, base.with_(seed=q))
            f.write(json.dumps({"id": f"w1-{q}", "question": inputs.question,
                                "candidates": [list(c) for c in inputs.candidates]}) + "\n")
            candidates += len(inputs.candidates)
    return candidates


def single_machine(path: Path, src: Path, dst: Path, threads: int, batch_questions: int) -> float:
    """`mmprm score` without --ray, its options parsed by the command's own parser (so they never drift)."""
    from mmprm_infer.cli import build_parser
    from mmprm_infer.cli.score import run_jsonl

    args = build_parser("score", only=True).parse_args([
        "score", "--data", str(src), "--output", str(dst), "--prm", str(path), "--format", workloads.TEXT_FORMAT,
        "--device", "cpu", "--dtype", "float32", "--threads", str(threads), "--aggregate", "min",
        "--batch-questions", str(batch_questions), "--no-progress"])
    start = time.perf_counter()
    run_jsonl(args)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ray_scaling", description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-questions", type=int, default=1, help="questions per window (engine call)")
    p.add_argument("--quick", action="store_true", help="tiny dims (smoke; numbers mean nothing)")
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench" / ".cache")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ray_scaling.json")
    args = p.parse_args(argv)

    import ray

    from mmprm_infer import PRM
    from mmprm_infer.integrations.ray_scoring import PRMSpec, score_file

    base = workloads.QUICK_W1 if args.quick else workloads.W1
    path = workloads.text_checkpoint(base.model, args.cache_dir)
    prm = PRM.from_pretrained(path, format=workloads.TEXT_FORMAT, dtype="float32")
    work = args.out.parent / "ray_scaling_work"
    work.mkdir(parents=True, exist_ok=True)
    src = work / "questions.jsonl"
    candidates = write_questions(prm, base, args.questions, src)
    del prm

    rows = []
    reference = None
    for threads in (1, 2):
        dst = work / f"single-{threads}t.jsonl"
        seconds = single_machine(path, src, dst, threads, args.batch_questions)
        reference = reference or dst.read_text()
        rows.append({"engine": f"single machine, {threads} thread(s)", "actors": 0, "seconds": seconds,
                     "candidates_per_s": candidates / seconds, "identical": dst.read_text() == reference})
        print(rows[-1], flush=True)

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    spec = PRMSpec(str(path), format=workloads.TEXT_FORMAT, dtype="float32")
    for actors in (1, 2):
        dst = work / f"ray-{actors}a.jsonl"
        stats = score_file(src, dst, spec, batch_questions=args.batch_questions, actors=actors, actor_cpus=1,
                           progress=False)
        steady = (stats.candidates - stats.candidates / stats.windows) / max(stats.seconds - stats.first_window_s, 1e-9)
        rows.append({"engine": f"ray, {actors} actor(s) x 1 CPU", "actors": actors, "seconds": stats.seconds,
                     "first_window_s": stats.first_window_s, "candidates_per_s": stats.candidates_per_s,
                     "steady_candidates_per_s": steady, "identical": dst.read_text() == reference})
        print(rows[-1], flush=True)
    ray.shutdown()

    one, two = rows[2], rows[3]
    result = {"workload": base.label(), "questions": args.questions, "candidates": candidates,
              "batch_questions": args.batch_questions, "rows": rows,
              "scaling_2_vs_1_actor": one["seconds"] / two["seconds"],
              "steady_scaling_2_vs_1_actor": two["steady_candidates_per_s"] / one["steady_candidates_per_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{base.label()}, {args.questions} questions, {candidates} candidates")
    print(f"{'engine':36s} {'seconds':>8s} {'cand/s':>8s} {'steady cand/s':>14s} identical")
    for r in rows:
        steady = f"{r['steady_candidates_per_s']:.1f}" if "steady_candidates_per_s" in r else "-"
        print(f"{r['engine']:36s} {r['seconds']:8.1f} {r['candidates_per_s']:8.1f} {steady:>14s} {r['identical']}")
    print(f"2 actors vs 1: {result['scaling_2_vs_1_actor']:.2f}x whole job, "
          f"{result['steady_scaling_2_vs_1_actor']:.2f}x steady")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
