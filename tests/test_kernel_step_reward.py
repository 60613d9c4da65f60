"""Fused step rewards: every backend and aggregation against the plain-loop reference.

Triton runs compiled on CUDA, else on the CPU interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is first imported).
"""

import math

import pytest
import torch

ON_CUDA = torch.cuda.is_available()

from mmprm_infer.kernels import backends, triton_runtime  # noqa: E402
from mmprm_infer.kernels import step_reward as sr

TRITON_DEVICE = "cuda" if ON_CUDA else "cpu"
TRITON_READY = sr.triton is not None and (ON_CUDA or triton_runtime.interpreter_active())
if not TRITON_READY:  # a hard failure, not a skip: the Triton checks must run
    raise RuntimeError("Triton cannot run here: install triton, and on CPU set TRITON_INTERPRET=1 before triton is "
                       "imported (tests/conftest.py does)")
BACKENDS = ["torch", "triton"]
AGGS = sorted(sr.AGGREGATIONS)

# (markers per candidate, tokens T, hidden d, with RMSNorm, b_diff)
CASES = {
    "ragged_d72": ([3, 1, 5, 2], 40, 72, True, 0.25),
    "one_marker": ([1], 5, 64, True, 0.0),
    "no_norm_d40": ([2, 4], 30, 40, False, -0.5),
    "wide_d1100": ([4, 3], 20, 1100, True, 0.1),  # d over one 1024-column chunk
}


def make_inputs(name, dtype=torch.float32, device="cpu", pos_dtype=torch.int64):
    counts, t, d, norm, bias = CASES[name]
    gen = torch.Generator().manual_seed(sorted(CASES).index(name))
    hidden = torch.randn(t, d, generator=gen) * 3.0
    norm_weight = torch.rand(d, generator=gen) + 0.5 if norm else None
    w_diff = torch.randn(d, generator=gen) / (d**0.5 if norm else 3.0 * d**0.5)  # logits ~ N(0, 1)
    positions = torch.randint(0, t, (sum(counts),), generator=gen)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    moved = [None if x is None else x.to(device=device, dtype=dtype) for x in (hidden, norm_weight, w_diff)]
    return dict(hidden=moved[0], positions=positions.to(device=device, dtype=pos_dtype), cu_markers=cu.to(device),
                norm_weight=moved[1], eps=1e-6, w_diff=moved[2], b_diff=bias)


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


