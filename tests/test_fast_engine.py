"""The fast engine equals the reference engine, independent of batching, and does only the needed work.

The models are the conftest's tiny checkpoints with their weights scaled
(``spread_models.spread``) so rewards cover most of (0, 1); the comparison is
at a tolerance a few times above fp32's error, with a ranking check over every
pair of candidates, and ``test_broken_engines_fail_the_check`` shows that an
engine with a 2 % attention-scale error, suffix positions off by one or the
prefix length off by one fails it.
"""

from __future__ import annotations

import copy
import random

import pytest
import spread_models as S
import torch

from mmprm_infer import PRM, ScoringItem
from mmprm_infer.engines import NonFiniteRewardError, fused_layers, last_layer
from mmprm_infer.engines import shared_prefix as sp
from mmprm_infer.engines.base import EncodedQuestion
from mmprm_infer.engines.fast import FastEngine, shared_prefix_length
from mmprm_infer.engines.last_layer import rows_forward
from mmprm_infer.engines.reference import ReferenceEngine
from mmprm_infer.formats import EncodedCandidate
from mmprm_infer.kernels.prefix_attention import AttentionPlan
from mmprm_infer.models.adapters import ModelAdapter

QUESTION = "Janet's ducks lay 16 eggs per day. She eats three and bakes with four. How many are left?"
FORMATS = {"math-shepherd": "shepherd_dir", "qwen2.5-math-prm": "qwen_prm_dir", "custom": "custom_dir"}
OPTIONS = {"custom": {"step_tag": "<step>"}}
_candidates = S.candidates

# bf16 fast engine (CPU) on the spread models, N = 1, 3, 16, measured max |difference|:
# against the bf16 reference engine 1.3e-2, against the fp32 reference 2.9e-2 (the bf16
# reference itself is 2.6e-2 from fp32).  Tolerances about 2x those; ranking of pairs the
# fp32 reference separates by > 0.05 (none misordered at 0.02).
BF16_TOL_VS_BF16 = 3e-2
BF16_TOL_VS_FP32 = 6e-2
BF16_RANK_MARGIN = 5e-2


def _close(a, b, tol=S.FP32_TOL):
    assert [len(r) for r in a] == [len(r) for r in b]
    assert S.max_difference(a, b) <= tol


@pytest.fixture(scope="module")
def prms(request):
    """fp32 PRMs with spread rewards."""
    return {fmt: S.spread_prm(PRM.from_pretrained(request.getfixturevalue(d), format=fmt, dtype=torch.float32,
                                                  **OPTIONS.get(fmt, {})))
            for fmt, d in FORMATS.items()}


@pytest.fixture(scope="module")
def reference(prms):
    """Reference-engine rewards of (format, n candidates), computed once per module."""
    cache = {}

    def get(fmt, n):
        if (fmt, n) not in cache:
            cache[fmt, n] = prms[fmt].score(QUESTION, _candidates(n, seed=n), engine="reference")
        return cache[fmt, n]

    return get


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n", [1, 3, 16])
def test_fast_matches_reference(prms, reference, fmt, n):
    prm = prms[fmt]
    cands = _candidates(n, seed=n)
    ref = reference(fmt, n)
    fast = prm.score(QUESTION, cands, engine="fast")
    S.assert_matches(fast, ref)
    if n >= 3:  # the duplicate candidate scores the same
        _close(fast[2:3], fast[0:1])
    if n == 16:  # the check has something to check: spread rewards, and all pairs but the duplicate ranked
        S.assert_spread(ref)
        assert len(S.separated_pairs(ref)) == n * (n - 1) // 2 - 1


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("broken", list(S.BROKEN))
def test_broken_engines_fail_the_check(prms, reference, fmt, broken):
    """Each deliberately broken engine fails the equivalence check the tests above rely on (which the
    intact engine passes on the same candidates: test_fast_matches_reference[16-...])."""
    prm = prms[fmt]
    cands = _candidates(16, seed=16)
    ref = reference(fmt, 16)
    with S.BROKEN[broken]():
        wrong = prm.score(QUESTION, cands, engine="fast")
    with pytest.raises(AssertionError):
        S.assert_matches(wrong, ref)
    # ... and the check is not merely picky: the broken engine is off by far more than fp32's error
    assert S.max_difference(wrong, ref) > 100 * S.FP32_TOL


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fast_engine_in_bf16(prms, reference, fmt):
    """The fast engine on a bf16 model: close to the bf16 reference engine and to fp32, same ranking."""
    prm32 = prms[fmt]
    prm16 = PRM(copy.deepcopy(prm32.model).to(torch.bfloat16), prm32.tokenizer, format=fmt, **OPTIONS.get(fmt, {}))
    assert prm16.adapter.dtype == torch.bfloat16
    cands = _candidates(16, seed=16)
    fast16 = prm16.score(QUESTION, cands, engine="fast")
    ref16 = prm16.score(QUESTION, cands, engine="reference")
    ref32 = reference(fmt, 16)
    S.assert_matches(fast16, ref16, tol=BF16_TOL_VS_BF16, margin=BF16_RANK_MARGIN)
    S.assert_matches(fast16, ref32, tol=BF16_TOL_VS_FP32, margin=BF16_RANK_MARGIN)
    assert len(S.separated_pairs(ref32, BF16_RANK_MARGIN)) >= 70  # measured 88-106 of 120
    # it really ran in bf16 (an engine that upcast to fp32 would agree with fp32 to 1e-6)
    assert S.max_difference(fast16, prm32.score(QUESTION, cands, engine="fast")) > 1e-3


