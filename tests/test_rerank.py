"""rerank(): aggregation, strategies and the result object on a real tiny PRM."""

from __future__ import annotations

import math

import pytest
import spread_models as S

from mmprm_infer import PRM, RerankResult, rerank

Q = "What is 6 * 5?"
CANDS = [
    "6 * 5 = 30.\n\nThe answer is \\boxed{30}.",
    "6 * 5 = 11.\n\nThe answer is \\boxed{11}.",
    "Five sixes make 30.\n\nSo \\boxed{30}.",
    "6 + 5 = 11, times nothing.\n\nThe answer is \\boxed{11}.\n\nDone.",
]


@pytest.fixture(scope="module")
def prm(qwen_prm_dir):
    return PRM.from_pretrained(qwen_prm_dir)


def _clip(p, eps=1e-12):  # the rewards are far from 0 and 1 here; the clamp only guards logs and odds
    return min(max(p, eps), 1 - eps)


# Each aggregation written out by hand (MM-PRM's comparison, PRM_FORMATS.md), not through aggregate().
BY_HAND = {
    "min": min, "last": lambda r: r[-1], "mean": lambda r: sum(r) / len(r), "max": max,
    "prod": lambda r: math.prod(r),
    "sum_logprob": lambda r: sum(math.log(_clip(p)) for p in r),
    "sum_logit": lambda r: sum(math.log(_clip(p) / (1 - _clip(p))) for p in r),
    "mean_odd": lambda r: sum(_clip(p) / (1 - _clip(p)) for p in r) / len(r),
}


@pytest.mark.parametrize("agg", sorted(BY_HAND))
def test_best_of_n_picks_the_highest_aggregate(prm, agg):
    res = rerank(Q, CANDS, prm=prm, aggregate=agg)
    assert isinstance(res, RerankResult)
    assert len(res.scores) == len(res.step_rewards) == len(res.answers) == len(CANDS)
    assert [len(r) for r in res.step_rewards] == [2, 2, 2, 3]
    assert res.scores == pytest.approx([BY_HAND[agg](r) for r in res.step_rewards], rel=1e-9)
    direct = prm.score(Q, CANDS)  # the scores are of the PRM's own rewards
    assert [x for r in res.step_rewards for x in r] == pytest.approx([x for r in direct for x in r], abs=1e-6)
    assert res.best_index == max(range(len(CANDS)), key=lambda i: (res.scores[i], -i))
    assert res.best == CANDS[res.best_index]
    assert sorted(res.ranking) == list(range(len(CANDS))) and res.ranking[0] == res.best_index
    assert res.answers == ["30", "11", "30", "11"]


def test_weighted_vote_sums_scores_per_answer(prm):
    res = rerank(Q, CANDS, prm=prm, strategy="weighted_vote", aggregate="mean")
    total = {"30": res.scores[0] + res.scores[2], "11": res.scores[1] + res.scores[3]}
    winner = max(total, key=total.get)
    assert res.answers[res.best_index] == winner
    same = [i for i, a in enumerate(res.answers) if a == winner]
    assert res.best_index == max(same, key=lambda i: res.scores[i])


def test_majority_vote_needs_no_prm():
    res = rerank(Q, CANDS[:3], strategy="majority_vote")
    assert res.scores is None and res.step_rewards is None
    assert res.answers[res.best_index] == "30" and res.best_index == 0


def test_best_of_n_without_prm_is_an_error():
    with pytest.raises(ValueError, match="needs a PRM"):
        rerank(Q, CANDS)


@pytest.fixture(scope="module")
def spread_prm(qwen_prm_dir):
    """The same checkpoint with its rewards spread over (0, 1) (spread_models): default-init rewards sit within
    a few hundredths of 0.5, where a fast engine with a 2 % attention-scale error still agrees to 1e-4."""
    return S.spread_prm(PRM.from_pretrained(qwen_prm_dir))


def test_pre_split_candidates_and_reference_engine_agree(spread_prm):
    split = [c.split("\n\n") for c in CANDS]
    fast = rerank(Q, split, prm=spread_prm)
    ref = rerank(Q, CANDS, prm=spread_prm, engine="reference")
    S.assert_matches(fast.step_rewards, ref.step_rewards)
    assert fast.best_index == ref.best_index and fast.ranking == ref.ranking


def test_single_candidate(prm):
    res = rerank(Q, ["\\boxed{30}"], prm=prm)
    assert res.best_index == 0 and len(res.step_rewards[0]) == 1
    assert res.to_dict()["best"] == "\\boxed{30}"


def test_unreadable_candidates_are_ranked_last_with_their_reason(prm):
    """rerank_batch(unreadable="last"), the path of the server, the vLLM wrapper and the search: a candidate
    the PRM cannot read is ranked last with the score -inf; the others are ranked as rerank ranks them alone."""
    from mmprm_infer import ScoringItem, rerank_batch

    cands = [CANDS[0], "   ", CANDS[1], []]  # a blank solution, and one with no steps at all
    (res,) = rerank_batch([ScoringItem(Q, cands)], prm, "min", unreadable="last")
    alone = rerank(Q, [CANDS[0], CANDS[1]], prm=prm, aggregate="min")
    assert res.ranking == [[0, 2][i] for i in alone.ranking] + [1, 3] and res.best_index == res.ranking[0]
    assert res.scores[1] == res.scores[3] == float("-inf") and res.step_rewards[1] == res.step_rewards[3] == []
    assert res.scores[0] == pytest.approx(alone.scores[0]) and res.scores[2] == pytest.approx(alone.scores[1])
    assert sorted(res.errors) == [1, 3] and all("candidate" in m for m in res.errors.values())
    assert "errors" in res.to_dict() and "errors" not in alone.to_dict()  # mmprm rerank's records are as before
    with pytest.raises(Exception, match="candidate 1"):
        rerank_batch([ScoringItem(Q, cands)], prm, "min")  # the default still fails the batch


def test_batch_then_each_fails_only_the_bad_item():
    from mmprm_infer.prm import batch_then_each

    calls = []

    def run(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    assert batch_then_each(run, ["a", "bad", "c"], lambda item, exc: f"{item}: {exc}") == ["A", "bad: bad item", "C"]
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    calls.clear()
    assert batch_then_each(run, ["bad"], lambda item, exc: None) == [None] and calls == [["bad"]]  # tried once
