"""Progress bars: a live bar on a terminal, one line per stage in a log (mmprm_infer.io.progress)."""

from __future__ import annotations

import io

from tqdm import tqdm

from mmprm_infer.io.progress import StageLine, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_gets_one_line_per_stage():
    log = io.StringIO()
    total = 0
    for i in progress_bar(range(250), desc="train PRM", unit="steps", file=log):
        total += i
    assert total == sum(range(250))  # every item passes through
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in log.getvalue()
    assert lines[0].startswith("train PRM: 250/250 steps in ")


def test_manual_updates_and_postfix_reach_the_line():
    log = io.StringIO()
    with progress_bar(total=10, desc="annotate", unit="q", initial=2, file=log) as bar:
        assert isinstance(bar, StageLine)
        for _ in range(8):
            bar.update(1)
        bar.set_postfix(rollouts=64, rollouts_per_s="12.5")
    bar.close()  # a second close prints nothing more
    lines = log.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("annotate: 10/10 q in ") and lines[0].endswith("(rollouts=64, rollouts_per_s=12.5)")


def test_a_stage_cut_short_says_how_far_it_got():
    log = io.StringIO()
    for i in progress_bar(range(100), desc="score", file=log):
        if i == 9:
            break
    assert log.getvalue().startswith("score: 9/100 it in ")


def test_terminal_gets_a_live_tqdm_bar_and_disable_prints_nothing():
    term = _Terminal()
    bar = progress_bar(range(3), desc="x", file=term)
    assert isinstance(bar, tqdm) and not bar.disable
    list(bar)
    assert "\r" in term.getvalue()
    log = io.StringIO()
    assert list(progress_bar(range(3), desc="x", disable=True, file=log)) == [0, 1, 2]
    assert log.getvalue() == ""