@pytest.mark.parametrize("fmt", ["math-shepherd", "qwen2.5-math-prm"])
def test_batch_composition_and_order_do_not_matter(prms, fmt):
    prm = prms[fmt]
    items = [ScoringItem(QUESTION, _candidates(5, seed=1)),
             ScoringItem("What is the area of a 12 by 5 rectangle?", _candidates(3, seed=2)),
             ScoringItem("Count the apples.", _candidates(4, seed=3))]
    alone = [prm.score(it.question, it.candidates, engine="fast") for it in items]
    together = prm.score_batch(items, engine="fast")
    reordered = prm.score_batch(items[::-1], engine="fast")[::-1]
    # 7 tokens: prefixes run in chunks, most batches hold one candidate, long ones exceed the budget alone.
    tiny = prm.score_batch(items, engine=FastEngine(max_batch_tokens=7))
    mid = prm.score_batch(items, engine=FastEngine(max_batch_tokens=60))
    for other in (together, reordered, tiny, mid):
        for a, b in zip(alone, other):
            _close(b, a)
    S.assert_matches(together[0], prm.score(QUESTION, items[0].candidates, engine="reference"))


def _lcp_prefix(question: EncodedQuestion) -> int:
    ids = [c.input_ids for c in question.candidates]
    p = 0
    while all(len(x) > p + 1 and x[p] == ids[0][p] and p < c.reward_positions[0]
              for x, c in zip(ids, question.candidates)):
        p += 1
    return p


def test_prefix_once_and_no_full_lm_head(prms, monkeypatch):
    prm = prms["math-shepherd"]
    cands = _candidates(16, seed=5)
    encoded = prm.encode(QUESTION, cands)
    p = _lcp_prefix(encoded)
    assert p == shared_prefix_length(encoded) and p > 10
    suffix_tokens = sum(len(c.input_ids) - p for c in encoded.candidates)

    head_rows, layer_tokens, prefix_shapes = [], [], []
    head = prm.model.get_output_embeddings()
    decoder = prm.adapter.decoder
    h1 = head.register_forward_pre_hook(lambda m, args: head_rows.append(args[0].shape[:-1].numel()))
    h2 = decoder.layers[0].register_forward_pre_hook(lambda m, args: layer_tokens.append(args[0].shape[1]))
    run, run_rows = AttentionPlan.run, AttentionPlan.run_rows

    def spy(plan, q, ks, vs, kp, vp, scale):
        prefix_shapes.append(("all rows", tuple(kp.shape)))
        return run(plan, q, ks, vs, kp, vp, scale)

    def rows_spy(plan, q, ks, vs, kp, vp, scale):
        prefix_shapes.append(("marker rows", tuple(kp.shape)))
        return run_rows(plan, q, ks, vs, kp, vp, scale)

    monkeypatch.setattr(AttentionPlan, "run", spy)
    monkeypatch.setattr(AttentionPlan, "run_rows", rows_spy)
    try:
        prm.score(QUESTION, cands, engine="fast")
    finally:
        h1.remove()
        h2.remove()
    assert head_rows == []  # rewards read two head rows; the LM head never runs
    assert layer_tokens == [p, suffix_tokens]  # the prefix once, then every suffix token once
    hkv = prm.model.config.num_key_value_heads
    d = prm.model.config.hidden_size // prm.model.config.num_attention_heads
    layers = prm.model.config.num_hidden_layers
    # prefix pass sees an empty prefix, the suffix pass the P-token prefix, stored once (not N times);
    # the last layer attends from the marker rows alone, and not at all in the prefix pass (K/V only)
    assert prefix_shapes == ([("all rows", (0, hkv, d))] * (layers - 1) + [("all rows", (p, hkv, d))] * (layers - 1)
                             + [("marker rows", (p, hkv, d))])
    assert decoder.config._attn_implementation != sp.ATTN_IMPLEMENTATION  # restored


