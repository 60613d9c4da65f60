"""Tree-shaped K/V cache (exact, counts its work, bounded) and PRM-guided step search (beam search, DVTS).

The PRMs are the conftest's tiny checkpoints with spread rewards
(``spread_models``), compared with the reference at fp32's tolerance; a tree
cache with a broken attention (scale, positions, prefix length) fails that
comparison (``test_broken_tree_cache_fails_the_check``).
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import spread_models as S
import torch
from PIL import Image

from mmprm_infer import PRM
from mmprm_infer.engines.tree_cache import TreeCacheEngine
from mmprm_infer.integrations.policy import TransformersPolicy
from mmprm_infer.integrations.search import SearchConfig, beam_search, dvts, sample_steps, search
from mmprm_infer.policy import PolicyPrompt, join_steps
from mmprm_infer.testing.tiny import build_tiny_causal_lm

QUESTION = "Janet's ducks lay 16 eggs per day. She eats three and bakes with four. How many are left?"
WORDS = ("the area is 12 5 = 60 half of so we compute x + y and eggs per day sells remainder market "
         "triangle angle 30 degrees sum two largest bars apples then multiply divide add count rows").split()
FORMATS = {"math-shepherd": "shepherd_dir", "qwen2.5-math-prm": "qwen_prm_dir", "custom": "custom_dir"}
# tree cache against the reference on the spread models, fp32: measured max |difference| 5e-7
TOL = S.FP32_TOL


def _step(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))


def _assert_close(got, ref, tol=TOL):
    S.assert_matches(got, ref, tol)


@pytest.fixture(scope="module", params=sorted(FORMATS))
def prm(request):
    path = request.getfixturevalue(FORMATS[request.param])
    options = {"step_tag": "<step>"} if request.param == "custom" else {}
    return S.spread_prm(PRM.from_pretrained(path, format=request.param, dtype=torch.float32, **options))


def _rounds(seed=0, rounds=4, width=3, per_beam=3):
    """Candidate lists of a beam search: each round extends `width` surviving beams by one step each."""
    rng = random.Random(seed)
    beams = [[]]
    for _ in range(rounds):
        cands = [b + [_step(rng)] for b in beams for _ in range(per_beam)]
        yield cands
        beams = [cands[i] for i in rng.sample(range(len(cands)), min(width, len(cands)))]


def _needed(prm, cands):
    """Token ids per candidate up to its last reward position (what a causal PRM must see)."""
    enc = prm.encode(QUESTION, cands)
    return [c.input_ids[:c.reward_positions[-1] + 1] for c in enc.candidates]


# --------------------------------------------------------------------------
# tree cache: exactness and work
# --------------------------------------------------------------------------


def test_tree_cache_equals_reference_over_rounds(prm):
    engine = TreeCacheEngine()
    every = []
    for cands in _rounds():
        ref = _reference(prm, cands)
        _assert_close(prm.score(QUESTION, cands, engine=engine), ref)
        every += ref
    S.assert_spread(every)  # rewards over most of (0, 1): errors show


_REFERENCE: dict = {}


def _reference(prm, cands):
    """Reference rewards of cands, cached per PRM and candidate list (the PRMs are module fixtures)."""
    key = (prm, repr(cands))  # the PRM itself, not its id: a freed PRM's id could come back
    if key not in _REFERENCE:
        _REFERENCE[key] = prm.score(QUESTION, cands, engine="reference")
    return _REFERENCE[key]


@pytest.mark.parametrize("broken", sorted(set(S.BROKEN) - S.FAST_ONLY))
def test_broken_tree_cache_fails_the_check(prm, broken):
    """The comparison above fails for a tree cache whose attention is deliberately broken."""
    rounds = list(_rounds(rounds=2))  # round 2 reuses round 1's cached K/V
    refs = [_reference(prm, cands) for cands in rounds]
    engine = TreeCacheEngine()
    with S.BROKEN[broken]():
        got = [prm.score(QUESTION, cands, engine=engine) for cands in rounds]
    with pytest.raises(AssertionError):
        for g, r in zip(got, refs):
            _assert_close(g, r)
    assert max(S.max_difference(g, r) for g, r in zip(got, refs)) > 100 * TOL


def test_tree_cache_edge_cases_equal_reference(prm):
    """Duplicates, a candidate that is a prefix of another, one fully cached, a split inside a cached run."""
    engine = TreeCacheEngine(max_batch_tokens=7)  # long runs are cut into chunks of 7 tokens
    a = ["the area is 12 times 5", "so half of it is 30"]
    b = a + ["the answer is 30"]
    first = [a, b, list(a)]
    _assert_close(prm.score(QUESTION, first, engine=engine), prm.score(QUESTION, first, engine="reference"))
    # a again (fully cached: nothing to run), a step diverging in the middle of a cached step, a new question
    second = [a, ["the area is 12 plus 5", "so"], b[:1]]
    got = prm.score(QUESTION, second, engine=engine)
    assert engine.stats.last.computed_tokens < engine.stats.last.requested_tokens
    _assert_close(got, prm.score(QUESTION, second, engine="reference"))
    other = prm.score("A different question?", second, engine=engine)
    _assert_close(other, prm.score("A different question?", second, engine="reference"))
    again = prm.score(QUESTION, [a, b], engine=engine)
    assert engine.stats.last.computed_tokens == 0
    _assert_close(again, prm.score(QUESTION, [a, b], engine="reference"))


def test_tree_cache_computes_only_new_tokens(prm):
    """Each round runs exactly the token prefixes no earlier round ran: ~ the new step, not the solution."""
    engine = TreeCacheEngine()
    seen: set[tuple[int, ...]] = set()
    for r, cands in enumerate(_rounds(seed=3, rounds=5)):
        prm.score(QUESTION, cands, engine=engine)
        needed = _needed(prm, cands)
        prefixes = {tuple(ids[:k]) for ids in needed for k in range(1, len(ids) + 1)}
        expected = len(prefixes - seen)
        seen |= prefixes
        stats = engine.stats.last
        assert stats.computed_tokens == expected, (r, stats)
        assert stats.requested_tokens == sum(len(ids) for ids in needed)
        if r >= 1:
            # Rough bound: the new step's text (tokens of the step and its marker) per candidate.
            new_step_tokens = sum(len(prm.tokenizer.encode(" " + c[-1], add_special_tokens=False)) + 6 for c in cands)
            assert stats.computed_tokens <= new_step_tokens, (r, stats, new_step_tokens)
            assert stats.computed_tokens < 0.5 * stats.requested_tokens, (r, stats)


def test_tree_cache_lru_bound_stays_exact(prm):
    engine = TreeCacheEngine(max_cache_bytes=40_000)
    for cands in _rounds(seed=5, rounds=4):
        got = prm.score(QUESTION, cands, engine=engine)
        assert engine.cached_bytes <= 40_000
        _assert_close(got, prm.score(QUESTION, cands, engine="reference"))
    assert sum(c.evicted_tokens for c in engine.stats.calls) > 0
    # Everything evicted: still exact, recomputed.
    engine.max_cache_bytes = 0
    cands = next(_rounds(seed=6, rounds=1))
    prm.score(QUESTION, cands, engine=engine)
    assert engine.cached_bytes == 0 and engine.num_nodes() == 0
    _assert_close(prm.score(QUESTION, cands, engine=engine), prm.score(QUESTION, cands, engine="reference"))
    assert engine.stats.last.computed_tokens > 0


def test_tree_cache_batches_several_questions(prm):
    engine = TreeCacheEngine()
    items = [(QUESTION, [["a b c", "d e"], ["a b c"]]), ("Another question", [["a b c"], ["x y", "z"]])]
    got = prm.score_batch(items, engine=engine)
    ref = prm.score_batch(items, engine="reference")
    for g, r in zip(got, ref):
        _assert_close(g, r)


def _noise_image(width, height, seed):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def test_tree_cache_keys_images(image_sensitive_mm_prm):
    """Same text, different images: separate trees, each equal to the reference."""
    mm = image_sensitive_mm_prm
    engine = TreeCacheEngine()
    cands = [["The base is 6.", "Area is 12."], ["The base is 6.", "Area is 24."]]
    results = []
    for seed in (1, 2, 1):
        image = _noise_image(64, 64, seed)
        got = mm.score(QUESTION, cands, image=image, engine=engine)
        _assert_close(got, mm.score(QUESTION, cands, image=image, engine="reference"))
        results.append((got, engine.stats.last.computed_tokens))
    assert results[0][0] != results[1][0]  # the image matters
    assert results[1][1] > 256  # a new image: its tokens run again
    assert results[2][1] == 0  # the first image again: all cached


# --------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------


class ScriptedPolicy:
    """Writes `depth` steps then a boxed answer; deterministic per (prompt, call)."""

    def __init__(self, depth=3):
        self.depth = depth
        self.calls = []

    def generate(self, prompts, n=1, **sampling):
        self.calls.append((len(prompts), n, dict(sampling)))
        out = []
        for p in prompts:
            rows = []
            for j in range(n):
                rng = random.Random(
                    zlib.crc32(f"{p.question}|{join_steps(p.partial_steps)}|{j}|{sampling.get('seed')}".encode()))
                k = len(p.partial_steps)
                steps = [_step(rng) for _ in range(max(0, self.depth - k))]
                steps.append(f"so the answer is \\boxed{{{rng.randint(1, 3)}}}")
                rows.append(join_steps(steps))
            out.append(rows)
        return out


@pytest.fixture(scope="module")
def shepherd(shepherd_dir):
    return S.spread_prm(PRM.from_pretrained(shepherd_dir, format="math-shepherd", dtype=torch.float32))


def test_sample_steps_keeps_the_first_step():
    policy = ScriptedPolicy(depth=2)
    rows = sample_steps(policy, [PolicyPrompt(QUESTION)], 3, {})
    assert all(len(s.steps) == 1 and not s.finished for s in rows[0])
    rows = sample_steps(policy, [PolicyPrompt(QUESTION, partial_steps=["a", "b"])], 2, {})
    assert all(s.finished and "boxed" in s.steps[0] for s in rows[0])  # only the answer step was left
    rows = sample_steps(policy, [PolicyPrompt(QUESTION)], 2, {}, to_end=True)
    assert all(s.finished and len(s.steps) == 3 for s in rows[0])


def test_beam_search(shepherd):
    policy = ScriptedPolicy(depth=3)
    config = SearchConfig(beam_width=2, n_per_beam=3, max_steps=6, seed=7)
    result = beam_search(QUESTION, policy, shepherd, config)
    assert result.best is not None and result.best.finished and "boxed" in result.best.steps[-1]
    assert result.rounds[0].prompts == 1 and result.rounds[0].candidates == 6
    assert all(r.prompts <= 2 for r in result.rounds)
    assert len(result.rounds) == 4  # 3 steps, then the answer step ends every beam
    # The pool is ranked by the final aggregation ("last") and the best is its head.
    scores = [c.step_rewards[-1] for c in result.candidates]
    assert scores == sorted(scores, reverse=True) and result.best is result.candidates[0]
    assert len(result.candidates) <= 6
    ref = shepherd.score(QUESTION, [c.steps for c in result.candidates], engine="reference")
    _assert_close([c.step_rewards for c in result.candidates], ref)
    # From round 1 on, the PRM runs about the new step only.
    for r in result.rounds[1:]:
        assert r.prm_computed_tokens < 0.5 * r.prm_requested_tokens


def test_beam_search_keeps_top_beams(shepherd):
    """After each round the survivors are the top beam_width open candidates by the aggregate."""
    seen_prompts = []

    class Recording(ScriptedPolicy):
        def generate(self, prompts, n=1, **sampling):
            seen_prompts.append([tuple(p.partial_steps) for p in prompts])
            return super().generate(prompts, n, **sampling)

    config = SearchConfig(beam_width=2, n_per_beam=2, max_steps=3, aggregate="min", seed=1)
    beam_search(QUESTION, Recording(depth=5), shepherd, config)
    # round 1's prompts are the 2 best of round 0's 4 one-step candidates by min reward
    round0 = Recording(depth=5).generate([PolicyPrompt(QUESTION)], 4, seed=1)[0]
    firsts = [[t.split("\n\n")[0]] for t in round0]
    rewards = shepherd.score(QUESTION, firsts, engine="reference")
    best2 = sorted(range(4), key=lambda i: -min(rewards[i]))[:2]
    assert sorted(seen_prompts[1]) == sorted(tuple(firsts[i]) for i in best2)


def test_dvts(shepherd):
    policy = ScriptedPolicy(depth=2)
    config = SearchConfig(beam_width=3, n_per_beam=2, max_steps=5, seed=3)
    result = dvts(QUESTION, policy, shepherd, config)
    assert result.method == "dvts"
    assert result.rounds[0].prompts == 1 and result.rounds[0].candidates == 6  # one root prompt, dealt out
    assert all(r.prompts <= 3 for r in result.rounds)
    assert len(result.candidates) == 6  # each subtree's last round
    assert all(c.finished for c in result.candidates)
    assert result.best is result.candidates[0]
    assert result.best.step_rewards[-1] == max(c.step_rewards[-1] for c in result.candidates)


def test_search_last_round_writes_to_the_end(shepherd):
    result = search(QUESTION, ScriptedPolicy(depth=6), shepherd, "beam_search",
                    SearchConfig(beam_width=2, n_per_beam=2, max_steps=2, seed=0))
    assert len(result.rounds) == 2
    assert all(len(c.steps) == 7 and c.finished for c in result.candidates)
    with pytest.raises(ValueError, match="unknown search method"):
        search(QUESTION, ScriptedPolicy(), shepherd, "mcts")
    with pytest.raises(ValueError, match="beam_width"):
        SearchConfig(beam_width=0)


def test_search_with_transformers_policy(shepherd, tmp_path):
    """A real transformers policy (tiny random model) through the generic Policy path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_causal_lm(tmp_path / "policy", arch="qwen2", extra_tokens=(), seed=11)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    policy = TransformersPolicy(model, tok, seed=0, max_new_tokens=12)
    config = SearchConfig(beam_width=2, n_per_beam=2, max_steps=2, seed=0,
                          sampling={"temperature": 1.0, "top_p": 1.0, "top_k": 50})
    result = beam_search(QUESTION, policy, shepherd, config)
    assert result.rounds and result.rounds[0].candidates <= 4
    for c in result.candidates:
        assert c.finished and c.step_rewards


def test_tree_cache_by_name_keeps_its_cache(shepherd):
    cands = [["we compute x", "so x is 5"], ["we compute y"]]
    first = shepherd.score(QUESTION, cands, engine="tree_cache")
    engine = shepherd.engine("tree_cache")
    assert isinstance(engine, TreeCacheEngine) and engine.stats.last.computed_tokens > 0
    assert shepherd.score(QUESTION, cands, engine="tree_cache") == first
    assert engine.stats.last.computed_tokens == 0
