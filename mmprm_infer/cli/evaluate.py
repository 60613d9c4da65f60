"""`mmprm eval <benchmark>`: a PRM on a benchmark's own files, one command each.

    mmprm eval processbench --prm DIR --data ProcessBench/           # a folder of split files, or one file
    mmprm eval visualprocessbench --prm DIR --data test.jsonl --image-root images/
    mmprm eval prmbench --prm DIR --data prmbench_preview.jsonl
    mmprm eval bon --prm DIR --data candidates.jsonl

Each writes ``--report`` (JSON), prints a table and keeps the step rewards in
``<report>.rewards.json``: a rerun with another ``--threshold`` or aggregation
reuses them without loading the model (and says so).  ``--data`` is read by the one
record reader (``mmprm_infer.io.data``): a file, a folder of split files, Hugging Face
shards, a ``datasets.save_to_disk`` folder; this run's report, rewards cache and
plot are never read as data even when they sit in that folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmprm_infer.aggregation import AGGREGATIONS, ALIASES, PROBABILITY_AGGREGATIONS
from mmprm_infer.cli.arguments import (
    FORMAT_NAMES,
    add_device,
    add_dtype,
    add_progress,
    alias,
    announce_device,
    positive_int,
    resolve_device,
)
from mmprm_infer.integrations.ray_cluster import RayConnectError
from mmprm_infer.io.data import DataError, Record, field, read_records, read_splits
from mmprm_infer.io.files import (
    OutputError,
    check_output_path,
    existing_files,
    json_safe,
    write_json_atomic,
    written_in_place,
)

__all__ = ["configure", "run", "resolve_images"]

HELP = ("evaluate a PRM on a benchmark's own files: processbench, visualprocessbench, prmbench, bon")
DESCRIPTION = "Evaluate a PRM on a benchmark's own files"


class EvalError(Exception):
    """A problem with the command's input; printed as one `mmprm eval: ...` line."""


# --------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------
def resolve_images(record: Record, name: str, base_dir: Path, image_root: Path | None) -> list[str] | None:
    """The record's image field as existing paths (relative ones under --image-root, else beside the data)."""
    value = record.data.get(name)
    if value is None or value == []:
        return None
    paths = value if isinstance(value, list) else [value]
    if not all(isinstance(p, str) and p for p in paths):
        raise record.error(f"field '{name}' must be a path or a list of paths")

    return existing_files(paths, image_root or base_dir, lambda p, full: record.error(
        f"image {p} of field '{name}' not found at {full} (give --image-root for the folder the benchmark's image "
        "paths are relative to)"))


BenchmarkDataError = DataError