@pytest.mark.parametrize("fused", [True, False])
def test_no_shared_prefix_and_whole_candidate_prefix(prms, fused):
    """P = 0 (first tokens differ) and a candidate equal to the common prefix (a one-token suffix) still
    score exactly, on the fused layers and on transformers' modules."""
    prm = prms["custom"]
    rng = random.Random(0)
    tag = prm.tokenizer.convert_tokens_to_ids("<step>")
    vocab = len(prm.tokenizer) - 10

    def cand(first, steps):
        ids, pos = [first], []
        for n in steps:
            ids += [rng.randrange(5, vocab) for _ in range(n)] + [tag]
            pos.append(len(ids) - 1)
        return EncodedCandidate(ids, pos)

    no_prefix = EncodedQuestion([cand(3, [4, 2]), cand(4, [6]), cand(5, [1, 1, 3])])
    base = cand(7, [5, 3])
    contained = EncodedQuestion([base, EncodedCandidate(base.input_ids[:7], base.reward_positions[:1])])
    assert shared_prefix_length(no_prefix) == 0 and shared_prefix_length(contained) == 6
    ref = ReferenceEngine().score(prm.adapter, prm.columns, [no_prefix, contained])
    for budget in (16384, 3):
        fast = FastEngine(max_batch_tokens=budget, fused=fused).score(prm.adapter, prm.columns,
                                                                      [no_prefix, contained])
        for a, b in zip(fast, ref):
            S.assert_matches(a, b)


class _PlaceholderImageAdapter(ModelAdapter):
    """Stand-in vision-language adapter: rows of token `image_id` take the image features."""

    image_id = 9

    def merge_image_features(self, input_ids, image_features):
        embeds = self.embed(input_ids)
        if image_features is None:
            return None
        mask = input_ids == self.image_id
        assert int(mask.sum()) == image_features.shape[0], "placeholder count must match the features"
        embeds = embeds.clone()
        embeds[mask] = image_features.to(embeds.dtype)
        return embeds


def test_image_features_go_in_as_embeddings(prms):
    prm = prms["custom"]
    adapter = _PlaceholderImageAdapter(prm.model)
    tag = prm.tokenizer.convert_tokens_to_ids("<step>")
    prompt = [1, 2] + [adapter.image_id] * 6 + [20, 21, 22]
    torch.manual_seed(0)
    image = EncodedQuestion(
        [EncodedCandidate(prompt + [30, 31, tag, 32, tag], [len(prompt) + 2, len(prompt) + 4]),
         EncodedCandidate(prompt + [33, tag], [len(prompt) + 1])],
        image_features=torch.randn(6, prm.model.config.hidden_size))
    text = EncodedQuestion([EncodedCandidate([1, 40, 41, tag], [3]), EncodedCandidate([1, 42, tag], [2])])
    ref = ReferenceEngine().score(adapter, prm.columns, [image, text])
    fast = FastEngine().score(adapter, prm.columns, [image, text])
    for a, b in zip(fast, ref):
        S.assert_matches(a, b)
    plain = FastEngine().score(prm.adapter, prm.columns, [EncodedQuestion(image.candidates)])
    assert abs(plain[0][0][0] - fast[0][0][0]) > 1e-6  # the features really were used


