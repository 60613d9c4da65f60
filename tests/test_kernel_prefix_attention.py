"""Shared-prefix attention: every backend against the float64 reference.

Triton runs compiled on CUDA, else on the CPU interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is first imported).
"""

import math

import pytest
import torch

ON_CUDA = torch.cuda.is_available()

from mmprm_infer.kernels import backends, triton_runtime  # noqa: E402
from mmprm_infer.kernels import prefix_attention as pa  # noqa: E402
from mmprm_infer.kernels.prefix_attention import flash_attn_ops, plan, torch_ops, triton_ops  # noqa: E402

TRITON_DEVICE = "cuda" if ON_CUDA else "cpu"
TRITON_READY = triton_runtime.triton is not None and (ON_CUDA or triton_runtime.interpreter_active())
if not TRITON_READY:  # a hard failure, not a skip: the Triton checks must run
    raise RuntimeError("Triton cannot run here: install triton, and on CPU set TRITON_INTERPRET=1 before triton is "
                       "imported (tests/conftest.py does)")

# (segment lengths, P, H, Hkv, D)
CASES = {
    "ragged_gqa_d40": ([5, 17, 1, 30], 20, 8, 2, 40),
    "mha_d72": ([9, 33], 50, 4, 4, 72),
    "n1": ([37], 64, 4, 2, 64),
    "all_s1": ([1, 1, 1], 10, 2, 1, 16),
    "p0": ([6, 20], 0, 4, 2, 32),
    "empty_segment_group3": ([3, 0, 11], 7, 6, 2, 24),
    "longish": ([200, 150, 130], 300, 8, 2, 64),
}


def make_inputs(name, dtype=torch.float32, layout="contiguous", device="cpu"):
    lens, p, h, hkv, d = CASES[name]
    gen = torch.Generator().manual_seed(sorted(CASES).index(name) + 1000 * (dtype == torch.bfloat16))
    t = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    if layout == "contiguous":
        q = torch.randn(t, h, d, generator=gen)
        ks, vs = torch.randn(2, t, hkv, d, generator=gen).unbind(0)
    elif layout == "head_major":  # [H, T, D] attention inputs seen as [T, H, D], as transformers passes them
        q = torch.randn(h, t, d, generator=gen).transpose(0, 1)
        ks, vs = torch.randn(2, hkv, t, d, generator=gen).transpose(1, 2).unbind(0)
    else:  # "qkv_slices": views into one fused qkv projection
        qkv = torch.randn(t, (h + 2 * hkv) * d, generator=gen)
        q = qkv[:, : h * d].view(t, h, d)
        ks = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
        vs = qkv[:, (h + hkv) * d :].view(t, hkv, d)
    kp, vp = torch.randn(2, p, hkv, d, generator=gen).unbind(0)
    tensors = [x.to(device=device, dtype=dtype) for x in (q, ks, vs, kp, vp)]
    return (*tensors, cu.to(device), d**-0.5)


def assert_close_rel(actual, expected, rel):
    """Elementwise closeness relative to the tensor's magnitude (outputs cross zero)."""
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(actual.double(), expected, rtol=rel, atol=rel * scale)


