"""Measurements: wall time, peak RSS increase, FLOPs of the unique tokens, matmul rate.

Memory.  torch's CPU allocations do not show in tracemalloc, so the peak is
read from the kernel: before each call the process' high-water mark is reset
(``echo 5 > /proc/<pid>/clear_refs`` sets VmHWM to the current VmRSS) and
after the call ``VmHWM - VmRSS(before)`` is the call's peak RSS increase.
glibc keeps freed memory, which would hide a later call's allocations, so
``malloc_trim(0)`` runs first.  If clear_refs is not writable a sampling
thread reads VmRSS every 2 ms instead (the report says which method ran).
The same works for another process (vLLM's engine core) by pid.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# ---------------------------------------------------------------------------
# memory


def _status_kb(pid: int | str, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _reset_hwm(pid: int | str) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_libc = None


def release_free_memory() -> None:
    """Garbage-collect and hand glibc's free pages back, so RSS(before) is not inflated."""
    global _libc
    gc.collect()
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (scan of /proc; vLLM's engine core and its workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


class PeakRSS:
    """Peak RSS increase (MB) of ``pids`` (summed) over a with-block."""

    def __init__(self, pids: Sequence[int | str] = ("self",), interval: float = 0.002):
        self.pids = list(pids)
        self.interval = interval
        self.method = ""
        self.peak_mb: float | None = None

    def __enter__(self):
        if self.pids == ["self"]:
            release_free_memory()
        self.before = {p: _status_kb(p, "VmRSS") or 0 for p in self.pids}
        if all(_reset_hwm(p) for p in self.pids):
            self.method = "VmHWM after clear_refs reset"
            self._thread = None
        else:
            self.method = f"VmRSS sampled every {self.interval * 1000:.0f} ms"
            self._stop = threading.Event()
            self._max = dict(self.before)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            for p in self.pids:
                self._max[p] = max(self._max[p], _status_kb(p, "VmRSS") or 0)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self._thread is None:
            peak = {p: _status_kb(p, "VmHWM") or 0 for p in self.pids}
        else:
            self._stop.set()
            self._thread.join()
            for p in self.pids:
                self._max[p] = max(self._max[p], _status_kb(p, "VmRSS") or 0)
            peak = self._max
        self.peak_mb = sum(max(0, peak[p] - self.before[p]) for p in self.pids) / 1024
        return False


# ---------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)  # timed calls
    peak_mb: list[float] = field(default_factory=list)  # timed calls
    warmup_peak_mb: list[float] = field(default_factory=list)  # warm-up calls (first touch, lazy init)
    warmup_times: list[float] = field(default_factory=list)  # warm-up calls' wall seconds
    memory_method: str = ""
    result: object = None
    floor_rates: list[float] = field(default_factory=list)  # the floor's GEMM rate (FLOP/s) after each timed call

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def floor_rate(self) -> float | None:
        """The best GEMM rate the floor's path reached beside this engine's calls (None: no probe ran)."""
        return max(self.floor_rates) if self.floor_rates else None


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1,
              memory_pids: Callable[[], Sequence[int | str]] | None = None,
              before: Callable[[], object] | None = None, probe: FloorProbe | None = None) -> Timing:
    """``warmup`` untimed calls, then ``repeats`` timed ones; the peak RSS increase of every call.
    ``before`` runs ahead of every call, untimed (e.g. emptying a cache the previous call filled).  With
    ``probe``, the floor's GEMM rate is measured right after every timed call, so an engine's time and the
    floor it is judged by see the machine in the same state (a busy machine slows both)."""
    out = Timing()
    for i in range(warmup + repeats):
        if before is not None:
            before()
        pids = memory_pids() if memory_pids else ["self"]
        with PeakRSS(pids) as mem:
            t0 = time.perf_counter()
            out.result = fn()
            dt = time.perf_counter() - t0
        out.memory_method = mem.method
        if i >= warmup:
            out.times.append(dt)
            out.peak_mb.append(mem.peak_mb)
            if probe is not None:
                out.floor_rates.append(probe.rate())
        else:
            out.warmup_peak_mb.append(mem.peak_mb)
            out.warmup_times.append(dt)
    return out


# ---------------------------------------------------------------------------
# FLOPs of the unique tokens