def test_non_finite_names_question_and_candidate(shepherd_dir):
    prm = PRM.from_pretrained(shepherd_dir, format="math-shepherd")
    with torch.no_grad():
        prm.model.get_output_embeddings().weight.fill_(float("nan"))
    with pytest.raises(NonFiniteRewardError, match="question 0 candidate 0"):
        prm.score_batch([ScoringItem(QUESTION, [["2 + 3 = 5"]]), ScoringItem("x", [["y"]])], engine="fast")
    assert prm.adapter.decoder.config._attn_implementation != sp.ATTN_IMPLEMENTATION


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_last_layer_on_marker_rows_equals_the_whole_layer(prms, reference, fmt, monkeypatch):
    """The last layer computed for the marker rows only (pruned path for Llama/Qwen2 layers, fused or on
    transformers' modules, and the run-whole-then-cut path any other layer takes) gives the whole layer's
    rewards."""
    prm = prms[fmt]
    items = [ScoringItem(QUESTION, _candidates(16, seed=16)), ScoringItem(QUESTION[:20], _candidates(3, seed=3))]
    whole = prm.score_batch(items, engine=FastEngine(prune_last_layer=False))
    calls = []
    monkeypatch.setattr(last_layer, "rows_forward", lambda *a: calls.append("modules") or rows_forward(*a))
    fused_rows = fused_layers.rows_layer_forward
    monkeypatch.setattr(fused_layers, "rows_layer_forward", lambda *a: calls.append("fused") or fused_rows(*a))
    for fused in (True, False):
        for budget in (None, 7):  # 7 tokens: many batches, some holding no marker at all
            pruned = prm.score_batch(items, engine=FastEngine(max_batch_tokens=budget, fused=fused))
            for a, b in zip(pruned, whole):
                _close(a, b, 1e-5)
    assert set(calls) == {"modules", "fused"}, "a pruned path never ran"
    monkeypatch.setattr(last_layer, "PRUNABLE", ())  # an unknown layer type: run whole, keep the rows
    cut = prm.score_batch(items, engine=FastEngine())
    for a, b in zip(cut, whole):
        _close(a, b, 1e-5)
    S.assert_matches(whole[0], reference(fmt, 16))



@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fused_layers_on_edge_shapes(prms, fmt):
    """The fused layers against the reference engine where shapes are thin: one candidate of one step, a
    long candidate split over many token budgets, and batches holding no marker; fp32 at the spread
    models' tolerance and bf16 at the bf16 ones (against the bf16 reference)."""
    prm32 = prms[fmt]
    prm16 = PRM(copy.deepcopy(prm32.model).to(torch.bfloat16), prm32.tokenizer, format=fmt, **OPTIONS.get(fmt, {}))
    long = _candidates(4, seed=7)[-1:]  # 8 steps of 30 words
    cases = [([["the area is 12"]], None), (long, None), (long, 5), (_candidates(3, seed=9), 2)]
    for prm, tol, margin in ((prm32, S.FP32_TOL, S.RANK_MARGIN), (prm16, BF16_TOL_VS_BF16, BF16_RANK_MARGIN)):
        for cands, budget in cases:
            engine = FastEngine(max_batch_tokens=budget)
            assert engine.describe(prm.adapter)["decoder"] == "fused layers"
            ref = prm.score(QUESTION, cands, engine="reference")
            S.assert_matches(prm.score(QUESTION, cands, engine=engine), ref, tol=tol, margin=margin)


def test_half_precision_model_computes_in_fp32_where_the_cpu_has_no_fast_bf16(prms, reference, monkeypatch):
    """Without bf16 units (measured by linear_paths.half_precision_is_fast) a bf16 model runs in fp32, says
    so, and scores as closely to the fp32 reference as its bf16 weights allow."""
    from mmprm_infer.engines import linear_paths

    prm32 = prms["math-shepherd"]
    prm16 = PRM(copy.deepcopy(prm32.model).to(torch.bfloat16), prm32.tokenizer, format="math-shepherd")
    monkeypatch.setattr(linear_paths, "half_precision_is_fast", lambda dtype: False)
    engine = FastEngine()
    with pytest.warns(UserWarning, match="computes in fp32"):  # said once, by whichever call comes first
        info = engine.describe(prm16.adapter)
    assert info["compute_dtype"] == "float32" and "no fast torch.bfloat16 GEMM" in info["compute_dtype_why"]
    cands = _candidates(16, seed=16)
    got = prm16.score(QUESTION, cands, engine=engine)
    assert engine._fused[prm16.adapter.decoder].dtype == torch.float32  # what the layers ran in
    S.assert_matches(got, reference("math-shepherd", 16), tol=BF16_TOL_VS_FP32, margin=BF16_RANK_MARGIN)