@pytest.fixture
def poison(monkeypatch):
    """Outputs start as NaN so any element a kernel forgets to write fails the comparison."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(backends, "empty", nan_empty)


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _attend(backend, *args):
    return pa.shared_prefix_attention(*args, backend=backend)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_matches_reference(name, poison):
    args = make_inputs(name)
    ref = _attend("reference", *args)
    out = _attend("torch", *args)
    assert out.dtype == torch.float32 and out.shape == args[0].shape
    assert_close_rel(out, ref, 1e-5)


@pytest.mark.parametrize("name", ["ragged_gqa_d40", "mha_d72", "p0"])
def test_torch_matmul_fallback_matches_reference(name, poison, monkeypatch):
    # the path taken where ATen has no CPU flash kernel
    monkeypatch.setattr(torch_ops, "cpu_flash_op", lambda: None)
    monkeypatch.setattr(torch_ops, "PREFIX_SCORE_BUDGET", 256)  # several prefix chunks
    args = make_inputs(name)
    assert_close_rel(_attend("torch", *args), _attend("reference", *args), 1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, poison, monkeypatch):
    if name == "longish" and not ON_CUDA:  # the interpreter pays per program: fewer, taller tiles
        monkeypatch.setattr(triton_ops, "BLOCK_M", 128)
    args = make_inputs(name, device=TRITON_DEVICE)
    out = _attend("triton", *args)
    assert out.dtype == torch.float32
    assert_close_rel(out, _attend("reference", *args), 1e-5)


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (128, 16)])
def test_triton_tile_shapes(block_m, block_n, poison, monkeypatch):
    # tiles smaller and larger than segments, and BLOCK_M not a multiple of G = 3
    monkeypatch.setattr(triton_ops, "BLOCK_M", block_m)
    monkeypatch.setattr(triton_ops, "BLOCK_N", block_n)
    for name in ("ragged_gqa_d40", "empty_segment_group3"):
        args = make_inputs(name, device=TRITON_DEVICE)
        assert_close_rel(_attend("triton", *args), _attend("reference", *args), 1e-5)


@pytest.mark.parametrize("layout", ["qkv_slices", "head_major"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_noncontiguous_views(backend, layout, poison):
    args = make_inputs("ragged_gqa_d40", layout=layout, device=_device(backend))
    assert not args[0].is_contiguous()
    assert_close_rel(_attend(backend, *args), _attend("reference", *args), 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["ragged_gqa_d40", "p0", "all_s1"])
def test_partials_and_merge(name, backend, poison):
    q, ks, vs, kp, vp, cu, scale = make_inputs(name, device=_device(backend))
    pre_ref = pa.prefix_partial(q, kp, vp, scale, backend="reference")
    suf_ref = pa.suffix_partial(q, ks, vs, cu, scale, backend="reference")
    pre = pa.prefix_partial(q, kp, vp, scale, backend=backend)
    suf = pa.suffix_partial(q, ks, vs, cu, scale, backend=backend)
    for got, want in zip((*pre, *suf), (*pre_ref, *suf_ref)):
        assert got.dtype == torch.float32
        if torch.isinf(want).all():  # P = 0: lse is -inf everywhere
            assert torch.equal(got, want)
        else:
            assert_close_rel(got, want, 1e-5)
    merged = pa.merge_partials(*pre, *suf, backend=backend)
    assert_close_rel(merged, _attend("reference", q, ks, vs, kp, vp, cu, scale), 1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_merge_handles_missing_keys(backend, poison):
    gen = torch.Generator().manual_seed(7)
    out1, out2 = torch.randn(2, 3, 2, 20, generator=gen).unbind(0)
    lse1 = torch.tensor([[-math.inf, 0.5], [-math.inf, 1.0], [2.0, -3.0]])
    lse2 = torch.tensor([[-math.inf, -math.inf], [0.3, 1.0], [2.0, 40.0]])
    dev = _device(backend)
    got = pa.merge_partials(out1.to(dev), lse1.to(dev), out2.to(dev), lse2.to(dev), backend=backend).cpu()
    assert torch.equal(got[0, 0], torch.zeros(20))  # no keys on either side
    torch.testing.assert_close(got[0, 1], out1[0, 1])  # only the first partial has keys
    torch.testing.assert_close(got[1, 0], out2[1, 0])
    torch.testing.assert_close(got[1, 1], (out1[1, 1] + out2[1, 1]) / 2)
    torch.testing.assert_close(got[2, 0], (out1[2, 0] + out2[2, 0]) / 2)
    torch.testing.assert_close(got[2, 1], out2[2, 1])  # weight e^-43 is below fp32 resolution


# Measured worst case over CASES, as the smallest ``rel`` assert_close_rel accepts (max |a - b| /
# (max |ref| + |ref|)): bf16 3.2e-3, fp16 4.4e-4, on both prefix paths (ATen's flash kernel, Hydragen's
# matmuls) -- the output's rounding (bf16 keeps 8 bits).  A path that ran the softmax and the merge in
# half precision needs bf16 3.7e-3 to 7.0e-3, fp16 3.9e-4 to 1.4e-3 on these cases
# (test_half_tolerance_catches_half_precision_softmax).
HALF_TOLERANCE = {torch.bfloat16: 5e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", sorted(HALF_TOLERANCE, key=str))
@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_half_precision_inputs(name, dtype, poison):
    args = make_inputs(name, dtype=dtype)
    out = _attend("torch", *args)
    assert out.dtype == dtype
    assert_close_rel(out, _attend("reference", *args), HALF_TOLERANCE[dtype])


def test_half_tolerance_catches_half_precision_softmax(monkeypatch):
    """The tolerances above fail a path that ran the partials and the merge in the inputs' half
    precision instead of fp32 (it fails 4 of these 6 cases in bf16, 3 in fp16)."""
    monkeypatch.setattr(torch_ops, "compute_dtype", lambda dtype: dtype)
    monkeypatch.setattr(torch_ops, "cpu_flash_op", lambda: None)  # the matmul path, which honours compute_dtype
    for dtype, tol in HALF_TOLERANCE.items():
        failed = []
        for name in sorted(set(CASES) - {"longish"}):  # longish left out for time
            args = make_inputs(name, dtype=dtype)
            try:
                assert_close_rel(_attend("torch", *args), _attend("reference", *args), tol)
            except AssertionError:
                failed.append(name)
        assert failed, f"{dtype}: half-precision softmax passed every case"


# Triton with half-precision inputs on the CPU interpreter: the kernels upcast there (``_upcast``) and
# only the output is rounded to the input dtype; measured worst case over CASES (longish left out for
# time), in assert_close_rel's terms: bf16 3.4e-3, fp16 2.1e-4.
INTERPRETER_HALF_TOLERANCE = {torch.bfloat16: 7e-3, torch.float16: 5e-4}


@pytest.mark.skipif(ON_CUDA, reason="the interpreter's upcast path; on CUDA test_triton_half_precision_compiled runs")
@pytest.mark.parametrize("dtype", sorted(INTERPRETER_HALF_TOLERANCE, key=str), ids=str)
@pytest.mark.parametrize("name", sorted(set(CASES) - {"longish"}))
def test_triton_half_precision_interpreter(name, dtype, poison):
    args = make_inputs(name, dtype=dtype)
    out = _attend("triton", *args)
    assert out.dtype == dtype
    assert_close_rel(out, _attend("reference", *args), INTERPRETER_HALF_TOLERANCE[dtype])


# Compiled on CUDA, half-precision inputs run half-precision tl.dot (fp32 accumulation) and the softmax
# weights are rounded to the input dtype before the PV product, as flash-attn does: one rounding more
# than the CPU paths above.  NOT YET MEASURED on a GPU (none in the session that wrote these tests):
# about 3x the CPU measurement for now; re-measure on the first GPU run and record the value here.
GPU_HALF_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _cuda_inputs(name, dtype):
    q, ks, vs, kp, vp, cu, scale = make_inputs(name, dtype=dtype, device="cuda")
    return q, ks, vs, kp, vp, cu.tolist(), scale


def _reference_on_cpu(args):
    q, ks, vs, kp, vp, cu, scale = args
    return _attend("reference", q.cpu(), ks.cpu(), vs.cpu(), kp.cpu(), vp.cpu(), cu, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(GPU_HALF_TOLERANCE, key=str), ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_half_precision_compiled(name, dtype, poison):
    args = _cuda_inputs(name, dtype)
    assert not triton_ops._upcast(args[0])  # the half-precision tl.dot path
    out = _attend("triton", *args)
    assert out.dtype == dtype and out.is_cuda
    assert_close_rel(out.cpu(), _reference_on_cpu(args), GPU_HALF_TOLERANCE[dtype])


def _flash_attn_or_skip():
    if flash_attn_ops.varlen_func() is None:
        pytest.skip("flash-attn is not installed (pip install -e '.[gpu]')")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(GPU_HALF_TOLERANCE, key=str), ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_attn_matches_reference(name, dtype, poison):
    _flash_attn_or_skip()
    args = _cuda_inputs(name, dtype)
    out = _attend("flash_attn", *args)
    assert out.dtype == dtype and out.is_cuda
    assert_close_rel(out.cpu(), _reference_on_cpu(args), GPU_HALF_TOLERANCE[dtype])
    q = args[0]
    assert plan.resolve_backend("auto", q.device, q.dtype, q.shape[2]) == "flash_attn"  # auto: flash-attn in half


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ragged_gqa_d40", "p0", "all_s1"])
def test_flash_attn_partials(name, poison):
    """flash-attn's partials (out, lse) against the reference partials of the same bf16 inputs."""
    _flash_attn_or_skip()
    q, ks, vs, kp, vp, cu, scale = _cuda_inputs(name, torch.bfloat16)
    cpu = [x.cpu() for x in (q, ks, vs, kp, vp)]
    got = (*pa.prefix_partial(q, kp, vp, scale, backend="flash_attn"),
           *pa.suffix_partial(q, ks, vs, cu, scale, backend="flash_attn"))
    want = (*pa.prefix_partial(cpu[0], cpu[3], cpu[4], scale, backend="reference"),
            *pa.suffix_partial(cpu[0], cpu[1], cpu[2], cu, scale, backend="reference"))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        if torch.isinf(w).all():  # P = 0: lse is -inf everywhere
            assert torch.equal(g.cpu(), w)
        else:
            assert_close_rel(g.cpu(), w, GPU_HALF_TOLERANCE[torch.bfloat16])