def text_flops(cfg, prefix: int, suffixes: Sequence[int], markers: int) -> dict:
    """Multiply-add FLOPs (2 per MAC) a prefix-sharing engine cannot avoid, for a Qwen2/Llama decoder.

    Per layer and token: q/k/v/o projections and the gated MLP (3 matrices);
    attention scores + weighted values, 2 * 2 * L * heads * head_dim for a
    token seeing L keys: prefix token i sees i + 1 keys (causal), suffix token
    j of a candidate sees prefix + j + 1 keys.  Plus the reward readout: one
    d-vector dot (W[good] - W[bad]) per marker.  Norms, RoPE, activations and
    softmax (O(d) per token) are left out, as is the LM head over the vocabulary
    (a PRM only needs two of its rows).
    """
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    inter = cfg.intermediate_size
    layers = cfg.num_hidden_layers
    tokens = prefix + sum(suffixes)
    linear_per_token = 2 * h * (heads * d + 2 * kv * d) + 2 * heads * d * h + 3 * 2 * h * inter
    keys = prefix * (prefix + 1) // 2  # sum over prefix tokens of keys seen
    for s in suffixes:
        keys += s * prefix + s * (s + 1) // 2
    attention = 4 * heads * d * keys
    linear = linear_per_token * tokens
    readout = 2 * h * markers
    # The fast engine's last layer: K/V projections for every token, the rest for the markers only
    # (each marker attending to at most prefix + its candidate's suffix keys).
    kv_per_token = 2 * h * 2 * kv * d
    last_at_markers = kv_per_token * tokens + (linear_per_token - kv_per_token) * markers + \
        4 * heads * d * markers * (prefix + max(suffixes, default=0))
    return {
        "tokens": tokens,
        "linear": layers * linear,
        "attention": layers * attention,
        "readout": readout,
        "total": layers * (linear + attention) + readout,
        # the same with the last layer computed at the markers only (what the fast engine does)
        "total_last_layer_at_markers": (layers - 1) * (linear + attention) + last_at_markers + readout,
    }


_CPU_SDPA_REGISTERED = False


def _register_cpu_sdpa() -> None:
    """FlopCounterMode counts the CUDA SDPA kernels but not the CPU flash kernel: count it the same way
    (full, non-causal q x k: right for the vision tower's bidirectional attention)."""
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    import torch.utils.flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op.default not in fc.flop_registry:
        fc.register_flop_formula(op)(
            lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v))
    _CPU_SDPA_REGISTERED = True


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch's FlopCounterMode sees for ``fn`` (used for the vision tower, run once per question):
    matmuls, convolutions and attention; elementwise ops are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------
# matmul rate


def linear_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) of every Linear in one decoder layer."""
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    inter = cfg.intermediate_size
    return [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, inter), (h, inter), (inter, h)]


def _gemm_inputs(cfg, rows: int, dtype):
    """A seeded generator, the model's linear shapes, one input per in-dimension, FLOPs of one pass."""
    gen = torch.Generator().manual_seed(0)
    shapes = linear_shapes(cfg)
    x = {k: torch.randn(rows, k, generator=gen, dtype=dtype) for k in {k for k, _ in shapes}}
    return gen, shapes, x, sum(2 * rows * k * n for k, n in shapes)


TORCH_PATH = "torch F.linear"
ONEDNN_PREPACKED_PATH = "oneDNN prepacked (torch.utils.mkldnn)"
PACKED_PATH = "oneDNN packed linear (fast engine)"


def gemm_pass(path: str, cfg, rows: int, dtype=torch.float32) -> tuple[Callable[[], None], int, list]:
    """(one pass, its FLOPs, the shapes) for GEMM ``path`` on the model's linear shapes with ``rows`` tokens:
    every linear of one decoder layer once.

    ``TORCH_PATH``: ``F.linear``, as nn.Linear runs (torch's default path).  ``ONEDNN_PREPACKED_PATH``: oneDNN
    with weights packed once (``torch.utils.mkldnn``, the path vLLM's CPU build takes; fp32); input and output
    stay dense tensors, as a model's would.  ``PACKED_PATH``: the fast engine's packed path
    (``linear_paths.packed_linear``: oneDNN's linear on weights reordered once for ``rows``)."""
    gen, shapes, x, flops = _gemm_inputs(cfg, rows, dtype)
    if path == TORCH_PATH:
        ws = [torch.randn(n, k, generator=gen, dtype=dtype) for k, n in shapes]

        def one_pass():
            for (k, _), w in zip(shapes, ws):
                torch.nn.functional.linear(x[k], w)
    elif path == ONEDNN_PREPACKED_PATH:
        from torch.utils import mkldnn as mkldnn_utils

        layers = []
        for k, n in shapes:
            lin = torch.nn.Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=gen))
            layers.append((k, mkldnn_utils.to_mkldnn(lin)))

        def one_pass():
            for k, lin in layers:
                lin(x[k])
    elif path == PACKED_PATH:
        from mmprm_infer.engines import linear_paths

        packed = [linear_paths.pack_weight(torch.randn(n, k, generator=gen, dtype=dtype), rows) for k, n in shapes]

        def one_pass():
            for (k, _), w in zip(shapes, packed):
                linear_paths.packed_linear(x[k], w, None)
    else:
        raise ValueError(f"unknown GEMM path {path!r}")
    return one_pass, flops, shapes


