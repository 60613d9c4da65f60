"""Dataset-scale scoring on Ray: `mmprm score|rerank --ray [ADDRESS]`.

The input (JSONL or Parquet) is cut into the same windows as the
single-machine run (``mmprm_infer.io.records``): Ray Data streams the window
indices to a pool of PRM actors that read their windows (one per GPU, or CPU actors) scores each window
with the fast engine in one call, so a question and all its candidates stay
on one actor with their shared prefix, and the driver writes the results in
input order.  The engine calls are exactly the single-machine ones, so the
output file is identical to the one `mmprm score|rerank` writes without
``--ray``.

Faults: Ray Data restarts an actor that dies and retries its window; the
result of a window reaches the output once, whichever try produced it.

From Python::

    from mmprm_infer.integrations.ray_scoring import score_file
    score_file("cands.jsonl", "scores.jsonl", prm="ckpt/", command="rerank", address="auto")
"""

from __future__ import annotations

import pickle
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprm_infer.integrations.ray_cluster import (
    ACTOR_MAX_RESTARTS,
    ActorPlan,
    connect,
    data_context,
    map_to_actors,
    plan_actors,
)
from mmprm_infer.io.files import atomic_output, check_output_path
from mmprm_infer.io.progress import progress_bar
from mmprm_infer.io.records import (
    PRMSpec,
    ResultWriter,
    ScoringOptions,
    WindowResult,
    base_dir,
    finished,
    plan_windows,
    process_window,
    read_windows,
)

__all__ = ["PRMSpec", "RayJobError", "RayScoringStats", "score_file", "score_items", "ray_run_jsonl"]

MAX_BLOCKS = 4096


class RayJobError(RuntimeError):
    """The Ray job stopped (actors kept dying, a node was lost); nothing was written."""


@dataclass
class RayScoringStats:
    windows: int = 0
    questions: int = 0  # records written (results and error records)
    candidates: int = 0
    errors: int = 0  # error records (on_error="skip")
    actors: int = 0
    seconds: float = 0.0  # the whole job, actor start-up included
    first_window_s: float = 0.0  # until the first window came back (start-up + one window)

    @property
    def candidates_per_s(self) -> float:
        return self.candidates / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------
# Ray Data stages
# --------------------------------------------------------------------------
class _PRMActor:
    def __init__(self, spec: PRMSpec, device: str, threads: int):
        self.prm = spec.load(device, threads)


class WindowScorer(_PRMActor):
    """Reads and scores file windows: one result (or RecordError) per row.

    The actor reads its windows itself (a seek and a short read, or one Parquet
    row group): a separate Ray read stage would start extra worker processes
    for no gain, as the input must be on storage every node reads anyway, like
    the images it names."""

    def __init__(self, spec: PRMSpec, device: str, threads: int, options: ScoringOptions, path: str,
                 plan: list[int], window: int):
        super().__init__(spec, device, threads)
        self.options, self.path, self.plan, self.window = options, Path(path), plan, window

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"window": [], "result": []}
        for k in batch["window"]:
            (window,) = read_windows(self.path, self.plan, self.window, int(k), int(k) + 1)
            out["window"].append(int(k))
            out["result"].append(pickle.dumps(process_window(window, self.prm, self.options, base_dir(self.path))))
        return out


class ItemScorer(_PRMActor):
    """Scores in-memory ScoringItems, one ``PRM.score_batch`` call per window."""

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"window": [], "rewards": []}
        for k, payload in zip(batch["window"], batch["items"]):
            out["window"].append(int(k))
            out["rewards"].append(pickle.dumps(self.prm.score_batch(pickle.loads(payload))))
        return out