def test_cpu_flash_runs_half_precision_as_given(monkeypatch):
    """bf16 attention on CPU stays bf16 inside ATen's flash op (its matrix units; fp32 accumulation) instead
    of being upcast to fp32 first; fp32 stays fp32."""
    assert torch_ops.use_cpu_flash(torch.zeros(1))  # the torch the project pins has ATen's CPU flash op
    seen = []
    op = torch_ops.cpu_flash_op()
    monkeypatch.setattr(torch_ops, "cpu_flash_op", lambda: lambda q, *a, **k: seen.append(q.dtype) or op(q, *a, **k))
    for dtype in (torch.bfloat16, torch.float32):
        seen.clear()
        _attend("torch", *make_inputs("ragged_gqa_d40", dtype=dtype))
        assert seen and set(seen) == {dtype}


def test_cu_seqlens_as_list_and_int64(poison):
    q, ks, vs, kp, vp, cu, scale = make_inputs("ragged_gqa_d40")
    ref = _attend("torch", q, ks, vs, kp, vp, cu, scale)
    for cu_alt in (cu.tolist(), cu.long()):
        assert torch.equal(_attend("torch", q, ks, vs, kp, vp, cu_alt, scale), ref)


def test_auto_on_cpu_is_torch():
    args = make_inputs("n1")
    assert torch.equal(_attend("auto", *args), _attend("torch", *args))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "q": a["q"][:, :, :-1]}, "head dim"),
        (lambda a: {**a, "k_suffix": a["k_suffix"][:, :1].repeat(1, 3, 1),
                    "v_suffix": a["v_suffix"][:, :1].repeat(1, 3, 1)}, "multiple of kv heads"),
        (lambda a: {**a, "v_suffix": a["v_suffix"][:-1]}, "equal shapes"),
        (lambda a: {**a, "k_suffix": a["k_suffix"][:-1], "v_suffix": a["v_suffix"][:-1]}, "k_suffix has"),
        (lambda a: {**a, "cu_seqlens": a["cu_seqlens"] + 1}, "start at 0"),
        (lambda a: {**a, "cu_seqlens": a["cu_seqlens"][:-1]}, "must equal the number of packed"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 30, 20, 53])}, "non-decreasing"),
        (lambda a: {**a, "k_prefix": a["k_prefix"].double(), "v_prefix": a["v_prefix"].double()}, "one floating dtype"),
        (lambda a: {**a, "backend": "cuda"}, "unknown backend"),
    ],
)
def test_bad_arguments_raise(mutate, message):
    q, ks, vs, kp, vp, cu, scale = make_inputs("ragged_gqa_d40")
    args = dict(q=q, k_suffix=ks, v_suffix=vs, k_prefix=kp, v_prefix=vp, cu_seqlens=cu, scale=scale)
    with pytest.raises(ValueError, match=message):
        pa.shared_prefix_attention(**mutate(args))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(triton_runtime, "interpreter_active", lambda: False)
    args = make_inputs("n1")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _attend("triton", *args)



