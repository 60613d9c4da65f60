"""``mmprm score`` and ``mmprm rerank``: score and rerank JSONL/Parquet files.

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

from mmprm_infer.aggregation import AGGREGATIONS, ALIASES
from mmprm_infer.cli.arguments import DTYPES, non_negative_int, positive_int
from mmprm_infer.formats import FORMATS
from mmprm_infer.io.files import OutputError, atomic_output, check_output_path
from mmprm_infer.io.progress import progress_bar
from mmprm_infer.io.records import (
    EXIT_RECORDS_FAILED,
    LINE_CHARS_PER_CONTEXT_TOKEN,
    InputError,
    PRMSpec,
    ResultWriter,
    ScoringOptions,
    finished,
    plan_windows,
    process_window,
    read_windows,
)


def check_scoring_options(args) -> None:
    """Every option of score/rerank checked before the model loads (minutes for a large PRM)."""
    prog = f"mmprm {args.command}"
    if args.max_errors is not None and args.on_error != "skip":
        raise SystemExit(f"{prog}: --max-errors goes with --on-error skip (with fail, the first bad record stops)")
    if not Path(args.input).is_file():
        raise SystemExit(f"{prog}: input file {args.input} does not exist")
    try:
        check_output_path(args.output, args.input)
    except ValueError as exc:
        raise SystemExit(f"{prog}: {exc}") from None
    if args.prm is not None and not (Path(args.prm) / "config.json").is_file():
        raise SystemExit(f"{prog}: --prm {args.prm} is not a checkpoint folder (no config.json in it)")
    from mmprm_infer.engines import (
        ENGINES,
        tree_cache,  # noqa: F401 - registers its engine
    )

    if args.engine is not None and args.engine not in ENGINES:
        raise SystemExit(f"{prog}: unknown --engine {args.engine!r}; choose one of {sorted(ENGINES)}")
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise SystemExit(f"{prog}: unknown --device {args.device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: --device {args.device}, but this torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu")


def load_prm(args):
    spec = PRMSpec(args.prm, format=args.format, dtype=args.dtype, engine=args.engine, max_tiles=args.max_tiles)
    try:
        return spec.load(args.device, args.threads)
    except Exception as exc:  # noqa: BLE001 - a checkpoint can fail in many ways; name it and the cause
        raise SystemExit(f"mmprm {args.command}: cannot load the PRM from {args.prm}: {type(exc).__name__}: {exc}") \
            from None


def run_jsonl(args) -> int:
    """Score/rerank a JSONL or Parquet file window by window (see records.py), on this machine.
    The output appears only when the run finishes (a temp file renamed), so a failed run
    leaves a previous output as it was."""
    in_path = Path(args.input)
    plan = plan_windows(in_path, args.batch_questions)  # an unreadable input fails before the model loads
    prm = load_prm(args) if args.prm else None
    options = ScoringOptions(command=args.command, aggregate=args.aggregate,
                             strategy=getattr(args, "strategy", "best_of_n"), engine=args.engine,
                             max_line_chars=args.max_line_chars)
    with atomic_output(args.output) as dst, \
            progress_bar(total=len(plan) - 1, desc=f"mmprm {args.command}", unit="window", disable=args.quiet) as bar:
        writer, candidates, start = ResultWriter(dst, args.on_error, max_errors=args.max_errors), 0, time.perf_counter()
        for window in read_windows(in_path, plan, args.batch_questions, 0, len(plan) - 1):
            done = process_window(window, prm, options, in_path.parent)
            writer.write(done.results)
            candidates += done.candidates
            bar.set_postfix(questions=writer.written,
                            candidates_per_s=f"{candidates / (time.perf_counter() - start):.1f}",
                            refresh=False)
            bar.update(1)
    return finished(writer.errors, writer.written, args.output)


def add_ray_arguments(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("Ray (needs the 'ray' extra)")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS (ray://host:10001 or host:6379), or none to join "
                        "$RAY_ADDRESS / a running local cluster, else start one on this machine")
    g.add_argument("--ray-actors", type=positive_int, default=None,
                   help=f"number of actors ({what}; default: fill the cluster)")
    g.add_argument("--ray-actor-cpus", type=positive_int, default=1,
                   help="CPUs (torch threads) per CPU actor (default 1)")
    g.add_argument("--ray-actor-gpus", type=float, default=1.0, help="GPUs per actor on a GPU cluster (default 1)")


HELP = {"score": "step rewards for every candidate", "rerank": "pick the best candidate"}


def configure(p: argparse.ArgumentParser, name: str) -> None:
    """The flags of ``mmprm score`` (``name="score"``) or ``mmprm rerank``."""
    p.add_argument("--prm", required=name == "score", help="PRM checkpoint directory")
    p.add_argument("--input", "-i", required=True, help="input JSONL, or Parquet (*.parquet)")
    p.add_argument("--output", "-o", required=True, help="output JSONL (one record per input line)")
    p.add_argument("--format", choices=sorted(FORMATS), help="PRM format (default: read from the checkpoint)")
    p.add_argument("--engine", default=None, help="scoring engine (default: fast; 'reference' for the oracle)")
    p.add_argument("--aggregate", default=None, choices=sorted([*AGGREGATIONS, *ALIASES]),
                   help="step rewards -> candidate score (default: the format's release default: mean for "
                        "visualprm, last for rlhflow, else min)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch-questions", type=positive_int, default=8,
                   help="questions (input lines) scored per engine call: the unit of work, also on Ray")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's; on Ray: --ray-actor-cpus)")
    p.add_argument("--max-tiles", type=positive_int, default=None,
                   help="InternVL formats: dynamic-tiling budget per image (default: the format's)")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="a bad record stops the run, writing nothing (fail), or becomes an error record "
                        f"and the run goes on, exiting with status {EXIT_RECORDS_FAILED} at the end (skip)")
    p.add_argument("--max-errors", type=non_negative_int, default=None,
                   help="with --on-error skip: stop (writing nothing) once more than this many records failed")
    p.add_argument("--max-line-chars", type=positive_int, default=None,
                   help="an input line (record) longer than this is an error record, refused before it is parsed "
                        f"or tokenized (default: {LINE_CHARS_PER_CONTEXT_TOKEN} per token of the PRM's context)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if name == "rerank":
        p.add_argument("--strategy", default="best_of_n", choices=("best_of_n", "weighted_vote", "majority_vote"))
    add_ray_arguments(p, "PRM actors: one per GPU when the cluster has GPUs, else CPU actors")


def run(args: argparse.Namespace) -> int:
    if args.command == "rerank" and args.prm is None and args.strategy != "majority_vote":
        raise SystemExit("mmprm rerank: --prm is required unless --strategy majority_vote")
    check_scoring_options(args)
    try:
        if args.ray is not None:
            from mmprm_infer.integrations.ray_cluster import RayConnectError
            from mmprm_infer.integrations.ray_scoring import RayJobError, ray_run_jsonl  # ray: the 'ray' extra

            try:
                return ray_run_jsonl(args)
            except (RayJobError, RayConnectError) as exc:
                raise SystemExit(f"mmprm {args.command}: {exc}; nothing was written") from None
        return run_jsonl(args)
    except (OutputError, InputError) as exc:
        raise SystemExit(f"mmprm {args.command}: {exc}") from None
    except KeyboardInterrupt:
        print(f"mmprm {args.command}: interrupted; nothing was written to {args.output}", file=sys.stderr)
        return 130
