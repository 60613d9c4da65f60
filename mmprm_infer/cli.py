"""The `mmprm` command line: score and rerank JSONL/Parquet files, run the demo.

Input records: {"question": str, "candidates": [str | [str, ...]], "image":
optional path or list of paths relative to the input file, "id": optional}.
Output: one JSONL record per input line (Parquet: row), in input order.  A bad
line is an error naming its line number; with --on-error skip it becomes an
{"line": N, "error": ...} record instead, so nothing is dropped silently.
``--ray [ADDRESS]`` runs the same job on a Ray cluster (integrations/ray_scoring.py)
with identical output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .aggregation import AGGREGATIONS, ALIASES
from .formats import FORMATS
from .progress import progress_bar
from .records import PRMSpec, ResultWriter, ScoringOptions, plan_windows, process_window, read_windows


def run_jsonl(args) -> int:
    """Score/rerank a JSONL or Parquet file window by window (see records.py), on this machine."""
    in_path = Path(args.input)
    if not in_path.is_file():
        raise SystemExit(f"mmprm: input file {in_path} does not exist")
    prm = PRMSpec(args.prm, format=args.format, dtype=args.dtype, engine=args.engine,
                  max_tiles=args.max_tiles).load(args.device, args.threads) if args.prm else None
    options = ScoringOptions(command=args.command, aggregate=args.aggregate,
                             strategy=getattr(args, "strategy", "best_of_n"), engine=args.engine)
    plan = plan_windows(in_path, args.batch_questions)
    with open(args.output, "w", encoding="utf-8") as dst, \
            progress_bar(total=len(plan) - 1, desc=f"mmprm {args.command}", unit="window", disable=args.quiet) as bar:
        writer, candidates, start = ResultWriter(dst, args.on_error), 0, time.perf_counter()
        for window in read_windows(in_path, plan, args.batch_questions, 0, len(plan) - 1):
            done = process_window(window, prm, options, in_path.parent)
            writer.write(done.results)
            candidates += done.candidates
            bar.set_postfix(questions=writer.written, candidates_per_s=f"{candidates / (time.perf_counter() - start):.1f}",
                            refresh=False)
            bar.update(1)
    if writer.errors:
        print(f"mmprm: {writer.errors} record(s) failed; see the 'error' records in {args.output}", file=sys.stderr)
    return 0


def add_ray_arguments(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("Ray (needs the 'ray' extra)")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS (ray://host:10001 or host:6379), or none to join "
                        "$RAY_ADDRESS / a running local cluster, else start one on this machine")
    g.add_argument("--ray-actors", type=int, default=None, help=f"number of actors ({what}; default: fill the cluster)")
    g.add_argument("--ray-actor-cpus", type=int, default=1, help="CPUs (torch threads) per CPU actor (default 1)")
    g.add_argument("--ray-actor-gpus", type=float, default=1.0, help="GPUs per actor on a GPU cluster (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprm", description="Process-reward-model scoring and reranking")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("score", "step rewards for every candidate"), ("rerank", "pick the best candidate")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--prm", required=name == "score", help="PRM checkpoint directory")
        p.add_argument("--input", "-i", required=True, help="input JSONL, or Parquet (*.parquet)")
        p.add_argument("--output", "-o", required=True, help="output JSONL (one record per input line)")
        p.add_argument("--format", choices=sorted(FORMATS), help="PRM format (default: read from the checkpoint)")
        p.add_argument("--engine", default=None, help="scoring engine (default: fast; 'reference' for the oracle)")
        p.add_argument("--aggregate", default="min", choices=sorted([*AGGREGATIONS, *ALIASES]))
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU)")
        p.add_argument("--batch-questions", type=int, default=8,
                       help="questions (input lines) scored per engine call: the unit of work, also on Ray")
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's; on Ray: --ray-actor-cpus)")
        p.add_argument("--max-tiles", type=int, default=None,
                       help="InternVL formats: dynamic-tiling budget per image (default: the format's)")
        p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                       help="a bad record stops the run (fail) or becomes an error record (skip)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "rerank":
            p.add_argument("--strategy", default="best_of_n", choices=("best_of_n", "weighted_vote", "majority_vote"))
        add_ray_arguments(p, "PRM actors: one per GPU when the cluster has GPUs, else CPU actors")
    conv = sub.add_parser("convert-internvl", help="convert a published InternVL checkpoint (MM-PRM, VisualPRM: "
                          "InternVLChatModel) to the transformers-native layout, loadable without remote code")
    conv.add_argument("src", help="folder of the published checkpoint (config.json with InternVLChatModel)")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: keep the stored dtype)")
    conv.add_argument("--format", choices=sorted(FORMATS), help="PRM format to record (default: detected)")
    conv.add_argument("--trust-remote-code", action="store_true",
                      help="load the checkpoint's own tokenizer code to convert it / check the converted one")
    conv.add_argument("--tokenizer-json", default=None, help="take the vocabulary from this tokenizer.json")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    serve = sub.add_parser("serve", help="OpenAI-compatible reranking server in front of a policy server "
                           "(needs the 'serve' extra: fastapi, uvicorn, httpx)")
    serve.add_argument("--policy-url", required=True, help="the policy's OpenAI API root, e.g. http://127.0.0.1:8000/v1")
    serve.add_argument("--policy-model", default=None, help="model name to ask the policy for (default: its first)")
    serve.add_argument("--api-key", default=None, help="Bearer token for the policy (or $MMPRM_POLICY_API_KEY)")
    serve.add_argument("--prm", required=True, help="PRM checkpoint directory")
    serve.add_argument("--format", choices=sorted(FORMATS), help="PRM format (default: read from the checkpoint)")
    serve.add_argument("--engine", default=None, help="scoring engine (default: fast)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU)")
    serve.add_argument("--max-tiles", type=int, default=None, help="InternVL formats: tiles per image")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--n", type=int, default=8, help="samples drawn from the policy per request")
    serve.add_argument("--aggregate", default="min", choices=sorted([*AGGREGATIONS, *ALIASES]))
    serve.add_argument("--strategy", default="best_of_n", choices=("best_of_n", "weighted_vote", "majority_vote"))
    serve.add_argument("--max-queue", type=int, default=256, help="requests admitted at once; more get HTTP 503")
    serve.add_argument("--batch-window-ms", type=float, default=10.0,
                       help="how long the scorer waits to batch concurrent requests into one PRM pass")
    serve.add_argument("--upstream-timeout", type=float, default=60.0, help="seconds per policy request attempt")
    serve.add_argument("--retries", type=int, default=2, help="retries toward the policy (errors, 429, 5xx, timeouts)")
    serve.add_argument("--image-root", default=None, help="only read local image paths under this folder")
    serve.add_argument("--ignore-images", action="store_true", help="text-only PRM: score image requests on text")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads for the PRM (default: torch's; leave cores to a policy on the same box)")
    serve.add_argument("--log-level", default="info")
    demo = sub.add_parser("demo", help="the built-in default job: the demo-preset pipeline (MCTS annotation -> train a "
                          "tiny multimodal PRM -> Best-of-N evaluation), then a reranking example")
    demo.add_argument("--workdir", default="runs/demo")
    # annotate / pipeline take their own options (see `mmprm annotate -h`, `mmprm pipeline -h`)
    sub.add_parser("annotate", help="MCTS (OmegaPRM) step annotation of synthetic multimodal problems", add_help=False)
    sub.add_parser("pipeline", help="annotate -> label -> train a small PRM -> evaluate (--preset demo | full)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "annotate":
        from .train.annotate import annotate_main

        return annotate_main(argv[1:])
    if argv and argv[0] == "pipeline":
        from .train.pipeline import pipeline_main

        return pipeline_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in ("score", "rerank"):
        if args.command == "rerank" and args.prm is None and args.strategy != "majority_vote":
            raise SystemExit("mmprm rerank: --prm is required unless --strategy majority_vote")
        if args.ray is not None:
            from .integrations.ray_scoring import ray_run_jsonl

            return ray_run_jsonl(args)
        return run_jsonl(args)
    if args.command == "convert-internvl":
        from .models.convert_internvl import ConversionError, convert_internvl

        try:
            convert_internvl(args.src, args.dst, dtype=args.dtype, format=args.format,
                             trust_remote_code=args.trust_remote_code, tokenizer_json=args.tokenizer_json,
                             overwrite=args.overwrite)
        except ConversionError as exc:
            raise SystemExit(f"mmprm convert-internvl: {exc}") from None
        return 0
    if args.command == "serve":
        from .integrations.server import serve_main

        return serve_main(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.workdir)
    return 2


if __name__ == "__main__":
    sys.exit(main())