def _ordered_stream(ds, n_windows: int, progress: bool, desc: str):
    """Rows of ``ds`` in window order (Ray Data keeps order when asked), with a progress bar."""
    import ray  # ray: optional (the ray extra)

    seen = 0
    with progress_bar(total=n_windows, desc=desc, unit="window", disable=not progress) as bar:
        rows = iter(ds.iter_rows())
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except ray.exceptions.RayError as exc:  # Ray's own traceback is pages long: name the cause
                cause = str(exc).strip().splitlines()[0][:300]
                raise RayJobError(f"the Ray job failed after {seen} of {n_windows} windows: {type(exc).__name__}: "
                                  f"{cause} (an actor that dies loading the PRM, e.g. out of memory, is restarted "
                                  "a few times, then the job stops)") from exc
            if int(row["window"]) != seen:  # would mean a lost or repeated window
                raise RuntimeError(f"Ray returned window {row['window']} where window {seen} was due")
            seen += 1
            yield row, bar
            bar.update(1)
    if seen != n_windows:
        raise RuntimeError(f"Ray returned {seen} of {n_windows} windows")


def _start(address: str | None, actors: int | None, actor_cpus: int, actor_gpus: float, device: str,
           max_restarts: int = ACTOR_MAX_RESTARTS):
    """Join the cluster (ordered Ray Data) and plan the PRM actors; each CPU actor runs
    ``actor_cpus`` torch threads, so that must be a whole number."""
    if not isinstance(actor_cpus, int) or actor_cpus < 1:
        raise ValueError(f"--ray-actor-cpus must be >= 1, got {actor_cpus}")
    ray = connect(address)
    data_context(ray, preserve_order=True)
    return ray, plan_actors(actors, actor_cpus, actor_gpus, device, max_restarts)


def _prm_actors(ds, actor_cls, actor_plan: ActorPlan, threads: int, /, **constructor_kwargs):
    return map_to_actors(ds, actor_cls, actor_plan,
                         {**constructor_kwargs, "device": actor_plan.device, "threads": threads})


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------
def score_file(input: str | Path, output: str | Path, prm: str | PRMSpec, *, command: str = "score",
               aggregate: str = "min", strategy: str = "best_of_n", batch_questions: int = 8,
               on_error: str = "fail", max_errors: int | None = None, address: str | None = "auto",
               actors: int | None = None, actor_cpus: int = 1, actor_gpus: float = 1.0, device: str = "cpu",
               progress: bool = True, actor_max_restarts: int = ACTOR_MAX_RESTARTS,
               max_line_chars: int | None = None) -> RayScoringStats:
    """Score or rerank a JSONL/Parquet file on Ray; writes ``output`` in input order (error
    records with ``on_error="skip"``) and returns counts and timings.  ``output`` appears
    only when the run finishes (``mmprm_infer.io.files.atomic_output``)."""
    spec = prm if isinstance(prm, PRMSpec) else PRMSpec(str(prm))
    in_path = Path(input).resolve()
    if not in_path.exists():
        raise SystemExit(f"mmprm: input {in_path} does not exist")
    check_output_path(output, in_path if in_path.is_file() else None)
    if Path(spec.path).is_dir() and not (Path(spec.path) / "config.json").is_file():
        # checked here, not in every actor: a worker that cannot load the model would only be restarted
        raise ValueError(f"PRM {spec.path} is not a checkpoint folder (no config.json in it)")
    plan = plan_windows(in_path, batch_questions)
    n_windows = len(plan) - 1
    if n_windows == 0:  # an empty input: an empty output, no cluster needed
        with atomic_output(output):
            pass
        return RayScoringStats()
    ray, actor_plan = _start(address, actors, actor_cpus, actor_gpus, device, actor_max_restarts)
    options = ScoringOptions(command=command, aggregate=aggregate, strategy=strategy, engine=spec.engine,
                             max_line_chars=max_line_chars)
    # from_items, not ray.data.range: a range read needs a CPU slot, which a pool filling the cluster never frees
    # one block per window (up to a cap): windows are balanced over the actors and retried one by one;
    # from_items, not ray.data.range, whose read task needs a CPU that a pool filling the cluster never frees
    windows = ray.data.from_items([{"window": k} for k in range(n_windows)],
                                  override_num_blocks=max(1, min(n_windows, MAX_BLOCKS)))
    scored = _prm_actors(windows, WindowScorer, actor_plan, actor_cpus, spec=spec, options=options, path=str(in_path),
                         plan=plan, window=batch_questions)
    stats, start = RayScoringStats(windows=n_windows, actors=actor_plan.actors), time.perf_counter()
    with atomic_output(output) as dst:
        writer = ResultWriter(dst, on_error, max_errors=max_errors)
        for row, bar in _ordered_stream(scored, n_windows, progress, f"mmprm {command} (ray x{actor_plan.actors})"):
            done: WindowResult = pickle.loads(row["result"])
            writer.write(done.results)
            stats.candidates += done.candidates
            stats.first_window_s = stats.first_window_s or time.perf_counter() - start
            bar.set_postfix(questions=writer.written,
                            candidates_per_s=f"{stats.candidates / (time.perf_counter() - start):.1f}", refresh=False)
    stats.seconds, stats.questions, stats.errors = time.perf_counter() - start, writer.written, writer.errors
    return stats


