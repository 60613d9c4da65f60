"""pytest-benchmark timings of the fast engine's hot paths (not part of the normal test run).

    pytest bench/test_hot_paths.py --benchmark-enable              # time them
    pytest bench/test_hot_paths.py --benchmark-enable --benchmark-autosave --benchmark-compare

pyproject's testpaths is ``tests`` and its addopts carry ``--benchmark-disable``,
so a plain ``pytest`` never collects this file, and without
``--benchmark-enable`` each benchmark body runs once, as a plain test.

- ``shared_prefix_attention`` (torch path) on one W1 layer: 16 candidates x 200
  suffix tokens over a 1000-token prefix, 8 heads / 2 KV heads, head_dim 64, fp32;
- ``marker_rewards`` (torch path) on W1's marker readout: the 16 x 8 marker
  rows of 3200 packed rows, hidden 512;
- one ``prm.score(..., engine="fast")`` call on a small model (hidden 128,
  2 layers, N=8, P=200, S=64), its weights scaled so rewards spread over
  (0, 1) (``tests/spread_models.py``), checked against the reference engine
  at fp32's tolerance.
"""

from __future__ import annotations

import pytest
import torch

from mmprm_infer.kernels.prefix_attention import shared_prefix_attention
from mmprm_infer.kernels.step_reward import marker_rewards
from tests.spread_models import BROKEN, assert_matches, assert_spread, spread

THREADS = 2
N, P, S, H, HKV, D, HIDDEN, STEPS = 16, 1000, 200, 8, 2, 64, 512, 8


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def _w1_attention_inputs():
    g = torch.Generator().manual_seed(0)
    t = N * S
    q = torch.randn(t, H, D, generator=g)
    k_suffix, v_suffix = torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g)
    k_prefix, v_prefix = torch.randn(P, HKV, D, generator=g), torch.randn(P, HKV, D, generator=g)
    cu = list(range(0, t + 1, S))
    return q, k_suffix, v_suffix, k_prefix, v_prefix, cu, D ** -0.5


def test_shared_prefix_attention_torch_w1_layer(benchmark):
    args = _w1_attention_inputs()
    with torch.inference_mode():
        out = benchmark(shared_prefix_attention, *args, backend="torch")
    assert out.shape == (N * S, H, D) and torch.isfinite(out).all()


def test_marker_rewards_torch_w1(benchmark):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N * S, HIDDEN, generator=g)
    # 8 markers per candidate, evenly spread, the last on the candidate's last token
    positions = torch.tensor([c * S + (s + 1) * S // STEPS - 1 for c in range(N) for s in range(STEPS)])
    rows = hidden.index_select(0, positions)  # what the fast engine hands the reward head
    w_diff = torch.randn(HIDDEN, generator=g) * 0.05
    with torch.inference_mode():
        rewards = benchmark(marker_rewards, rows, w_diff, 0.0, backend="torch")
    assert rewards.shape == (N * STEPS,)


@pytest.fixture(scope="module")
def small_prm(tmp_path_factory):
    from bench import workloads
    from mmprm_infer import PRM

    spec = workloads.TextModelSpec(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=352, vocab_size=1024,
                                   max_positions=2048)
    path = workloads.text_checkpoint(spec, tmp_path_factory.mktemp("hot_paths"))
    prm = PRM.from_pretrained(path, format=workloads.TEXT_FORMAT, dtype="float32")
    # This model's rewards already span 0.55-0.97 unscaled: a milder spread than the tests' tiny
    # models need gives 0.12-0.87.
    spread(prm.model, body=2.0, head=1.0)
    w = workloads.Workload("small", spec, n_candidates=8, prompt_tokens=200, suffix_tokens=64, steps=4)
    return prm, workloads.make_inputs(prm, w)


def test_fast_engine_score_small_model(benchmark, small_prm):
    prm, inputs = small_prm
    rewards = benchmark(prm.score, inputs.question, inputs.candidates, engine="fast")
    reference = prm.score(inputs.question, inputs.candidates, engine="reference")
    assert_spread(reference)
    # fast against reference, fp32, measured max |difference| 1.0e-6 (longer inputs than the tests' models)
    assert_matches(rewards, reference, tol=3e-6)


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_small_model_check_catches_broken_engines(small_prm, broken):
    """The comparison above fails for each deliberately broken fast engine (measured errors >= 1.6e-2)."""
    prm, inputs = small_prm
    reference = prm.score(inputs.question, inputs.candidates, engine="reference")
    with BROKEN[broken]():
        rewards = prm.score(inputs.question, inputs.candidates, engine="fast")
    with pytest.raises(AssertionError):
        assert_matches(rewards, reference, tol=3e-6)
