"""Where one fast-engine call spends its time: torch.profiler, op by op, with share and achieved rate.

    python -m bench.profile --workload W1 --dtype float32
    python -m bench.profile --workload W1 --dtype bfloat16 --markdown
    python -m bench.profile --workload W3 --dtype bfloat16 --markdown
    python -m bench.profile --workload W1 --dtype float32 --unfused     # before fusion: transformers' modules

Loads the workload's cached checkpoint and inputs exactly as ``bench.run``
does, runs ``--warmup`` untimed fast-engine calls, then profiles one call.
Each row is one operator (self CPU time, so nested ops are not counted
twice) with its share of the call's wall time and the rate it achieved:
GFLOP/s for matrix products and attention (FLOPs from the recorded input
shapes), otherwise G elements/s of its largest input.  "python + other" is
the wall time no operator accounts for (the interpreter, module dispatch,
allocation between ops).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.profiler import ProfilerActivity, profile

from bench import workloads
from bench.run import REPO, _load


def _numel(shape) -> int:
    n = 1
    for s in shape or ():
        n *= s
    return n


def _gemm_flops(name: str, shapes: list) -> int | None:
    """FLOPs of a matrix product or attention op from its input shapes; None for other ops."""
    shapes = [s for s in shapes if isinstance(s, (list, tuple))]
    try:
        if name in ("aten::mm", "aten::matmul") and len(shapes) >= 2:
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
            return 2 * a[0] * a[1] * a[2] * b[2]
        if name == "mkldnn::_linear_pointwise":  # x [.., K], packed weight [N, K]
            x, w = shapes[0], shapes[1]
            return 2 * _numel(x[:-1]) * x[-1] * w[0]
        if "scaled_dot_product" in name or "flash_attention" in name:
            q, k = shapes[0], shapes[1]  # [B, H, L, D], [B, H, S, D]; causal counted in full
            return 4 * _numel(q[:-1]) * k[-2] * q[-1]
    except (IndexError, ValueError, TypeError):
        return None
    return None


def op_table(prof, wall_s: float) -> list[dict]:
    """Rows (op, calls, self seconds, share of wall, rate) sorted by time, plus the unaccounted rest."""
    acc: dict[str, dict] = defaultdict(lambda: {"calls": 0, "self_s": 0.0, "flops": 0, "elems": 0, "gemm": False})
    for evt in prof.events():
        row = acc[evt.name]
        row["calls"] += 1
        row["self_s"] += evt.self_cpu_time_total / 1e6
        flops = _gemm_flops(evt.name, evt.input_shapes)
        if flops is not None:
            row["flops"] += flops
            row["gemm"] = True
        else:
            row["elems"] += max((_numel(s) for s in evt.input_shapes if isinstance(s, (list, tuple))), default=0)
    rows = []
    for name, r in acc.items():
        if r["self_s"] <= 0:
            continue
        rate = (f"{r['flops'] / r['self_s'] / 1e9:.0f} GFLOP/s" if r["gemm"]
                else f"{r['elems'] / r['self_s'] / 1e9:.2f} Gelem/s" if r["elems"] else "-")
        rows.append({"op": name, "calls": r["calls"], "self_s": r["self_s"], "share": r["self_s"] / wall_s,
                     "rate": rate, "gemm": r["gemm"], "flops": r["flops"]})
    rows.sort(key=lambda r: -r["self_s"])
    rest = wall_s - sum(r["self_s"] for r in rows)
    rows.append({"op": "python + other (unaccounted)", "calls": "", "self_s": rest, "share": rest / wall_s,
                 "rate": "", "gemm": False, "flops": 0})
    return rows


def _category(op: str) -> str:
    if op.startswith("python"):
        return "python + other"
    if "linear" in op or op in ("aten::mm", "aten::addmm"):
        return "linear layers (GEMM)"
    if "attention" in op or op in ("aten::bmm", "aten::baddbmm", "mmprm::shared_prefix_attention"):
        return "attention"
    if any(s in op for s in ("copy", "clone", "contiguous", "cat", "index", "empty", "to", "stack")):
        return "copies, indexing, allocation"
    return "elementwise (norms, RoPE, activations, adds)"


def format_table(rows: list[dict], wall_s: float, top: int, markdown: bool) -> str:
    lines = []
    if markdown:
        lines += ["| op | calls | self ms | share | rate |", "|---|---|---|---|---|"]
    for r in rows[:top] + ([rows[-1]] if len(rows) > top else []):
        cells = (r["op"], str(r["calls"]), f"{r['self_s'] * 1e3:.1f}", f"{100 * r['share']:.1f} %", r["rate"])
        lines.append("| " + " | ".join(cells) + " |" if markdown else
                     f"{cells[0][:48]:<48} {cells[1]:>6} {cells[2]:>9} {cells[3]:>8}  {cells[4]}")
    by_cat: dict[str, float] = defaultdict(float)
    for r in rows:
        by_cat[_category(r["op"])] += r["self_s"]
    lines.append("")
    lines.append("by kind: " + ", ".join(f"{k} {100 * v / wall_s:.0f} %"
                                         for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])))
    gemm_flops = sum(r["flops"] for r in rows if r["gemm"])
    gemm_s = sum(r["self_s"] for r in rows if r["gemm"])
    if gemm_s:
        lines.append(f"matrix products and attention: {gemm_flops / 1e9:.1f} GFLOP in {gemm_s * 1e3:.0f} ms "
                     f"({gemm_flops / gemm_s / 1e9:.0f} GFLOP/s), {100 * gemm_s / wall_s:.0f} % of the call")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=("W1", "W3"), default="W1")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=20, help="rows to print (the rest is summed by kind)")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--unfused", action="store_true",
                   help="the decoder through transformers' modules (FastEngine(fused=False)): before fusion")
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench" / ".cache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = workloads.base_workloads(args.workload, quick=False)[0]
    prm = _load(base, args.cache_dir, args.dtype)[0]
    inputs = workloads.make_inputs(prm, base)
    if args.unfused:
        prm.engine("fast").fused = False

    def call():
        return prm.score(inputs.question, inputs.candidates, engine="fast")

    for _ in range(args.warmup):
        call()
    load = os.getloadavg()[0]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
    rows = op_table(prof, wall)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    print(f"{args.workload} {args.dtype}, one fast-engine call under the profiler: {wall:.3f} s wall; {cpu}, "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, load average {load:.2f}; "
          f"linear path {prm.engine('fast').linear_path(prm.adapter)}, "
          f"{'transformers modules' if args.unfused else 'fused layers'}")
    print(format_table(rows, wall, args.top, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