def score_items(items: Sequence[Any], prm: str | PRMSpec, *, batch_questions: int = 8,
                address: str | None = "auto", actors: int | None = None, actor_cpus: int = 1,
                actor_gpus: float = 1.0, device: str = "cpu", progress: bool = True) -> list[list[list[float]]]:
    """``PRM.score_batch`` over many ScoringItems on Ray actors, ``batch_questions``
    items per call; same result, in the same order, as calling it window by window here."""
    spec = prm if isinstance(prm, PRMSpec) else PRMSpec(str(prm))
    items = list(items)
    if not items:
        return []
    ray, actor_plan = _start(address, actors, actor_cpus, actor_gpus, device)
    windows = [{"window": k, "items": pickle.dumps(items[s:s + batch_questions])}
               for k, s in enumerate(range(0, len(items), batch_questions))]
    ds = ray.data.from_items(windows, override_num_blocks=max(1, min(len(windows), MAX_BLOCKS)))
    scored = _prm_actors(ds, ItemScorer, actor_plan, actor_cpus, spec=spec)
    rewards: list[list[list[float]]] = []
    for row, _ in _ordered_stream(scored, len(windows), progress, f"score (ray x{actor_plan.actors})"):
        rewards.extend(pickle.loads(row["rewards"]))
    return rewards


def ray_run_jsonl(args) -> int:
    """`mmprm score|rerank --ray`: the CLI's options mapped onto ``score_file``."""
    if args.prm is None:
        raise SystemExit("mmprm: --ray needs --prm (majority_vote without a PRM needs no cluster)")
    spec = PRMSpec(args.prm, format=args.format, dtype=args.dtype, engine=args.engine, max_tiles=args.max_tiles)
    stats = score_file(args.data, args.output, spec, command=args.command, aggregate=args.aggregate,
                        strategy=getattr(args, "strategy", "best_of_n"), batch_questions=args.batch_questions,
                        on_error=args.on_error, max_errors=args.max_errors, address=args.ray,
                        actors=args.ray_actors, actor_cpus=args.ray_actor_cpus, actor_gpus=args.ray_actor_gpus,
                        device=args.device, progress=not args.no_progress, max_line_chars=args.max_line_chars)
    if not args.no_progress:
        print(f"mmprm: {stats.questions} records, {stats.candidates} candidates in {stats.seconds:.1f} s on "
              f"{stats.actors} actor(s): {stats.candidates_per_s:.1f} candidates/s", file=sys.stderr)
    status = finished(stats.errors, stats.questions, args.output)
    print(f"mmprm {args.command}: wrote {stats.questions} records to {args.output}", file=sys.stderr)
    return status