def test_fused_layers_compute_on_the_model_weights_when_memory_is_short(prms, reference, monkeypatch):
    """No room for a fused copy of the weights: the fused layers run projection by projection on the model's
    own weights (bf16 ones cast per call when the engine computes in fp32), same rewards."""
    from mmprm_infer.engines import fused_layers, linear_paths

    monkeypatch.setattr(fused_layers, "available_bytes", lambda device: 0)
    prm32 = prms["qwen2.5-math-prm"]
    engine = FastEngine()
    assert engine.describe(prm32.adapter)["decoder"].startswith("fused layers on the model's weights")
    S.assert_matches(prm32.score(QUESTION, _candidates(16, seed=16), engine=engine), reference("qwen2.5-math-prm", 16))
    prm16 = PRM(copy.deepcopy(prm32.model).to(torch.bfloat16), prm32.tokenizer, format="qwen2.5-math-prm")
    monkeypatch.setattr(linear_paths, "half_precision_is_fast", lambda dtype: False)
    with pytest.warns(UserWarning, match="computes in fp32"):
        got = prm16.score(QUESTION, _candidates(16, seed=16), engine=engine)
    S.assert_matches(got, reference("qwen2.5-math-prm", 16), tol=BF16_TOL_VS_FP32, margin=BF16_RANK_MARGIN)


def test_a_cpu_limited_to_avx2_computes_bf16_models_in_fp32(shepherd_dir):
    """oneDNN held to AVX2 (as on an AMD Zen 3) refuses bf16 packing: the engine picks fp32 by itself."""
    import subprocess
    import sys

    script = ("import warnings, torch\n"
              "from mmprm_infer import PRM\n"
              "prm = PRM.from_pretrained(__import__('sys').argv[1], format='math-shepherd', dtype='bfloat16')\n"
              "with warnings.catch_warnings(record=True) as seen:\n"
              "    warnings.simplefilter('always')\n"
              "    prm.score('What is 2 + 3?', [['2 + 3 = 5']], engine='fast')\n"
              "print(prm.engine('fast').describe(prm.adapter)['compute_dtype'], len(seen))\n")
    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-c", script, str(shepherd_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dtype, warned = proc.stdout.split()[-2:]
    assert dtype == "float32" and int(warned) >= 1


def test_warmup_takes_the_one_time_costs_out_of_the_first_call(prms):
    prm = prms["qwen2.5-math-prm"]
    seconds = prm.warmup(prefix_tokens=40, candidates=2, suffix_tokens=20)
    assert set(seconds) == {"choices", "prepare", "first_call"} and all(s >= 0 for s in seconds.values())
    assert prm.warmup(engine="reference") == {}
    S.assert_matches(prm.score(QUESTION, _candidates(3, seed=3)), prm.score(QUESTION, _candidates(3, seed=3),
                                                                             engine="reference"))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_packed_onednn_linears_match_the_torch_path(prms, reference, fmt):
    from mmprm_infer.engines.linear_paths import onednn_available

    if not onednn_available():
        pytest.skip("torch built without oneDNN")
    prm = prms[fmt]
    cands = _candidates(16, seed=16)
    plain = prm.score(QUESTION, cands, engine=FastEngine(linear="torch"))
    engine = FastEngine(linear="onednn")
    assert engine.linear_path(prm.adapter) == "onednn"
    packed = prm.score(QUESTION, cands, engine=engine)
    _close(packed, plain, 1e-5)
    S.assert_matches(packed, reference(fmt, 16))
    assert FastEngine().linear_path(prm.adapter) in ("torch", "onednn")
    with pytest.raises(ValueError, match="linear must be one of"):
        FastEngine(linear="mkl")
