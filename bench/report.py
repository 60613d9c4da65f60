"""Benchmark output: the printed table, target checks, JSON and the PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

ENGINES = ("reference", "fast", "vllm", "vllm_plugin", "floor")
# vllm_plugin: "vLLM + prefix reuse (plugin)", vLLM's STEP pooler with prefix caching read through the package's
# vLLM plugin (integrations/vllm_plugin); same engine settings and cores as the vllm column.
LABELS = {"vllm_plugin": "vllm+plugin"}

# The engine's targets, per workload and, where the dtype matters, per "workload dtype":
# (text, value, ">=" or "<=", threshold).  The one place they are defined: the run's output, `python -m
# bench.run --targets` and bench/README.md print them from here.
TARGETS = {
    "W1": [
        ("fast time / floor time", lambda e: _ratio(e, "fast", "floor"), "<=", 1.15),
        ("fast vs vLLM STEP pooler speedup", lambda e: _ratio(e, "vllm", "fast"), ">=", 5.0),
        ("fast vs reference speedup", lambda e: _ratio(e, "reference", "fast"), ">=", 10.0),
        ("fast / reference peak memory", lambda e: _mem_ratio(e), "<=", 0.3),
        # both GEMM-bound in fp32: the floor of the fast engine's own work allows about 1.5x
        ("fast vs vLLM + prefix reuse (plugin) speedup", lambda e: _ratio(e, "vllm_plugin", "fast"), ">=", 1.3),
    ],
    "W1 plugin": [  # judged at every dtype: the plugin makes vLLM faster (W1's unique tokens are 4.6x fewer)
        ("vLLM + prefix reuse (plugin) vs stock vLLM", lambda e: _ratio(e, "vllm", "vllm_plugin"), ">=", 3.5),
    ],
    "W1 bfloat16": [
        ("fast time / floor time (bf16 GEMM rate)", lambda e: _ratio(e, "fast", "floor"), "<=", 2.0),
        ("fast vs vLLM STEP pooler speedup (both bf16)", lambda e: _ratio(e, "vllm", "fast"), ">=", 8.0),
        ("fast vs vLLM + prefix reuse (plugin) speedup (both bf16)", lambda e: _ratio(e, "vllm_plugin", "fast"),
         ">=", 2.0),
    ],
    "W2": [
        ("fast vs reference speedup", lambda e: _ratio(e, "reference", "fast"), ">=", 10.0),
    ],
    "W3": [
        # vs vLLM where vLLM ran, else 4.5x the reference
        ("fast vs vLLM (or 4.5x reference if no vLLM)", lambda e: _w3_speedup(e), ">=", 4.0),
        ("fast time / floor time", lambda e: _ratio(e, "fast", "floor"), "<=", 1.3),
    ],
    "W3 bfloat16": [
        ("fast vs vLLM STEP pooler speedup (both bf16)", lambda e: _ratio(e, "vllm", "fast"), ">=", 5.0),
    ],
}


def targets_markdown() -> str:
    """The TARGETS table as bench/README.md shows it."""
    rows = ["| workload | dtype | target |", "|---|---|---|"]
    for key, targets in TARGETS.items():
        name, _, dtype = key.partition(" ")
        dtype = {"": "float32", "plugin": "any"}.get(dtype, dtype)
        rows += [f"| {name} | {dtype} | {text} {op} {threshold:g} |" for text, _, op, threshold in targets]
    return "\n".join(rows)


def _seconds(engines: dict, name: str):
    e = engines.get(name) or {}
    return e.get("seconds") if e.get("status") == "ok" else None


def _ratio(engines: dict, slow: str, fast: str):
    if fast == "floor" and (engines.get(slow) or {}).get("floor_seconds"):  # the floor measured beside it
        return engines[slow]["seconds"] / engines[slow]["floor_seconds"]
    a, b = _seconds(engines, slow), _seconds(engines, fast)
    return a / b if a and b else None


def _w3_speedup(engines: dict):
    vs_vllm = _ratio(engines, "vllm", "fast")
    if vs_vllm is not None:
        return vs_vllm
    vs_ref = _ratio(engines, "reference", "fast")
    return None if vs_ref is None else vs_ref * 4.0 / 4.5  # 4.5x the reference reads as 4.0 on this scale


def _mem_ratio(engines: dict):
    f, r = (engines.get("fast") or {}).get("peak_rss_mb"), (engines.get("reference") or {}).get("peak_rss_mb")
    return f / r if f is not None and r else None


def derive(point: dict) -> None:
    """Add speedups, floor ratios and the memory ratio to one point's engines.  An engine's ratio to the floor
    uses the floor measured beside its own calls (``floor_seconds``) where the run has it."""
    engines = point["engines"]
    for name in ENGINES:
        e = engines.setdefault(name, {"status": "skipped", "reason": "not in this run"})
        if e.get("status") != "ok":
            continue
        e["speedup_vs_reference"] = _ratio(engines, "reference", name)
        e["speedup_vs_vllm"] = _ratio(engines, "vllm", name)
        e["speedup_vs_vllm_plugin"] = _ratio(engines, "vllm_plugin", name)
        e["ratio_to_floor"] = (e["seconds"] / e["floor_seconds"] if e.get("floor_seconds")
                               else _ratio(engines, name, "floor"))
    point["fast_over_reference_peak_rss"] = _mem_ratio(engines)


def format_targets() -> str:
    """Every target, as the run judges it (the text bench/README.md must state)."""
    lines = ["targets (bench/report.py TARGETS), judged on each workload's base point, fp32 unless named:"]
    for workload, targets in TARGETS.items():
        for text, _, op, threshold in targets:
            lines.append(f"  {workload:<12} {text} {op} {threshold:g}")
    lines.append("  every run    no engine faster than the floor of its own work measured beside it "
                 "(else the run is INVALID)")
    return "\n".join(lines)


def validity(point: dict, quick: bool = False) -> dict:
    """INVALID when an engine ran faster than the floor of its own work measured beside its calls: an
    engine cannot beat the machine's GEMM rate, so the load changed under the run or a FLOP count is wrong,
    and no target of the point can PASS.  Not judged in --quick mode (tiny shapes)."""
    if quick:
        return {"status": "not judged", "reason": "--quick (tiny shapes)", "beat_floor": []}
    beat = []
    for name, e in point["engines"].items():
        if name == "floor" or e.get("status") != "ok" or e.get("work_floor_seconds") is None:
            continue
        if e["seconds"] < e["work_floor_seconds"]:
            beat.append({"engine": name, "seconds": e["seconds"], "work_floor_seconds": e["work_floor_seconds"]})
    return {"status": "INVALID" if beat else "valid", "beat_floor": beat}


def check_targets(point: dict, dtype: str = "float32") -> list[dict]:
    name = point["workload"]["name"]
    invalid = (point.get("validity") or {}).get("status") == "INVALID"
    out = []
    targets = TARGETS.get(name if dtype == "float32" else f"{name} {dtype}", []) + TARGETS.get(f"{name} plugin", [])
    for text, value, op, threshold in targets:
        v = value(point["engines"])
        ok = v is not None and (v >= threshold if op == ">=" else v <= threshold)
        status = "n/a" if v is None else ("INVALID" if invalid else ("PASS" if ok else "FAIL"))
        out.append({"target": f"{text} {op} {threshold:g}", "value": v, "op": op, "threshold": threshold,
                    "status": status})
    return out


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _fmt(x, spec="{:.2f}", none="-"):
    return none if x is None else spec.format(x)


def format_point(point: dict, quick: bool) -> str:
    t = point["tokens"]
    w = point["workload"]
    lines = [
        "",
        f"== {point['title']}",
        f"   measured tokens: shared prefix {t['shared_prefix']}"
        + (f" (image {t['image_tokens']} + question {t['question_tokens']} + template)" if t["image_tokens"] else "")
        + f", suffix mean {t['suffix_mean']:.1f} x N={w['n_candidates']}, markers {sum(t['markers'])}, "
        f"unique {t['unique_tokens']} / total {t['total_tokens']} tokens; "
        f"floor FLOPs {_si(point['flops']['total'])}",
        f"   {'engine':<10} {'seconds':>9} {'vs ref':>8} {'vs vLLM':>8} {'/ floor':>8} {'peak MB':>9}  "
        f"{'max|diff| vs ref':>16}  threads; times",
    ]
    for name in ENGINES:
        e = point["engines"].get(name, {})
        label = LABELS.get(name, name)
        if e.get("status") != "ok":
            lines.append(f"   {label:<10} {'skipped' if e.get('status') == 'skipped' else 'error':>9}  "
                         f"({e.get('reason', '')})")
            continue
        mem = e.get("peak_rss_mb")
        mem_s = "-" if name == "floor" else ("n/a" if mem is None else f"{mem:.1f}")
        if name.startswith("vllm") and mem is not None:
            mem_s += "*"
        diff = e.get("max_abs_diff_vs_reference")
        times = " ".join(f"{x:.3f}" for x in e.get("times", []))
        lines.append(
            f"   {label:<10} {e['seconds']:>9.3f} {_fmt(e.get('speedup_vs_reference'), '{:.2f}x'):>8} "
            f"{_fmt(e.get('speedup_vs_vllm'), '{:.2f}x'):>8} {_fmt(e.get('ratio_to_floor'), '{:.2f}x'):>8} "
            f"{mem_s:>9}  {_fmt(diff, '{:.2e}'):>16}  {e.get('threads', '-')}; {times}"
        )
    for name in ENGINES:
        e = point["engines"].get(name, {})
        if "max_abs_diff_vs_fp32_reference" in e:
            lines.append(f"   {name:<10} vs the fp32 reference: max|diff| {e['max_abs_diff_vs_fp32_reference']:.2e}, "
                         f"best-of-N (min) {'same' if e['best_of_n_same_as_fp32'] else 'CHANGED'}, ranking "
                         f"{'same' if e['ranking_same_as_fp32'] else 'changed'}")
    for name in ("reference", "fast"):
        e = point["engines"][name]
        if e.get("status") == "ok" and e.get("warmup_s") is not None:
            steps = ", ".join(f"{k} {v:.2f} s" for k, v in (e.get("warmup_steps") or {}).items())
            first = e.get("first_call_s") or []
            lines.append(f"   {name:<10} one-time costs, not in the times above: warm-up {e['warmup_s']:.2f} s"
                         + (f" ({steps})" if steps else "")
                         + (f"; first untimed call after it {first[0]:.3f} s" if first else ""))
    plugin = point["engines"].get("vllm_plugin", {})
    if plugin.get("status") == "ok":
        lines.append(
            f"   vllm+plugin = vLLM + prefix reuse (plugin): computed {plugin.get('computed_tokens')} of "
            f"{plugin.get('prompt_tokens')} prompt tokens (the rest from the prefix cache); plugin vs stock vLLM "
            f"{_fmt(_ratio(point['engines'], 'vllm', 'vllm_plugin'), '{:.2f}x')}, fast vs plugin "
            f"{_fmt(_ratio(point['engines'], 'vllm_plugin', 'fast'), '{:.2f}x')}")
    floor, fast = point["engines"]["floor"], point["engines"]["fast"]
    if floor.get("seconds_last_layer_at_markers") and fast.get("status") == "ok":
        pruned = floor["seconds_last_layer_at_markers"]
        lines.append(f"   floor with the last layer at the markers only (the fast engine's work): {pruned:.3f} s; "
                     f"fast / that floor {fast['seconds'] / pruned:.2f}x")
    ratio = point.get("fast_over_reference_peak_rss")
    lines.append(f"   peak RSS increase fast / reference: {_fmt(ratio, '{:.3f}x')}"
                 + ("   (* vLLM: its engine processes' RSS increase, see JSON note)"
                    if point["engines"]["vllm"].get("peak_rss_mb") is not None else ""))
    v = point.get("validity") or {}
    for b in v.get("beat_floor", []):
        lines.append(f"   INVALID: {b['engine']} took {b['seconds']:.3f} s, under the floor of its own work measured "
                     f"beside its calls ({b['work_floor_seconds']:.3f} s): the machine's speed changed during the run "
                     "(or a FLOP count is wrong); rerun on an idle machine")
    if point.get("axis") == "base" and not quick:
        for c in point.get("targets", []):
            lines.append(f"   target {c['target']:<42} {c['status']:<4} (measured {_fmt(c['value'], '{:.3f}')})")
    elif point.get("axis") == "base":
        lines.append("   targets: not evaluated in --quick mode (tiny dims)")
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))


def plot(results: dict, path: Path) -> str:
    """Speedup vs N and vs P (sweeps), else seconds per engine; returns a status line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib, or pip install -e '.[bench]')"
    # the base point (e.g. W1 N=16 P=1000) belongs to both sweeps
    swept = [w for w in results["workloads"] if any(p["axis"] in ("N", "P") for p in w["points"])]
    sweeps = [p for w in swept[:1] for p in w["points"]]
    lines = [("fast", "fast vs reference", "o-"), ("vllm", "vLLM vs reference", "s--"),
             ("vllm_plugin", "vLLM + prefix reuse (plugin) vs reference", "d--"), ("floor", "floor vs reference", "k:")]
    if sweeps:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, axis, key in ((axes[0], "N", "n_candidates"), (axes[1], "P", "prompt_tokens")):
            pts = sorted((p for p in sweeps if p["axis"] in (axis, "base")), key=lambda p: p["workload"][key])
            xs = [p["workload"][key] for p in pts]
            for engine, label, style in lines:
                ys = [p["engines"].get(engine, {}).get("speedup_vs_reference") for p in pts]
                if any(y is not None for y in ys):
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=label)
            ys = [_ratio(p["engines"], "vllm", "fast") for p in pts]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], "^-.", label="fast vs vLLM")
            ax.set_xscale("log", base=2 if axis == "N" else 10)
            ax.set_yscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xlabel({"N": "N candidates (P fixed)", "P": "P prompt tokens (N fixed)"}[axis])
            ax.set_ylabel("speedup over the reference engine (x, log)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            base = pts[0]["workload"] if pts else {}
            fixed = f"P={base.get('prompt_tokens')}" if axis == "N" else f"N={base.get('n_candidates')}"
            ax.set_title(f"{base.get('name', '')}: speedup vs {axis} ({fixed}, S={base.get('suffix_tokens')})")
    else:
        base_pts = [p for w in results["workloads"] for p in w["points"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        ran = [e for e in ENGINES if any(p["engines"].get(e, {}).get("status") == "ok" for p in base_pts)]
        width = 0.8 / len(ran)
        for i, engine in enumerate(ran):  # an engine that did not run (vLLM skipped) gets no bar and no legend
            ys = [p["engines"].get(engine, {}).get("seconds") or 0 for p in base_pts]
            ax.bar([j + i * width for j in range(len(base_pts))], ys, width, label=LABELS.get(engine, engine))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(base_pts))], [p["workload"]["name"] for p in base_pts])
        ax.set_ylabel("seconds (best of k)")
        ax.legend(fontsize=8)
        ax.set_title("engine wall time")
    meta = results["meta"]
    fig.suptitle(f"mmprm-infer bench, {meta['threads']} threads, {meta['cpu']}; load avg at start "
                 f"{meta['loadavg_start'][0]:.2f}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"