class Collector:
    """Parses records; a bad one stops the run (fail) or is listed in the report and left out (skip)."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.errors: list[str] = []

    def parse(self, records: list[Record], read: Callable[[Record], object]) -> list:
        out = []
        for record in records:
            try:
                out.append(read(record))
            except BenchmarkDataError as exc:
                self.fail(str(exc))
        return out

    def fail(self, message: str) -> None:
        if self.on_error == "fail":
            raise EvalError(f"{message} (use --on-error skip to leave it out and go on)")
        print(f"mmprm eval: skipped {message}", file=sys.stderr)
        self.errors.append(message)


def rewards_cache_path(args) -> str:
    return f"{args.report}.rewards.json"


def outputs(args) -> list[str]:
    """What this run writes: never read back as benchmark data."""
    return [args.report, rewards_cache_path(args), *([plot_path(args)] if args.benchmark == "bon" else [])]


def plot_path(args) -> str:
    return str(args.plot or Path(args.report).with_name("accuracy_vs_n.png"))


def score(args, items: list, wheres: list[str], collector: Collector, desc: str) -> list:
    """Rewards per item, or None where the PRM failed on it (listed by the collector)."""
    # lazy: only `mmprm eval` runs it; `mmprm -h` stays light
    from mmprm_infer.evaluation.scoring import RewardCache, ScoringFailure, prm_fingerprint, score_with_cache
    from mmprm_infer.io.records import PRMSpec  # lazy: it imports torch, transformers, PIL

    spec = PRMSpec(args.prm, format=args.format, dtype=args.dtype, engine=args.engine, max_tiles=args.max_tiles)
    # a report written in place (a device such as /dev/null, a FIFO) has no folder of its own for the cache
    no_cache = args.no_cache or written_in_place(args.report)
    cache = RewardCache(None if no_cache else rewards_cache_path(args), prm_fingerprint(spec))
    cached = sum(cache.key(item) in cache.entries for item in items)
    if cached:
        print(f"mmprm eval {args.benchmark}: {cached} of {len(items)} items' step rewards reused from "
              f"{cache.path} (same checkpoint, format, dtype and records; --no-cache scores them again)",
              file=sys.stderr)
    remote = None
    if args.ray is not None:
        # lazy: only `mmprm eval` runs it; `mmprm -h` stays light
        from mmprm_infer.integrations.ray_scoring import score_items

        def remote(todo):
            return score_items(todo, spec, batch_questions=args.batch_questions, address=args.ray,
                               actors=args.ray_actors, device=args.device, progress=not args.no_progress)

    def load():
        announce_device(f"mmprm eval {args.benchmark}", args.device, args.dtype)
        return spec.load(args.device, args.threads)

    results = score_with_cache(items, load, cache, args.batch_questions, args.engine, not args.no_progress, desc,
                               remote)
    out: list[Any] = []  # step rewards per item, None where it failed
    for where, r in zip(wheres, results):
        if isinstance(r, ScoringFailure):
            collector.fail(f"{where}: the PRM could not score it: {r.message}")
            out.append(None)
        else:
            out.append(r)
    return out


def _pct(x: float) -> str:
    return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.1f}"


UNDEFINED = ("null: the metric is undefined, because the cases it averages over are none (a split or category "
             "with nothing scored, a class of steps absent from both the labels and the predictions); strict "
             "JSON has no NaN")


def finish(args, report: dict, collector: Collector, table: list[str]) -> int:
    report["errors"] = collector.errors

    report["settings"] = {k: v for k, v in vars(args).items() if k not in ("func", "run")}
    data, undefined = json_safe(json.loads(json.dumps(report, default=str)))
    if undefined:  # NaN is not JSON: strict parsers refuse the file
        data["undefined"] = {"fields": undefined, "why": UNDEFINED}
    write_json_atomic(args.report, data)
    print("\n".join(table))
    print(f"report: {args.report}")
    if not args.no_cache:
        print(f"step rewards: {rewards_cache_path(args)}")
    if collector.errors:
        print(f"mmprm eval: {len(collector.errors)} record(s) left out; listed under 'errors' in the report",
              file=sys.stderr)
        return 3
    return 0


# --------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------
def run_processbench(args) -> int:
    # lazy: only `mmprm eval` runs it; `mmprm -h` stays light
    from mmprm_infer.evaluation.processbench import read_case, split_metrics

    collector = Collector(args.on_error)
    splits = {name: collector.parse(records, read_case)
              for name, records in read_splits(args.data, exclude=outputs(args)).items()}
    cases = [c for name in splits for c in splits[name]]
    rewards = score(args, [c.item for c in cases], [c.where for c in cases], collector, "processbench")
    by_case = {id(c): r[0] for c, r in zip(cases, rewards) if r is not None}
    report: dict = {"benchmark": "processbench", "threshold": args.threshold, "splits": {}}
    table = [f"ProcessBench, threshold {args.threshold}", f"{'split':<16}{'n':>6}{'acc_error':>11}{'acc_correct':>13}"
             f"{'F1':>8}"]
    for name, split_cases in splits.items():
        scored = [c for c in split_cases if id(c) in by_case]
        if not scored:
            continue
        m = split_metrics(scored, [by_case[id(c)] for c in scored], args.threshold)
        report["splits"][name] = m
        table.append(f"{name:<16}{m['n']:>6}{_pct(m['acc_error']):>11}{_pct(m['acc_correct']):>13}{_pct(m['f1']):>8}")
    f1s = [m["f1"] for m in report["splits"].values()]
    report["average_f1"] = sum(f1s) / len(f1s) if f1s else math.nan
    table.append(f"{'average F1':<16}{'':>30}{_pct(report['average_f1']):>8}")
    return finish(args, report, collector, table)


def _step_table(title: str, rows: list[tuple[str, dict]], score_key: str = "macro_f1") -> list[str]:
    table = [title, f"{'':<24}{'steps':>7}{'F1 right':>10}{'F1 wrong':>10}{'score':>8}"]
    for name, m in rows:
        table.append(f"{name:<24}{m['steps']:>7}{_pct(m['f1_correct']):>10}{_pct(m['f1_incorrect']):>10}"
                     f"{_pct(m[score_key]):>8}")
    return table


def run_visualprocessbench(args) -> int:
    # lazy: only `mmprm eval` runs it; `mmprm -h` stays light
    from mmprm_infer.evaluation.visualprocessbench import metrics, read_case

    collector = Collector(args.on_error)
    records = list(read_records(args.data, exclude=outputs(args)))
    # records read from a file have a path
    cases = collector.parse(records, lambda r: read_case(r, resolve_images(r, "image", r.path.parent,  # type: ignore[union-attr]
                                                                           args.image_root)))
    rewards = score(args, [c.item for c in cases], [c.where for c in cases], collector, "visualprocessbench")
    scored = [(c, r[0]) for c, r in zip(cases, rewards) if r is not None]
    m = metrics([c for c, _ in scored], [r for _, r in scored], args.threshold)
    report = {"benchmark": "visualprocessbench", "threshold": args.threshold, "cases": len(scored), **m}
    table = _step_table(f"VisualProcessBench, {len(scored)} cases, threshold {args.threshold} (neutral steps "
                        f"left out: {m['neutral_steps']})", [*m["by_source"].items(), ("overall", m["overall"])])
    return finish(args, report, collector, table)


def run_prmbench(args) -> int:
    # lazy: only `mmprm eval` runs it; `mmprm -h` stays light
    from mmprm_infer.evaluation.prmbench import metrics, read_case

    collector = Collector(args.on_error)
    records = list(read_records(args.data, exclude=outputs(args)))
    cases = collector.parse(records, read_case)
    rewards = score(args, [c.item for c in cases], [c.where for c in cases], collector, "prmbench")
    scored = [(c, r[0]) for c, r in zip(cases, rewards) if r is not None]
    m = metrics([c for c, _ in scored], [r for _, r in scored], args.threshold)
    report = {"benchmark": "prmbench", "threshold": args.threshold, **m}
    table = _step_table(f"PRMBench, {m['samples']} samples, threshold {args.threshold} (PRMScore; "
                        "multi_solutions: F1 of right steps)",
                        [*m["by_classification"].items(), ("overall", {**m["overall"], "prmscore": m["prmscore"]})],
                        score_key="prmscore")
    table.append("categories: " + ", ".join(f"{k} {_pct(v).strip()}" for k, v in m["categories"].items()))
    return finish(args, report, collector, table)


def _bon_question(args):
    from mmprm_infer.prm import ScoringItem  # lazy: it imports torch, transformers, PIL

    def read(record: Record):
        question = field(record, "question", str)
        gold = field(record, "answer", (str, int, float))
        candidates = field(record, "candidates", list)
        if not candidates or not all(isinstance(c, str) or (isinstance(c, list) and c and all(
                isinstance(s, str) for s in c)) for c in candidates):
            raise record.error("field 'candidates' must be a non-empty list of solutions (strings or lists of steps)")
        category = record.data.get("category")
        # records read from a file have a path
        image = resolve_images(record, "image", record.path.parent, args.image_root)  # type: ignore[union-attr]
        return ScoringItem(question, candidates, image), str(gold), None if category is None else str(category), \
            record.where
    return read


def run_bon(args) -> int:
    # lazy: only `mmprm eval` runs it; `mmprm -h` stays light
    from mmprm_infer.evaluation.best_of_n import BonQuestion, accuracy_curves
    from mmprm_infer.evaluation.plot import plot_curves  # lazy: only `mmprm eval` runs it; `mmprm -h` stays light

    collector = Collector(args.on_error)
    parsed = collector.parse(list(read_records(args.data, exclude=outputs(args))), _bon_question(args))
    if not parsed:
        raise EvalError(f"{args.data}: no usable records")
    rewards = score(args, [p[0] for p in parsed], [p[3] for p in parsed], collector, "best-of-N")
    questions = [BonQuestion.from_candidates(item.candidates, gold, r, category)
                 for (item, gold, category, _), r in zip(parsed, rewards) if r is not None]
    curves = accuracy_curves(questions, args.aggregate, args.ns, args.subsets, args.seed)
    # beside a report written in place (/dev/null) there is no folder of ours for the plot
    plot = None if args.plot is None and written_in_place(args.report) else Path(plot_path(args))
    report = {"benchmark": "bon", **curves, "plot": None if plot is None else str(plot)}
    if plot is not None:
        plot_curves(curves, plot, f"{Path(args.data).name}: {curves['questions']} questions")
        print(f"plot: {plot}")
    ns, acc, band = curves["ns"], curves["accuracy"], curves["band"]
    table = [f"Best-of-N accuracy (%), {curves['questions']} questions, mean over subsets, +- 95 % band at the "
             f"largest N", "method".ljust(22) + "".join(f"N={n}".rjust(8) for n in ns) + "    +-"]
    for method in [f"best_of_n/{a}" for a in args.aggregate] + [f"weighted_vote/{a}" for a in args.aggregate] + [
            "majority", "random", "pass"]:
        if method in acc:
            row = "".join(_pct(acc[method].get(str(n))).rjust(8) for n in ns)
            table.append(method.ljust(22) + row + f"{100 * band[method][str(ns[-1])]:6.1f}")
    return finish(args, report, collector, table)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, default_report: str) -> None:
    p.add_argument("--prm", required=True, help="PRM checkpoint: a folder, or a hub id in the local Hugging Face "
                   "cache (nothing is downloaded)")
    p.add_argument("--report", default=default_report, help="report JSON (the step rewards go beside it, in "
                   "<report>.rewards.json)")
    p.add_argument("--format", choices=FORMAT_NAMES, help="PRM format (default: read from the checkpoint)")
    p.add_argument("--engine", default=None, help="scoring engine (default: fast)")
    add_device(p)
    add_dtype(p)
    p.add_argument("--max-tiles", type=positive_int, default=None, help="InternVL formats: tiles per image "
                   "(default: the format's)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-questions", type=positive_int, default=8, help="items per engine call")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="a bad record stops the run (fail) or is left out and listed in the report (skip)")
    p.add_argument("--no-cache", action="store_true", help="score everything again (no <report>.rewards.json)")
    add_progress(p)
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="score on a Ray cluster, as `mmprm score --ray` (a failed item fails the run there)")
    p.add_argument("--ray-actors", type=positive_int, default=None, help="default: fill the cluster")


DATA_HELP = ("a JSONL, JSON, Parquet or Arrow file, or a folder of them (one split per file; Hugging Face shards "
             "name-00000-of-00002.* are one split; a datasets.save_to_disk folder)")


def _data(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", "-d", help=f"(required) {what}: {DATA_HELP}")
    alias(p, "--input", "-i", dest="data")


def _aggregations(value: str) -> list[str]:
    return [ALIASES.get(a, a) for a in value.split(",") if a]


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True)
    p = sub.add_parser("processbench", help="ProcessBench: earliest wrong step (acc on error / correct cases, F1)")
    _data(p, "the split files (gsm8k, math, ...)")
    _common(p, "processbench-report.json")
    p.add_argument("--threshold", type=float, default=0.5, help="step-reward threshold: the first step below it "
                   "is the predicted error")
    p.set_defaults(func=run_processbench)
    p = sub.add_parser("visualprocessbench", help="VisualProcessBench: macro F1 of right / wrong steps, per source")
    _data(p, "test.jsonl")
    p.add_argument("--image-root", type=Path, default=None, help="folder the 'image' paths are relative to "
                   "(default: the data file's)")
    _common(p, "visualprocessbench-report.json")
    p.add_argument("--threshold", type=float, default=0.5, help="step-reward threshold: a step is predicted right "
                   "at or above it")
    p.set_defaults(func=run_visualprocessbench)
    p = sub.add_parser("prmbench", help="PRMBench: PRMScore overall, per classification and category")
    _data(p, "PRMBench's data/*.jsonl")
    _common(p, "prmbench-report.json")
    p.add_argument("--threshold", type=float, default=0.5, help="step-reward threshold: a step is predicted right "
                   "above it (PRMBench's rule)")
    p.set_defaults(func=run_prmbench)
    p = sub.add_parser("bon", help="Best-of-N accuracy versus N on your candidates")
    _data(p, "records with question, answer, candidates, image?, category?")
    p.add_argument("--image-root", type=Path, default=None, help="folder image paths are relative to "
                   "(default: the input file's)")
    p.add_argument("--aggregate", type=_aggregations, default=list(PROBABILITY_AGGREGATIONS),
                   help=f"step rewards -> candidate score, comma-separated, from {sorted(AGGREGATIONS)}")
    alias(p, "--aggregations", dest="aggregate", type=_aggregations)
    p.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="the N values (default 1, 2, 4, ... up to the smallest candidate count)")
    p.add_argument("--subsets", type=int, default=256, help="random subsets per question and N (every subset "
                   "when there are fewer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="accuracy-vs-N PNG (default: accuracy_vs_n.png beside the report)")
    _common(p, "bon-report.json")
    p.set_defaults(func=run_bon)


def _check(args) -> None:
    from mmprm_infer.loading import CheckpointNotFound, resolve_checkpoint  # lazy: it imports torch, transformers, PIL

    if args.data is None:
        raise EvalError("--data is required (the benchmark's files)")
    if not Path(args.data).exists():
        raise EvalError(f"{args.data} does not exist")
    try:
        args.prm = str(resolve_checkpoint(args.prm))
    except CheckpointNotFound as exc:
        raise EvalError(f"--prm {exc}") from None
    try:
        check_output_path(args.report)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    unknown = [a for a in getattr(args, "aggregate", []) if a not in AGGREGATIONS]
    if unknown:
        raise EvalError(f"unknown aggregation(s) {unknown}; choose from {sorted(AGGREGATIONS)}")
    if getattr(args, "image_root", None) is not None and not args.image_root.is_dir():
        raise EvalError(f"--image-root {args.image_root} is not a folder")
    args.device = resolve_device(args.device)


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        return args.func(args)
    except (EvalError, DataError, OutputError, RayConnectError) as exc:
        raise SystemExit(f"mmprm eval {args.benchmark}: {exc}") from None
