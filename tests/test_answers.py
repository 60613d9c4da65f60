"""Final-answer extraction, normalization and equivalence (mmprm_infer.answers)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from mmprm_infer import answers as A
from mmprm_infer.answers import (
    AnswerVerifier,
    answers_equivalent,
    extract_answer,
    group_answers,
    has_answer,
    normalize_answer,
)

# --------------------------------------------------------------------------
# extract_answer
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        # nested braces inside the box
        (r"So the probability is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b^{2}}}}", r"\sqrt{\frac{a}{b^{2}}}"),
        # several boxes: the last one wins
        (r"First try \boxed{3}. Wait, that is wrong. Final: \boxed{4}", "4"),
        # space before the brace, \fbox, and the brace-less form
        (r"Thus \boxed {12}", "12"),
        (r"Thus \fbox{x+1}", "x+1"),
        (r"$\boxed 5$", "5"),
        # escaped braces do not close the box
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        # "The answer is" phrases
        ("Adding them up, the answer is 42.", "42"),
        ("The answer is 3.5", "3.5"),
        ("The final answer is: $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
        ("THE ANSWER IS \\(x = 2\\).", "x = 2"),
        ("The answer is **17**.", "17"),
        ("The answer is 5.\nActually, the answer is 6.", "6"),
        ("The answer is 9. Checking: the answer isn't 8.", "9"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
        # "Answer:" lines, markdown bold or not
        ("**Answer:** 7", "7"),
        ("**Answer**: $\\frac{1}{2}$.", r"\frac{1}{2}"),
        ("Step 2: add them.\nAnswer: 12", "12"),
        ("Final Answer: 3.5", "3.5"),
        ("Answer: 4\nWait, the answer is 5.", "5"),  # the later phrase wins
        ("The answer is 5.\n**Answer:** 6", "6"),
        ("Answer:\nnothing on that line", None),
        # <answer> tags
        ("<think>2+2</think><answer> 4 </answer>", "4"),
        ("<answer>$7$</answer> and later <answer>8</answer>", "8"),
        # nothing to find
        ("I could not solve it.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_order_boxed_beats_later_phrase_and_tags():
    text = r"We get \boxed{10}. The answer is 11. <answer>12</answer>"
    assert extract_answer(text) == "10"
    assert extract_answer("The answer is 11. <answer>12</answer>") == "11"


def test_extract_skips_empty_and_unclosed_boxes():
    # an echoed instruction's empty box does not hide the real answer
    assert extract_answer(r"Put it in \boxed{}. ... The answer is 5.") == "5"
    # a truncated final box falls back to the previous complete one
    assert extract_answer(r"\boxed{2} hmm, maybe \boxed{\frac{3}{") == "2"
    assert extract_answer(r"\boxed{unclosed") is None


def test_extract_none_input():
    assert extract_answer(None) is None


# --------------------------------------------------------------------------
# normalize_answer
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  42 ", "42"),
        ("$42$", "42"),
        (r"\(42\)", "42"),
        ("42.", "42"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\tfrac{1}{2}", r"\frac{1}{2}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"x \rightarrow 1", r"x\rightarrow1"),  # \right inside \rightarrow is kept
        (r"1\!000", "1000"),
        (r"1\,000", "1000"),
        ("1{,}000", "1000"),
        ("1,000", "1000"),
        ("1,234,567.5", "1234567.5"),
        ("1,2", "1,2"),  # a list, not a thousands separator
        ("12,34", "12,34"),
        (r"5\text{ cm}", "5"),
        (r"12 \mbox{ inches}", "12"),
        (r"3\text{ cm}^2", "3"),
        (r"\text{(A)}", "(a)"),
        (r"\text{Yes}", "yes"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"\Delta X", r"\Deltax"),  # command names keep their case
        ("X + Y", "x+y"),
        # Unicode minus signs are minus signs
        ("\u22125", "-5"),
        ("x \u2212 1", "x-1"),
        # e-notation is written out
        ("1e3", "1000"),
        ("2.5E-3", "0.0025"),
        ("1.50e2", "150"),
        ("-4e0", "-4"),
        ("1e100", r"1\times10^{100}"),  # huge exponents are not expanded
        ("x1e3", "x1e3"),  # not a number
        # a percent sign after a number is a unit
        (r"50\%", "50"),
        ("12.5 %", "12.5"),
        (r"\frac{1}{2}\%", r"\frac{1}{2}"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_has_answer():
    assert has_answer("0")
    assert not has_answer(None)
    assert not has_answer("")
    assert not has_answer("  $ $ ")


# --------------------------------------------------------------------------
# answers_equivalent
# --------------------------------------------------------------------------

EQUIVALENT = [
    (r"\frac{1}{2}", "1/2"),  # latex vs plain
    ("1/2", "0.5"),  # fraction vs decimal
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac{3}{4}", "0.75"),
    ("3", "3.0"),
    ("x=3", "3"),  # decided: a single assignment equals its value
    ("x = 3", "3.0"),
    ("1,000", "1000"),
    (r"1\,000", "1000"),
    (r"5\text{ cm}", "5"),
    (r"\text{(A)}", "A"),
    (r"\{1,2\}", r"\{2,1\}"),  # sets ignore order
    ("[2,5]", "[2, 5]"),
    (r"(-\infty, 3]", r"x \le 3"),  # interval vs inequality
    (r"2\sqrt{3}", r"\sqrt{12}"),
    (r"\sqrt{2}", "2^{1/2}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("2^{10}", "1024"),
    (r"\pi r^2", r"r^2\pi"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    ("0.333333", r"\frac{1}{3}"),  # math-verify rounds floats to 6 decimals
    # e-notation is a number
    ("1e3", "1000"),
    ("1e3", "1000.0"),
    ("1E3", "1000"),
    ("2.5e-3", r"\frac{1}{400}"),
    # percent: the sign is a unit and is dropped (MATH-style), so 50% equals 50, not 0.5
    (r"50\%", "50"),
    (r"5\%", "5.0"),
    ("50%", r"50\%"),
    # Unicode minus
    ("\u22125", "-5"),
    ("\u2212\\frac{1}{2}", "-0.5"),
    # plus-minus: both values, in any order
    (r"\pm 3", "3, -3"),
    (r"\pm 3", "-3, 3"),
    (r"x = \pm 3", r"\pm 3"),
    (r"1 \pm \sqrt{2}", r"1\pm\sqrt 2"),
    # unions of intervals ignore order
    (r"(-\infty, 1) \cup (2, \infty)", r"(2,\infty)\cup(-\infty,1)"),
    (r"[1,2]\cup[3,4]", r"[3,4] \cup [1,2]"),
]

NOT_EQUIVALENT = [
    ("3", "4"),
    ("1/2", "0.51"),
    (r"\frac{1}{2}", r"\frac{1}{3}"),
    ("[1,2)", "(1,2)"),  # interval endpoints' openness matters
    ("(1,2]", "[1,2]"),
    ("x=3", "y=3"),  # two assignments to different variables
    ("A", "B"),
    (r"\pi", "3.14159"),
    ("x=3", "4"),
    ("1,000", "1"),
    ("-1", "1"),
    (r"\sqrt{2}", "1.414"),
    ("1e3", "e3"),  # not 3 times Euler's e
    ("1e3", "3e"),
    (r"50\%", "0.5"),  # percent sign dropped, not divided by 100
    (r"5\%", "0.05"),
    ("\u22125", "5"),
    (r"\pm 3", "3"),  # both values, not one
    (r"\pm 3", "-3"),
    (r"(-\infty, 1) \cup (2, \infty)", r"(-\infty, 1] \cup (2, \infty)"),
    (r"[1,2]\cup[3,4]", r"[1,2]\cup[3,5]"),
]


def test_percent_votes_do_not_depend_on_order():
    """With the percent rule a vote's groups are the same in any order (with math-verify's own reading,
    "5%" joined "5" or "0.05", whichever came first)."""
    answers = [r"5\%", "5", "0.05"]
    assert group_answers(answers) == [0, 0, 1]
    assert group_answers(answers[::-1]) == [0, 1, 1]
    assert group_answers(["0.05", r"5\%", "5"]) == [0, 1, 1]


def test_unicode_minus_without_math_verify(no_math_verify):
    assert answers_equivalent("\u22125", "-5.0")  # the sympy fallback reads it too
    assert not answers_equivalent("\u22125", "5")


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent(a, b):
    assert answers_equivalent(a, b)
    assert answers_equivalent(b, a)  # symmetric


@pytest.mark.parametrize("a, b", NOT_EQUIVALENT)
def test_not_equivalent(a, b):
    assert not answers_equivalent(a, b)
    assert not answers_equivalent(b, a)


def test_none_and_empty_never_equal():
    assert not answers_equivalent(None, None)
    assert not answers_equivalent(None, "3")
    assert not answers_equivalent("3", None)
    assert not answers_equivalent("", "")
    assert not answers_equivalent("$ $", "")


def _run_in_worker_thread(fn):
    """fn() in a worker thread (no signal-based timeout there), its result or exception."""
    with ThreadPoolExecutor(max_workers=1) as ex:
        return ex.submit(fn).result()


@pytest.fixture
def math_verify_calls(monkeypatch):
    """The (function name, arguments) of every call this module makes into math-verify."""
    A.clear_caches()
    calls = []
    real = A._call_math_verify

    def spy(fn, *args, timeout_kw):
        calls.append((fn.__name__, args))
        return real(fn, *args, timeout_kw=timeout_kw)

    monkeypatch.setattr(A, "_call_math_verify", spy)
    yield calls
    monkeypatch.undo()
    A.clear_caches()


@pytest.mark.timeout(120)  # a hang guard: without the guards below sympy would run for ever
def test_huge_power_never_reaches_sympy_in_a_worker_thread(math_verify_calls, monkeypatch):
    # sympy would try to expand 9^(9^(9^9)); without signals there is no timeout in a worker
    # thread, so such answers must never reach a sympy comparison or evaluation.
    evaluated = []
    real_value = A._sympy_value.__wrapped__
    monkeypatch.setattr(A, "_sympy_value", lambda s: evaluated.append(s) or real_value(s))
    assert _run_in_worker_thread(A._signal_timeout) is None  # no timeout guards the calls below
    assert _run_in_worker_thread(lambda: answers_equivalent(r"9^{9^{9^{9}}}", "3")) is False
    assert _run_in_worker_thread(lambda: answers_equivalent(r"2^{2^{100}}", r"2^{2^{100}}+1")) is False
    assert _run_in_worker_thread(lambda: answers_equivalent(r"9^{9^{9^{9}}}", r"9^{9^{9^{9}}}")) is True
    # math-verify parsed them (a parse does not evaluate) but was never asked to compare them
    assert [name for name, _ in math_verify_calls if name != "parse"] == []
    assert A._math_verify_parse(A._clean_for_parse(r"9^{9^{9^{9}}}")) == ()  # refused as unsafe
    # the numeric fallback looked at them and refused them before evaluating
    huge = [x for x in evaluated if "^" in x]
    assert len(huge) == 3 and all(real_value(x) is None for x in huge)


def test_timeout_only_in_main_thread():
    in_worker = _run_in_worker_thread(A._signal_timeout)
    assert in_worker is None
    import signal

    if signal.getitimer(signal.ITIMER_REAL)[0] == 0:  # no outer alarm (e.g. pytest-timeout) running
        assert A._signal_timeout() == A.MATH_VERIFY_TIMEOUT_S


def test_thread_safety_matches_serial():
    pairs = [(a, b, True) for a, b in EQUIVALENT] + [(a, b, False) for a, b in NOT_EQUIVALENT]
    pairs += [(f"\\frac{{{i}}}{{{i + 1}}}", f"{i}/{i + 1}", True) for i in range(1, 25)]
    pairs += [(f"{i}", f"{i + 0.5}", False) for i in range(25)]
    A.clear_caches()  # make the threads do the parsing themselves
    with ThreadPoolExecutor(max_workers=8) as ex:
        got = list(ex.map(lambda p: answers_equivalent(p[0], p[1]), pairs))
    assert got == [want for _, _, want in pairs]
    with ThreadPoolExecutor(max_workers=4) as ex:
        groups = list(ex.map(group_answers, [["1/2", "0.5", "3", r"\frac{1}{2}"]] * 8))
    assert groups == [[0, 0, 1, 0]] * 8


@pytest.fixture
def no_math_verify(monkeypatch):
    """Make math-verify fail to parse, so the sympy fallback decides."""
    A.clear_caches()
    monkeypatch.setattr(A, "_math_verify_parse", lambda clean: ())
    yield
    monkeypatch.undo()
    A.clear_caches()


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("2^3", "8", True),
        ("1/2", "0.5", True),
        (r"\frac{1}{3}", "0.333333333333", True),  # within 1e-9 relative
        (r"3\sqrt{2}", r"\sqrt{18}", True),
        (r"\frac{\pi}{2}", "1.5707963267949", True),
        ("1/3", "0.3333", False),  # outside 1e-9 relative
        ("x+1", "1+x", False),  # symbols are not evaluated by the fallback
        ("3", "4", False),
    ],
)
def test_sympy_fallback(no_math_verify, a, b, expected):
    assert answers_equivalent(a, b) is expected


def test_sympy_fallback_never_evaluates_code(no_math_verify):
    assert A._sympy_value("__import__('os').system('true')") is None
    assert A._sympy_value("().__class__") is None
    assert A._sympy_value("exit()") is None
    assert not answers_equivalent("exit()", "quit()")


def test_caches_reused():
    A.clear_caches()
    answers_equivalent("7/8", "0.875")
    hits = A._math_verify_parse.cache_info().hits
    answers_equivalent("0.875", "7/8")  # pair cache: no new parse at all
    assert A._math_verify_parse.cache_info().hits == hits
    answers_equivalent("7/8", "0.8750")
    assert A._math_verify_parse.cache_info().hits > hits  # "7/8" parsed once


# --------------------------------------------------------------------------
# group_answers
# --------------------------------------------------------------------------


def test_group_answers_first_seen_ids():
    answers = ["1/2", None, "0.5", "3", "", r"\frac12", "x=3", "4", None]
    # None / "" each get a singleton group of their own
    assert group_answers(answers) == [0, 1, 0, 2, 3, 0, 2, 4, 5]


def test_group_answers_against_representative():
    # "x=3"~"3" and "y=3"~"3", but "x=3" !~ "y=3": joining is decided by
    # each group's first member.
    assert group_answers(["3", "x=3", "y=3"]) == [0, 0, 0]
    assert group_answers(["x=3", "y=3", "3"]) == [0, 1, 0]


def test_group_answers_custom_equivalence():
    same_parity = lambda a, b: int(a) % 2 == int(b) % 2  # noqa: E731
    assert group_answers(["1", "2", "3", "4"], equivalent=same_parity) == [0, 1, 0, 1]


def test_group_answers_many_numbers_skip_the_symbolic_comparison(math_verify_calls):
    """A vote over 64 numeric answers: clearly different numbers never go to math-verify's slow
    symbolic comparison (the fast path of _clearly_different_numbers), equal ones match as strings."""
    answers = [f"\\frac{{{i % 23}}}{{7}}" for i in range(64)]
    ids = group_answers(answers)
    assert len(set(ids)) == 23 and ids[:23] == list(range(23)) and ids[23:] == [i % 23 for i in range(23, 64)]
    assert [name for name, _ in math_verify_calls if name != "parse"] == []
    assert len([1 for name, _ in math_verify_calls if name == "parse"]) == 23  # each distinct answer once


# --------------------------------------------------------------------------
# AnswerVerifier
# --------------------------------------------------------------------------


def test_verifier_full_solution_and_bare_answer():
    verify = AnswerVerifier()
    solution = "Step 1: half of the pie.\n\nStep 2: so it is $\\boxed{\\frac{1}{2}}$."
    assert verify(solution, "0.5")
    assert verify("1/2", "0.5")  # bare short answer
    assert not verify(solution, "0.25")
    # a long text without an answer marker has no answer
    assert not verify("Step 1: I think.\n\nStep 2: still thinking 0.5", "0.5")
    assert not verify(None, "0.5")


def test_verifier_reference_may_be_a_solution():
    verify = AnswerVerifier()
    assert verify("The answer is 12.", r"Add 5 and 7 to get $\boxed{12}$.")


def test_verifier_custom_judge_gets_extracted_answers():
    seen = []

    def judge(pred, ref):
        seen.append((pred, ref))
        return pred is not None and pred.strip().lower() == ref.lower()

    verify = AnswerVerifier(judge=judge)
    assert verify(r"... so \boxed{Paris}", "paris")
    assert not verify("no idea\nat all", "paris")
    assert seen == [("Paris", "paris"), (None, "paris")]


def test_verifier_custom_extractor():
    verify = AnswerVerifier(extract=lambda text: text.split("####")[-1].strip() if "####" in text else None)
    assert verify("48 / 2 = 24\n#### 24", "24")


def test_verifier_reference_none_is_an_error():
    with pytest.raises(ValueError, match="reference"):
        AnswerVerifier()("3", None)