def matmul_rate(cfg, rows: int, repeats: int = 5, dtype=torch.float32, path: str = TORCH_PATH) -> dict:
    """GEMM rate (FLOP/s, ``dtype``) of ``path`` (``gemm_pass``) on the model's linear shapes with ``rows``
    tokens, best of at least ``repeats`` passes, with torch's current thread count."""
    one_pass, flops, shapes = gemm_pass(path, cfg, rows, dtype)
    return _best_pass(one_pass, flops, rows, shapes, repeats)


def matmul_rate_onednn(cfg, rows: int, repeats: int = 5) -> dict:
    return matmul_rate(cfg, rows, repeats, torch.float32, ONEDNN_PREPACKED_PATH)


def matmul_rate_packed(cfg, rows: int, repeats: int = 5, dtype=torch.float32) -> dict:
    return matmul_rate(cfg, rows, repeats, dtype, PACKED_PATH)


def best_matmul_rate(cfg, rows: int, repeats: int = 5, dtype=torch.float32) -> dict:
    """The fastest GEMM path this machine has for the model's linear shapes in ``dtype``: torch's
    default (``F.linear``; in bf16 it runs oneDNN's avx512_bf16 kernels where the CPU has them) and, in
    fp32, oneDNN with prepacked weights where torch was built with it.  Returns the best path's
    ``matmul_rate`` dict with ``paths`` (every path's result) and ``best_path``."""
    from mmprm_infer.engines import linear_paths

    paths = {TORCH_PATH: matmul_rate(cfg, rows, repeats, dtype=dtype)}
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        paths[ONEDNN_PREPACKED_PATH] = matmul_rate_onednn(cfg, rows, repeats)
    if linear_paths.onednn_available(dtype):
        paths[PACKED_PATH] = matmul_rate_packed(cfg, rows, repeats, dtype=dtype)
    best = max(paths, key=lambda name: paths[name]["flop_per_s"])
    return {**paths[best], "best_path": best, "paths": paths}


class FloorProbe:
    """The floor's GEMM path, kept ready to be timed beside each engine's calls (``time_call(probe=...)``):
    ``rate()`` runs ``passes`` passes and returns the best pass's FLOP/s.  The floor an engine is judged by
    is then measured under the load the engine saw, not once at the start of the run."""

    def __init__(self, path: str, cfg, rows: int, dtype=torch.float32, passes: int = 3):
        self.path, self.passes = path, passes
        self.one_pass, self.flops, _ = gemm_pass(path, cfg, rows, dtype)
        self.rates: list[float] = []
        with torch.inference_mode():
            self.one_pass()  # warm-up

    def rate(self) -> float:
        with torch.inference_mode():
            best = float("inf")
            for _ in range(self.passes):
                t0 = time.perf_counter()
                self.one_pass()
                best = min(best, time.perf_counter() - t0)
        self.rates.append(self.flops / best)
        return self.rates[-1]


def _best_pass(one_pass, flops: int, rows: int, shapes, repeats: int) -> dict:
    with torch.inference_mode():
        one_pass()  # warm-up
        best, n, start = float("inf"), 0, time.perf_counter()
        # at least `repeats` passes, more (up to 200) while under 1 s: tiny shapes need many to find the best
        while n < repeats or (n < 200 and time.perf_counter() - start < 1.0):
            t0 = time.perf_counter()
            one_pass()
            best = min(best, time.perf_counter() - t0)
            n += 1
    return {"rows": rows, "flops_per_pass": flops, "best_pass_s": best, "passes": n, "flop_per_s": flops / best,
            "threads": torch.get_num_threads(), "shapes": shapes}