# --- query rows only (the last decoder layer at the reward markers) -------------------------

def _marker_rows(lens, seed):
    """Ascending packed rows: each segment's last row and a random half of the others."""
    gen = torch.Generator().manual_seed(seed)
    rows, start = [], 0
    for n in lens:
        rows += [start + i for i in range(n) if i == n - 1 or torch.rand(1, generator=gen).item() < 0.5]
        start += n
    return rows


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_rows_attention_equals_full_attention_at_those_rows(name, backend, poison, monkeypatch):
    q, ks, vs, kp, vp, cu, scale = make_inputs(name)
    rows = _marker_rows(CASES[name][0], seed=len(name))
    expected = pa.shared_prefix_attention(q, ks, vs, kp, vp, cu, scale, backend="reference")[rows]
    monkeypatch.setattr(torch_ops, "PREFIX_SCORE_BUDGET", 1 << 10)  # several row chunks on the larger cases
    got = pa.shared_prefix_attention_rows(q[rows], rows, ks, vs, kp, vp, cu, scale, backend=backend)
    assert got.shape == (len(rows), *q.shape[1:])
    assert_close_rel(got, expected, 1e-5)


def test_rows_attention_no_rows_and_bad_rows():
    q, ks, vs, kp, vp, cu, scale = make_inputs("ragged_gqa_d40")
    empty = pa.shared_prefix_attention_rows(q[:0], [], ks, vs, kp, vp, cu, scale)
    assert empty.shape == (0, *q.shape[1:])
    with pytest.raises(ValueError, match="rows has 1 entries but q_rows has 2"):
        pa.shared_prefix_attention_rows(q[:2], [0], ks, vs, kp, vp, cu, scale)
    with pytest.raises(ValueError, match=r"query row 53 lies outside the packed suffixes \[0, 53\)"):
        pa.shared_prefix_attention_rows(q[:1], [53], ks, vs, kp, vp, cu, scale)


