"""The marker readout kernel: every backend against the plain-loop float64 reference.

Triton runs compiled on CUDA, else on the CPU interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is first imported).
"""

import math

import pytest
import torch

ON_CUDA = torch.cuda.is_available()

from mmprm_infer.kernels import backends, triton_runtime  # noqa: E402
from mmprm_infer.kernels import step_reward as sr  # noqa: E402

TRITON_DEVICE = "cuda" if ON_CUDA else "cpu"
TRITON_READY = sr.triton is not None and (ON_CUDA or triton_runtime.interpreter_active())
if not TRITON_READY:  # a hard failure, not a skip: the Triton checks must run
    raise RuntimeError("Triton cannot run here: install triton, and on CPU set TRITON_INTERPRET=1 before triton is "
                       "imported (tests/conftest.py does)")
BACKENDS = ["torch", "triton"]

# (marker rows M, hidden d, bias b, rows a column slice of a wider tensor: non-unit row stride)
CASES = {
    "ragged_d72": (11, 72, 0.25, False),
    "one_marker": (1, 64, 0.0, False),
    "d40": (6, 40, -0.5, False),
    "wide_d1100": (7, 1100, 0.1, False),  # d over one 1024-column chunk
    "strided_d72": (19, 72, 0.3, True),  # more rows than one BLOCK_M tile, row stride 100
}


def make_inputs(name, dtype=torch.float32, device="cpu"):
    m, d, bias, strided = CASES[name]
    gen = torch.Generator().manual_seed(sorted(CASES).index(name))
    wide = torch.randn(m, 100 if strided else d, generator=gen) * 3.0
    rows = wide[:, :d]
    w = torch.randn(d, generator=gen) / (3.0 * d**0.5)  # logits ~ N(0, 1)
    return dict(rows=rows.to(device=device, dtype=dtype), w=w.to(device=device, dtype=dtype), b=bias)


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
def test_rewards_match_reference(name, backend, poison):
    args = make_inputs(name, device=_device(backend))
    ref = sr.marker_rewards(**make_inputs(name), backend="reference")
    rewards = sr.marker_rewards(**args, backend=backend)
    assert rewards.dtype == torch.float32
    assert rewards.shape == (CASES[name][0],)
    _close(rewards, ref)


def test_reference_matches_definition():
    # one row worked by hand: dot, bias, sigmoid
    rows = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([0.5, -1.0])
    z = 3 * 0.5 + 4 * -1.0 + 0.2
    rewards = sr.marker_rewards(rows, w, 0.2, backend="reference")
    assert rewards.item() == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_no_rows(backend):
    rewards = sr.marker_rewards(torch.zeros(0, 8, device=_device(backend)), torch.ones(8, device=_device(backend)),
                                backend=backend)
    assert rewards.shape == (0,) and rewards.dtype == torch.float32


# Half-precision rows and weights: every backend upcasts them and computes in fp32, the reference in
# float64 from the same half-precision values.  Computing the rewards in bf16 instead is off by about
# 1e-3 (test_half_precision_check_catches_half_arithmetic).
HALF_REWARD_ATOL = 4e-7


def _check_half(args, backend):
    ref = sr.marker_rewards(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in args.items()},
                            backend="reference")
    rewards = sr.marker_rewards(**args, backend=backend)
    assert rewards.dtype == torch.float32
    _close(rewards, ref, rtol=0, atol=HALF_REWARD_ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ragged_d72", "d40", "wide_d1100", "strided_d72"])
def test_half_precision_inputs(name, backend, dtype, poison):
    _check_half(make_inputs(name, dtype=dtype, device=_device(backend)), backend)


def test_half_precision_check_catches_half_arithmetic(monkeypatch):
    """A torch path that computed the rewards in bf16 (no upcast) fails the check above."""
    def in_bf16(rows, w, b):
        return torch.sigmoid(torch.mv(rows, w) + b).float()

    monkeypatch.setattr(sr, "_rewards_torch", in_bf16)
    for name in ("ragged_d72", "d40", "wide_d1100"):
        with pytest.raises(AssertionError):
            _check_half(make_inputs(name, dtype=torch.bfloat16), "torch")


def test_auto_is_torch_on_cpu():
    args = make_inputs("ragged_d72")
    assert torch.equal(sr.marker_rewards(**args), sr.marker_rewards(**args, backend="torch"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "w": a["w"][:-1]}, r"w must be \[d\] = \[72\]"),
        (lambda a: {**a, "rows": a["rows"][0]}, "rows must be a floating"),
        (lambda a: {**a, "rows": a["rows"].long()}, "rows must be a floating"),
        (lambda a: {**a, "w": a["w"].to("meta")}, "w is on meta but rows are on cpu"),
        (lambda a: {**a, "backend": "cuda"}, "unknown backend"),
    ],
)
def test_bad_arguments_raise(mutate, message):
    args = make_inputs("ragged_d72")
    with pytest.raises(ValueError, match=message):
        sr.marker_rewards(**mutate(args))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(triton_runtime, "interpreter_active", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sr.marker_rewards(**make_inputs("one_marker"), backend="triton")
