"""Selection strategies (mmprm_infer.selection)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from mmprm_infer.selection import STRATEGIES, Selection, get_strategy, select

# Six candidates where the three strategies disagree:
#   best_of_n      -> 5 ("3", the single highest score 0.9)
#   weighted_vote  -> 0 ("12" and "24/2" sum to 1.1 > 0.9 > 0.65)
#   majority_vote  -> the "7" group (three members, low scores)
ANSWERS = ["12", "7", "7", "7.0", r"\frac{24}{2}", "3"]
SCORES = [0.6, 0.2, 0.25, 0.2, 0.5, 0.9]
GROUPS = [0, 1, 1, 1, 0, 2]


def test_strategies_pick_different_candidates():
    bon = select("best_of_n", SCORES, ANSWERS)
    wv = select("weighted_vote", SCORES, ANSWERS)
    mv = select("majority_vote", SCORES, ANSWERS)
    mv_plain = select("majority_vote", None, ANSWERS)
    assert (bon.best_index, wv.best_index, mv.best_index, mv_plain.best_index) == (5, 0, 2, 1)
    for sel in (bon, wv, mv, mv_plain):
        assert sel.group_ids == GROUPS
        assert sorted(sel.ranking) == list(range(len(ANSWERS)))
        assert sel.ranking[0] == sel.best_index


def test_best_of_n_ranking_and_ties():
    sel = select("best_of_n", SCORES, ANSWERS)
    assert sel.ranking == [5, 0, 4, 2, 1, 3]  # 1 and 3 tie at 0.2: lower index first
    assert sel.group_scores == {}
    tied = select("best_of_n", [0.7, 0.9, 0.9, 0.1], ["1", "2", "3", "4"])
    assert tied.best_index == 1
    assert tied.ranking == [1, 2, 0, 3]


def test_best_of_n_ignores_answers():
    # best_of_n picks by score alone, even a candidate without an answer
    sel = select("best_of_n", [0.1, 0.99], ["3", None])
    assert sel.best_index == 1


def test_best_of_n_accepts_negative_scores():
    sel = select("best_of_n", [-3.0, -0.5, -2.0], ["1", "2", "3"])  # sum_logprob scores
    assert sel.ranking == [1, 2, 0]


def test_weighted_vote_sums_and_ranking():
    sel = select("weighted_vote", SCORES, ANSWERS)
    assert sel.group_scores == pytest.approx({0: 1.1, 1: 0.65, 2: 0.9})
    # winning group by score, then group "3" (0.9), then group "7" (0.65) by score
    assert sel.ranking == [0, 4, 5, 2, 1, 3]


def test_weighted_vote_tie_goes_to_earliest_group():
    sel = select("weighted_vote", [0.5, 0.5, 0.5, 0.5], ["1", "2", "2", "1"])
    assert sel.group_scores == {0: 1.0, 1: 1.0}
    assert sel.best_index == 0
    assert sel.ranking == [0, 3, 1, 2]


def test_weighted_vote_best_member_of_winning_group():
    sel = select("weighted_vote", [0.4, 0.3, 0.5, 0.6], ["2", "1", "1", "2"])
    assert sel.group_scores == pytest.approx({0: 1.0, 1: 0.8})
    assert sel.best_index == 3
    assert sel.ranking == [3, 0, 2, 1]


def test_majority_vote_counts_and_ranking():
    sel = select("majority_vote", SCORES, ANSWERS)
    assert sel.group_scores == {0: 2.0, 1: 3.0, 2: 1.0}
    assert sel.ranking == [2, 1, 3, 0, 4, 5]
    plain = select("majority_vote", None, ANSWERS)
    assert plain.ranking == [1, 2, 3, 0, 4, 5]


def test_majority_vote_ties():
    answers = ["4", "5", "5", "4"]
    # no scores: the group seen first, represented by its first candidate
    assert select("majority_vote", None, answers).best_index == 0
    # scores break the tie between equally large groups (sum 1.7 vs 0.2)
    sel = select("majority_vote", [0.1, 0.8, 0.9, 0.1], answers)
    assert sel.best_index == 2
    assert sel.ranking == [2, 1, 0, 3]


def test_majority_vote_with_negative_scores():
    sel = select("majority_vote", [-5.0, -0.1, -0.2, -4.0], ["4", "5", "5", "4"])
    assert sel.best_index == 1


def test_no_answer_never_wins_a_vote():
    answers = [None, "3", None, ""]
    scores = [0.99, 0.1, 0.98, 0.97]
    for strategy in ("weighted_vote", "majority_vote"):
        sel = select(strategy, scores, answers)
        assert sel.best_index == 1
        assert sel.ranking[0] == 1
        assert sel.group_ids == [0, 1, 2, 3]  # a singleton group per missing answer
    # unanswered candidates rank after every answered one, even with bigger weight
    many_none = select("majority_vote", None, [None, None, None, "8", "9", "9"])
    assert many_none.best_index == 4
    assert many_none.ranking == [4, 5, 3, 0, 1, 2]


def test_no_candidate_has_an_answer_falls_back():
    answers = [None, None, ""]
    assert select("majority_vote", None, answers).best_index == 0
    assert select("majority_vote", [0.1, 0.7, 0.3], answers).best_index == 1
    sel = select("weighted_vote", [0.1, 0.7, 0.3], answers)
    assert sel.best_index == 1
    assert sel.ranking == [1, 2, 0]


def test_single_candidate():
    for strategy in STRATEGIES:
        assert select(strategy, [0.4], ["1"]).best_index == 0
        assert select(strategy, [0.4], [None]).ranking == [0]


def test_precomputed_group_ids_are_used():
    # the caller's grouping wins over answer equivalence
    sel = select("majority_vote", None, ["1", "2", "3"], group_ids=[0, 1, 1])
    assert sel.best_index == 1
    assert sel.group_ids == [0, 1, 1]


def test_numpy_scores_accepted():
    sel = select("weighted_vote", np.array(SCORES, dtype=np.float32), ANSWERS)
    assert sel.best_index == 0
    assert isinstance(sel.group_scores[0], float)


def test_selection_is_frozen():
    sel = select("best_of_n", [0.1], ["1"])
    assert isinstance(sel, Selection)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.best_index = 3


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def test_empty_candidates():
    for strategy in STRATEGIES:
        with pytest.raises(ValueError, match="no candidates"):
            select(strategy, [], [])


def test_length_mismatch():
    with pytest.raises(ValueError, match=r"3 scores for 2 candidates"):
        select("best_of_n", [0.1, 0.2, 0.3], ["1", "2"])
    with pytest.raises(ValueError, match=r"1 group ids for 2 candidates"):
        select("majority_vote", None, ["1", "2"], group_ids=[0])


def test_nan_scores():
    with pytest.raises(ValueError, match=r"candidate 1 is NaN"):
        select("weighted_vote", [0.1, math.nan, 0.3], ["1", "2", "3"])
    with pytest.raises(ValueError, match="NaN"):
        select("majority_vote", [math.nan], ["1"])


def test_non_numeric_scores():
    with pytest.raises(ValueError, match="numbers"):
        select("best_of_n", ["high", "low"], ["1", "2"])


@pytest.mark.parametrize("strategy", ["best_of_n", "weighted_vote"])
def test_scores_required(strategy):
    with pytest.raises(ValueError, match="majority_vote"):
        select(strategy, None, ["1", "2"])


def test_weighted_vote_rejects_negative_scores():
    with pytest.raises(ValueError, match=r"non-negative.*candidate 1.*min, mean, prod, last or max"):
        select("weighted_vote", [0.2, -1.5, -0.3], ["1", "2", "3"])


def test_unknown_strategy_lists_names():
    with pytest.raises(ValueError, match=r"best_of_n.*majority_vote.*weighted_vote"):
        get_strategy("beam")
    with pytest.raises(ValueError, match="unknown selection strategy 'beam'"):
        select("beam", [0.1], ["1"])


def test_registry():
    assert set(STRATEGIES) == {"best_of_n", "weighted_vote", "majority_vote"}
    assert get_strategy("weighted_vote") is STRATEGIES["weighted_vote"]