# --- plan once, run per layer -----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_a_plan_runs_every_layer_like_the_one_shot_call(backend, poison):
    """One plan, two "layers" with different tensors: each run equals the one-shot function."""
    q, ks, vs, kp, vp, cu, scale = make_inputs("ragged_gqa_d40", device=_device(backend))
    planned = pa.plan_attention(cu, q.shape[0], device=q.device, dtype=q.dtype, head_dim=q.shape[2], backend=backend)
    assert planned.backend == backend and planned.cu == cu.tolist()
    for layer in range(2):
        args = [x * (1 + layer) for x in (q, ks, vs, kp, vp)]
        assert_close_rel(planned.run(*args, scale), _attend(backend, *args[:3], *args[3:], cu, scale), 1e-6)


def test_plan_checks_offsets_and_rows_once():
    with pytest.raises(ValueError, match="must equal the number of packed"):
        pa.plan_attention([0, 3, 9], 10, device="cpu")
    with pytest.raises(ValueError, match="non-decreasing"):
        pa.plan_attention([0, 5, 3, 10], 10, device="cpu")
    with pytest.raises(ValueError, match=r"query row 10 lies outside the packed suffixes \[0, 10\)"):
        pa.plan_attention([0, 4, 10], 10, device="cpu", rows=[3, 10])
    with pytest.raises(ValueError, match="unknown prefix path"):
        pa.plan_attention([0, 10], 10, device="cpu", prefix_path="cuda")
    planned = pa.plan_attention(torch.tensor([0, 4, 10]), 10, device="cpu", rows=[3, 9])
    assert (planned.rows, planned.starts) == ([3, 9], [0, 4])
    with pytest.raises(ValueError, match="made without rows"):
        pa.plan_attention([0, 10], 10, device="cpu").run_rows(*make_inputs("n1")[:5], 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["flash", "matmul"])