@pytest.fixture
def poison(monkeypatch):
    """Outputs start as NaN so any entry a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(backends, "empty",
                        lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_rewards_and_scores_match_reference(name, backend, poison):
    args = make_inputs(name, device=_device(backend))
    ref_args = make_inputs(name)
    for agg in AGGS:
        ref_r, ref_s = sr.fused_step_rewards(**ref_args, aggregation=agg, backend="reference")
        rewards, scores = sr.fused_step_rewards(**args, aggregation=agg, backend=backend)
        assert rewards.dtype == scores.dtype == torch.float32
        assert scores.shape == (len(CASES[name][0]),)
        _close(rewards, ref_r)
        _close(scores, ref_s, atol=1e-5)


def test_reference_matches_definition():
    # one marker worked by hand: rmsnorm, dot, sigmoid
    hidden = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    w_diff = torch.tensor([0.5, -1.0])
    rms = math.sqrt((9 + 16) / 2 + 1e-6)
    z = (3 / rms) * 1 * 0.5 + (4 / rms) * 2 * -1.0 + 0.2
    rewards, _ = sr.fused_step_rewards(hidden, torch.tensor([0]), [0, 1], w, 1e-6, w_diff, 0.2, backend="reference")
    assert rewards.item() == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.filterwarnings("ignore:divide by zero")  # the interpreter's numpy on 1 / (1 - 1)
def test_aggregations_on_edge_rewards(backend, poison):
    # exact 0 and 1 exercise the clamps: p >= eps for log, eps <= p <= 1 - eps for logit and odds
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.75, 0.9], device=_device(backend))
    cu = [0, 1, 3, 6]
    eps = 1e-12
    clamp = lambda p: min(max(p, eps), 1 - eps)  # noqa: E731
    lg = lambda p: math.log(max(p, eps))  # noqa: E731
    logit = lambda p: math.log(clamp(p) / (1 - clamp(p)))  # noqa: E731
    odd = lambda p: clamp(p) / (1 - clamp(p))  # noqa: E731
    want = {
        "min": [1.0, 0.0, 0.25],
        "max": [1.0, 0.5, 0.9],
        "mean": [1.0, 0.25, (0.25 + 0.75 + 0.9) / 3],
        "last": [1.0, 0.5, 0.9],
        "prod": [1.0, 0.0, 0.25 * 0.75 * 0.9],
        "sum_logprob": [lg(1.0), lg(0.0) + lg(0.5), lg(0.25) + lg(0.75) + lg(0.9)],
        "sum_logit": [logit(1.0), logit(0.0) + logit(0.5), logit(0.25) + logit(0.75) + logit(0.9)],
        "mean_odd": [odd(1.0), (odd(0.0) + odd(0.5)) / 2, (odd(0.25) + odd(0.75) + odd(0.9)) / 3],
    }
    for agg in AGGS:
        got = sr.aggregate_step_rewards(rewards, cu, agg, backend=backend)
        _close(got, torch.tensor(want[agg]), rtol=1e-6, atol=0)


# Half-precision hidden states and weights: every backend upcasts them and computes in fp32, the
# reference in float64 from the same half-precision values.  Measured max |difference| over CASES and
# all aggregations (torch and Triton on the CPU interpreter, bf16 and fp16): rewards 1.8e-7, scores
# 1.3e-6 relative to max(1, |score|).  Computing the rewards in bf16 instead is off by 9e-4 to 2e-3
# (test_half_precision_check_catches_half_arithmetic).
HALF_REWARD_ATOL = 4e-7
HALF_SCORE_TOL = 3e-6


def _check_half(args, backend, aggregations=AGGS):
    for agg in aggregations:
        ref_r, ref_s = sr.fused_step_rewards(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in args.items()},
                                             aggregation=agg, backend="reference")
        rewards, scores = sr.fused_step_rewards(**args, aggregation=agg, backend=backend)
        assert rewards.dtype == scores.dtype == torch.float32
        _close(rewards, ref_r, rtol=0, atol=HALF_REWARD_ATOL)
        _close(scores, ref_s, rtol=HALF_SCORE_TOL, atol=HALF_SCORE_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ragged_d72", "no_norm_d40", "wide_d1100"])
def test_half_precision_inputs(name, backend, dtype, poison):
    _check_half(make_inputs(name, dtype=dtype, device=_device(backend)), backend)


def test_half_precision_check_catches_half_arithmetic(monkeypatch):
    """A torch path that computed the rewards in bf16 (no upcast) fails the check above."""
    def in_bf16(hidden, positions, norm_weight, eps, w_diff, b_diff):
        x = hidden.index_select(0, positions)
        if norm_weight is not None:
            x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * norm_weight
        return torch.sigmoid(torch.mv(x, w_diff) + b_diff).float()

    monkeypatch.setattr(sr, "_rewards_torch", in_bf16)
    for name in ("ragged_d72", "no_norm_d40", "wide_d1100"):
        with pytest.raises(AssertionError):
            _check_half(make_inputs(name, dtype=torch.bfloat16), "torch", ["min"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_positions_and_list_cu(backend):
    args = make_inputs("ragged_d72", device=_device(backend), pos_dtype=torch.int32)
    ref = sr.fused_step_rewards(**make_inputs("ragged_d72"), aggregation="mean", backend="reference")
    args["cu_markers"] = args["cu_markers"].tolist()
    got = sr.fused_step_rewards(**args, aggregation="mean", backend=backend)
    _close(got[0], ref[0])
    _close(got[1], ref[1])


def test_aliases_and_auto():
    args = make_inputs("ragged_d72")
    assert torch.equal(sr.fused_step_rewards(**args, aggregation="average")[1],
                       sr.fused_step_rewards(**args, aggregation="mean", backend="torch")[1])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "aggregation": "median"}, r"unknown aggregation 'median'; choose one of \['last', 'max'"),
        (lambda a: {**a, "cu_markers": [0, 3, 3, 11]}, "at least one marker"),
        (lambda a: {**a, "cu_markers": [1, 4, 11]}, "start at 0"),
        (lambda a: {**a, "cu_markers": [0, 4, 10]}, "must equal the number of positions"),
        (lambda a: {**a, "positions": a["positions"] + 100}, r"positions must index rows of hidden in \[0, 40\)"),
        (lambda a: {**a, "positions": a["positions"].float()}, "1-D integer"),
        (lambda a: {**a, "w_diff": a["w_diff"][:-1]}, "w_diff must be"),
        (lambda a: {**a, "norm_weight": a["norm_weight"][:-1]}, "norm_weight must be"),
        (lambda a: {**a, "hidden": a["hidden"][0]}, "hidden must be"),
        (lambda a: {**a, "backend": "cuda"}, "unknown backend"),
    ],
)
def test_bad_arguments_raise(mutate, message):
    args = {**make_inputs("ragged_d72"), "aggregation": "min"}
    with pytest.raises(ValueError, match=message):
        sr.fused_step_rewards(**mutate(args))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(triton_runtime, "interpreter_active", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sr.fused_step_rewards(**make_inputs("one_marker"), backend="triton")

