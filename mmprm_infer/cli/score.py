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
from mmprm_infer.cli.arguments import (
    FORMAT_NAMES,
    add_device,
    add_dtype,
    add_progress,
    alias,
    announce_device,
    non_negative_int,
    positive_int,
    resolve_device,
)
from mmprm_infer.io.data import LINE_CHARS_PER_CONTEXT_TOKEN, DataError
from mmprm_infer.io.files import OutputError, atomic_output, check_output_path
from mmprm_infer.io.progress import progress_bar

EXIT_RECORDS_FAILED = 3  # as mmprm_infer.io.records (which imports torch: not needed for `mmprm -h`)


def check_scoring_options(args) -> None:
    """Every option of score/rerank checked before the model loads (minutes for a large PRM)."""
    from mmprm_infer.loading import CheckpointNotFound, resolve_checkpoint  # lazy: it imports torch, transformers, PIL

    prog = f"mmprm {args.command}"
    if args.max_errors is not None and args.on_error != "skip":
        raise SystemExit(f"{prog}: --max-errors goes with --on-error skip (with fail, the first bad record stops)")
    if not Path(args.data).exists():
        raise SystemExit(f"{prog}: input file or folder {args.data} does not exist")
    try:
        check_output_path(args.output, args.data if Path(args.data).is_file() else None)
    except ValueError as exc:
        raise SystemExit(f"{prog}: {exc}") from None
    if args.prm is not None:
        try:
            args.prm = str(resolve_checkpoint(args.prm))
        except CheckpointNotFound as exc:
            raise SystemExit(f"{prog}: --prm {exc}") from None
    from mmprm_infer.engines import ENGINES  # lazy: it imports torch, transformers, PIL

    if args.engine is not None and args.engine not in ENGINES:
        raise SystemExit(f"{prog}: unknown --engine {args.engine!r}; choose one of {sorted(ENGINES)}")
    import torch  # torch: heavy, loaded where used

    args.device = resolve_device(args.device)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise SystemExit(f"{prog}: unknown --device {args.device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: --device {args.device}, but this torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu")


def load_prm(args):
    from mmprm_infer.io.records import PRMSpec  # lazy: it imports torch, transformers, PIL

    announce_device(f"mmprm {args.command}", args.device, args.dtype)
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
    from mmprm_infer.io.records import (  # lazy: it imports torch, transformers, PIL
        ResultWriter,
        ScoringOptions,
        base_dir,
        finished,
        plan_windows,
        process_window,
        read_windows,
    )

    in_path = Path(args.data)
    plan = plan_windows(in_path, args.batch_questions)  # an unreadable input fails before the model loads
    prm = load_prm(args) if args.prm else None
    options = ScoringOptions(command=args.command, aggregate=args.aggregate,
                             strategy=getattr(args, "strategy", "best_of_n"), engine=args.engine,
                             max_line_chars=args.max_line_chars)
    with atomic_output(args.output) as dst, \
            progress_bar(total=len(plan) - 1, desc=f"mmprm {args.command}", unit="window",
                         disable=args.no_progress) as bar:
        writer = ResultWriter(dst, args.on_error, prog=f"mmprm {args.command}: {in_path}", max_errors=args.max_errors)
        candidates, start = 0, time.perf_counter()
        for window in read_windows(in_path, plan, args.batch_questions, 0, len(plan) - 1):
            done = process_window(window, prm, options, base_dir(in_path))
            writer.write(done.results)
            candidates += done.candidates
            bar.set_postfix(questions=writer.written,
                            candidates_per_s=f"{candidates / (time.perf_counter() - start):.1f}",
                            refresh=False)
            bar.update(1)
    status = finished(writer.errors, writer.written, args.output)
    print(f"mmprm {args.command}: wrote {writer.written} records to {args.output}", file=sys.stderr)
    return status


def add_ray_arguments(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("Ray (needs the 'ray' extra)")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS (ray://host:10001 or host:6379), or none to join "
                        "$RAY_ADDRESS / a running local cluster, else start one on this machine")
    g.add_argument("--ray-actors", type=positive_int, default=None,
                   help=f"number of actors ({what}; default: fill the cluster)")
    g.add_argument("--ray-actor-cpus", type=positive_int, default=1, help="CPUs (torch threads) per CPU actor")
    g.add_argument("--ray-actor-gpus", type=float, default=1.0, help="GPUs per actor on a GPU cluster")


HELP = {"score": "step rewards for every candidate", "rerank": "pick the best candidate"}

PRM_HELP = ("PRM checkpoint: a folder, or a hub id (org/name) already in the local Hugging Face cache (nothing is "
            "downloaded)")
DATA_HELP = ("input records: JSONL, JSON, Parquet or Arrow file, or a folder of them (Hugging Face shards, "
             "datasets.save_to_disk)")


def configure(p: argparse.ArgumentParser, name: str) -> None:
    """The flags of ``mmprm score`` (``name="score"``) or ``mmprm rerank``."""
    p.add_argument("--prm", help=PRM_HELP + ("" if name == "score" else "; not needed with --strategy majority_vote"))
    p.add_argument("--data", "-d", help="(required) " + DATA_HELP)
    alias(p, "--input", "-i", dest="data")
    p.add_argument("--output", "-o", required=True, help="output JSONL (one record per input line)")
    p.add_argument("--format", choices=FORMAT_NAMES, help="PRM format (default: read from the checkpoint)")
    p.add_argument("--engine", default=None, help="scoring engine (default: fast; 'reference' for the oracle)")
    p.add_argument("--aggregate", default=None, choices=sorted([*AGGREGATIONS, *ALIASES]),
                   help="step rewards -> candidate score (default: the format's release default: mean for "
                        "visualprm, last for rlhflow, else min)")
    add_device(p)
    add_dtype(p)
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
    add_progress(p)
    if name == "rerank":
        p.add_argument("--strategy", default="best_of_n", choices=("best_of_n", "weighted_vote", "majority_vote"),
                       help="how the best candidate is picked")
    add_ray_arguments(p, "PRM actors: one per GPU when the cluster has GPUs, else CPU actors")


def run(args: argparse.Namespace) -> int:
    if args.data is None:
        raise SystemExit(f"mmprm {args.command}: --data is required (the input records)")
    if args.prm is None and (args.command == "score" or args.strategy != "majority_vote"):
        raise SystemExit(f"mmprm {args.command}: --prm is required"
                         + (" unless --strategy majority_vote" if args.command == "rerank" else ""))
    check_scoring_options(args)
    try:
        if args.ray is not None:
            # lazy: only `mmprm score` runs it; `mmprm -h` stays light
            from mmprm_infer.integrations.ray_cluster import RayConnectError
            from mmprm_infer.integrations.ray_scoring import RayJobError, ray_run_jsonl  # ray: the 'ray' extra

            try:
                return ray_run_jsonl(args)
            except (RayJobError, RayConnectError) as exc:
                raise SystemExit(f"mmprm {args.command}: {exc}; nothing was written") from None
        return run_jsonl(args)
    except (OutputError, DataError) as exc:
        raise SystemExit(f"mmprm {args.command}: {exc}") from None
    except KeyboardInterrupt:
        print(f"mmprm {args.command}: interrupted; nothing was written to {args.output}", file=sys.stderr)
        return 130