@pytest.mark.parametrize("name", ["ragged_gqa_d40", "p0", "all_s1", "longish"])
def test_both_cpu_prefix_paths_match_reference(name, path, dtype, poison):
    """ATen's flash kernel and Hydragen's batched GEMMs over the prefix, whichever a CPU measures faster."""
    q, ks, vs, kp, vp, cu, scale = make_inputs(name, dtype=dtype)
    planned = pa.plan_attention(cu, q.shape[0], device="cpu", dtype=dtype, head_dim=q.shape[2], backend="torch",
                                prefix_path=path)
    out = planned.run(q, ks, vs, kp, vp, scale)
    assert out.dtype == dtype and planned.prefix_path == path
    assert_close_rel(out, _attend("reference", q, ks, vs, kp, vp, cu, scale),
                     1e-5 if dtype == torch.float32 else HALF_TOLERANCE[dtype])


def test_prefix_path_choice_is_explicit_by_variable_or_measured_once(monkeypatch):
    shape = (64, 48, 4, 2, 32, torch.float32)
    assert torch_ops.choose_prefix_path(*shape, requested="matmul") == "matmul"
    monkeypatch.setenv(torch_ops.PREFIX_PATH_ENV, "flash")
    assert torch_ops.choose_prefix_path(*shape) == "flash"
    monkeypatch.setenv(torch_ops.PREFIX_PATH_ENV, "fastest")
    with pytest.raises(ValueError, match=r"\$MMPRM_PREFIX_ATTENTION='fastest' is not a prefix path"):
        torch_ops.choose_prefix_path(*shape)
    monkeypatch.delenv(torch_ops.PREFIX_PATH_ENV)
    torch_ops._prefix_choices.clear()
    monkeypatch.setattr(torch_ops.backends, "time_interleaved", lambda calls, reps: {"flash": 1.0, "matmul": 0.95})
    assert torch_ops.choose_prefix_path(*shape) == "flash"  # 5 % is not a clear win
    monkeypatch.setattr(torch_ops.backends, "time_interleaved", lambda calls, reps: pytest.fail("measured twice"))
    assert torch_ops.choose_prefix_path(60, 40, *shape[2:]) == "flash"  # same shape class: cached
    torch_ops._prefix_choices.clear()
    monkeypatch.setattr(torch_ops.backends, "time_interleaved", lambda calls, reps: {"flash": 1.0, "matmul": 0.5})
    assert torch_ops.choose_prefix_path(*shape) == "matmul"
    torch_ops._prefix_choices.clear()


def test_flash_attn_probe_runs_once():
    flash_attn_ops.varlen_func.cache_clear()
    for _ in range(3):
        flash_attn_ops.usable(torch.device("cuda"), torch.bfloat16, 64)
    info = flash_attn_ops.varlen_func.cache_info()
    assert info.misses == 1 and info.hits == 2


def test_merge_with_suffix_equals_the_general_merge():
    """The engine's one-pass merge (every suffix row sees itself) against merge_partials, P = 0 included."""
    for name in ("ragged_gqa_d40", "p0"):
        q, ks, vs, kp, vp, cu, scale = make_inputs(name)
        pre, suf = pa.prefix_partial(q, kp, vp, scale), pa.suffix_partial(q, ks, vs, cu, scale)
        assert_close_rel(torch_ops.merge_with_suffix(pre, suf, torch.float32), pa.merge_partials(*pre, *suf), 1e-6)
