"""Final answers: pull one out of a solution, and decide when two are equal.

Best-of-N voting compares every pair of candidate answers, and the trainer
checks every rollout against a reference, so this module is three small
layers, each cached on its input string:

1. ``extract_answer``: solution text -> the answer string it commits to.
2. ``normalize_answer``: answer -> a canonical string (cheap exact match).
3. ``answers_equivalent``: exact match of the normalized strings, else
   math-verify (symbolic / numeric equality), else a small, restricted sympy
   numeric check for the cases math-verify could not parse.

Threads: math-verify guards its sympy work with ``signal.alarm``, which only
works in the main thread (elsewhere it raises).  Here its timeout is used in
the main thread only; in worker threads math-verify runs without one.  To
keep an untimed call from hanging a worker on adversarial input (for example
``9^{9^{9^{9}}}``, which sympy would try to expand), answers longer than
``MAX_PARSE_CHARS`` and parsed expressions with huge exponents or factorials
never reach math-verify's comparison; they are compared as normalized strings
only.

Speed: two answers that both parse to plain numbers differing by more than
math-verify could ever call equal skip its (slow) symbolic comparison, so a
vote over 64 numeric candidates takes a fraction of a second.
"""

from __future__ import annotations

import cmath
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Sequence
from decimal import Decimal
from functools import lru_cache

__all__ = [
    "extract_answer",
    "normalize_answer",
    "answers_equivalent",
    "group_answers",
    "has_answer",
    "AnswerVerifier",
    "clear_caches",
]

# Seconds math-verify may spend on one parse / one comparison (main thread
# only; see the module docstring).  Set to None to never use signals.
MATH_VERIFY_TIMEOUT_S: int | None = 5
# Longer answer strings are compared as normalized strings only.
MAX_PARSE_CHARS = 400
# A parsed answer holding a power with a numeric exponent larger than this in
# magnitude (or a factorial of a larger number) is not handed to sympy.
MAX_SAFE_EXPONENT = 100_000
# Relative tolerance of the sympy numeric fallback.
NUMERIC_REL_TOL = 1e-9

_CACHE_SIZE = 1 << 16


# --------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------
#
# Order (first that finds a non-empty answer wins):
#   1. the last \boxed{...} / \boxed {...} / \fbox{...} (also "\boxed 5")
#      - what math PRM setups prompt for (Qwen2.5-Math-PRM's system prompt,
#        MM-PRM / VisualPRM policies) and what MATH-style graders read;
#   2. the last "The answer is ..." / "the final answer is ..." phrase
#      (math-shepherd / GSM8K / Minerva style) or "Answer: ..." line
#      ("**Answer:** 7", "Final Answer: 12"), whichever comes last;
#   3. the last <answer>...</answer> block (R1-style tags).
# A boxed answer wins over a later phrase because the phrase often just
# restates it ("The final answer is $\boxed{3}$" finds 3 either way).
# Empty boxes (e.g. an echoed "put your answer in \boxed{}") are skipped.

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"\banswer\s+is\b\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
# "Answer: 7", "**Answer:** 7", "**Answer**: 7", "Final Answer: 7"
_ANSWER_COLON_RE = re.compile(r"\banswer\b[ \t]*(?:\*\*)?[ \t]*:[ \t]*(?:\*\*)?[ \t]*([^\n]*)", re.IGNORECASE)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


def _braced_argument(text: str, i: int) -> str | None:
    """Content of the balanced {...} starting at text[i] == '{'; None if unclosed.

    Escaped characters (\\{, \\}, \\\\) do not count as braces.
    """
    depth = 0
    j = i
    n = len(text)
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def _box_argument(text: str, pos: int) -> str | None:
    """Argument of a \\boxed whose name ends at ``pos``."""
    i = pos
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced_argument(text, i)
    if i > pos:  # "\boxed 5": one whitespace-free token
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


def _last_boxed(text: str) -> str | None:
    for m in reversed(list(_BOX_RE.finditer(text))):
        content = _box_argument(text, m.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def _strip_delimiters(s: str) -> str:
    """Strip surrounding whitespace, markdown bold and $...$, \\(...\\), \\[...\\]."""
    prev = None
    while s != prev:
        prev = s
        s = s.strip()
        if len(s) >= 4 and s.startswith("**") and s.endswith("**"):
            s = s[2:-2]
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)]
                break
    return s


def _clean_phrase_answer(s: str) -> str:
    m = _SENTENCE_END_RE.search(s)  # "42. Let me check" -> "42" (3.5 is kept whole)
    if m:
        s = s[: m.start()]
    s = s.strip().rstrip(".").strip()
    s = _strip_delimiters(s)
    return s.rstrip(".").strip()


def extract_answer(text: str | None) -> str | None:
    """The final answer a solution commits to, or None if it names none.

    Order: last ``\\boxed{}``/``\\fbox{}`` (balanced nested braces), else the
    last "The answer is ..." / "the final answer is ..." / "Answer: ..." /
    "**Answer:** ..." (case-insensitive; the rest of that line up to the
    first sentence end, with a trailing period, ``is:``, surrounding
    ``$``/``\\(\\)``/``\\[\\]``/``**`` removed), else the last
    ``<answer>...</answer>``.
    """
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    # Both phrasings, latest first ("Final Answer: The final answer is 5" finds 5: the inner phrase
    # starts later than the line's "Answer:").
    phrases = [*_ANSWER_IS_RE.finditer(text), *_ANSWER_COLON_RE.finditer(text)]
    for m in sorted(phrases, key=lambda m: m.start(1), reverse=True):
        ans = _clean_phrase_answer(m.group(1))
        if ans:
            return ans
    for m in reversed(list(_ANSWER_TAG_RE.finditer(text))):
        ans = _strip_delimiters(m.group(1)).rstrip(".").strip()
        if ans:
            return ans
    return None


# --------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------

_TEXT_CMDS = r"(?:text|textrm|textbf|mathrm|mbox)"
_UNIT_SUFFIX_RE = re.compile(
    r"^(?P<value>.*\d.*?)\s*\\" + _TEXT_CMDS + r"\{\s*[A-Za-z][A-Za-z\s.]*\}(?:\^\{?\d\}?)?$"
)
_TEXT_WRAPPER_RE = re.compile(r"\\" + _TEXT_CMDS + r"\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
# A number in e-notation ("1e3", "2.5E-4"), not part of a longer word or number.
_SCI_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
# Decimal exponents up to this size are written out in full ("1e3" -> "1000"); larger ones as
# mantissa \times 10^{exponent}.
_SCI_MAX_EXPAND = 50
# A percent sign after a number (or a closing brace: "\frac{1}{2}\%").
_PERCENT_RE = re.compile(r"(?<=[\d}])\s*\\?%")
_UNICODE_MINUS = {"\u2212": "-", "\ufe63": "-", "\uff0d": "-"}


def _plain_number(match: re.Match) -> str:
    mantissa, exponent = match.group(1), int(match.group(2))
    if abs(exponent) > _SCI_MAX_EXPAND:
        return f"{mantissa}\\times10^{{{exponent}}}"
    text = format(Decimal(f"{mantissa}e{exponent}"), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _numbers_and_units(s: str) -> str:
    """Shared by normalize_answer and the parse cleanup: Unicode minus signs become "-", numbers in
    e-notation are written out ("1e3" -> "1000"), percent signs after a number are dropped (a unit:
    "50\\%" -> "50")."""
    for minus, ascii_minus in _UNICODE_MINUS.items():
        s = s.replace(minus, ascii_minus)
    s = _SCI_RE.sub(_plain_number, s)
    return _PERCENT_RE.sub("", s)


@lru_cache(maxsize=_CACHE_SIZE)
def normalize_answer(s: str) -> str:
    """A canonical string for cheap exact comparison.  Rules, in order:

    1. strip surrounding whitespace, ``**``, ``$..$``, ``\\(..\\)``,
       ``\\[..\\]``, then drop every remaining ``$``; Unicode minus signs
       become ``-``; numbers in e-notation are written out (``1e3`` ->
       ``1000``, ``2.5E-3`` -> ``0.0025``; exponents beyond 50 as
       ``m\\times10^{e}``); a percent sign after a number is dropped, as a
       unit (``50\\%`` -> ``50``: see ``answers_equivalent``);
    2. ``\\dfrac`` / ``\\tfrac`` -> ``\\frac`` (same value, display size only);
    3. drop ``\\left`` / ``\\right`` (sizing only; ``\\rightarrow`` is kept);
    4. drop spacing commands ``\\!``, ``\\,``, ``\\;``, ``\\:`` (so
       ``1\\,000`` -> ``1000``) and ``{,}`` -> ``,``;
    5. units: a number followed by a trailing ``\\text{cm}`` (also
       ``\\mbox``, ``\\mathrm``, ``\\textrm``, ``\\textbf``, with an optional
       ``^2``) loses the unit; any other ``\\text{X}`` becomes ``X``;
       degree marks ``^\\circ`` are dropped;
    6. lowercase, except LaTeX command names (``\\Delta`` stays ``\\Delta``),
       so ``(A)``/``(a)`` and ``Yes``/``yes`` match;
    7. drop all whitespace and trailing periods;
    8. thousands commas are removed only when the whole answer is one number
       written with them (``1,234,567.5``); ``1,2`` stays (a list or set).
    """
    s = _numbers_and_units(_strip_delimiters(str(s)).replace("$", ""))
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = re.sub(r"\\[!,;:]", "", s).replace("{,}", ",")
    s = s.strip().rstrip(".").strip()
    m = _UNIT_SUFFIX_RE.match(s)
    if m:
        s = m.group("value")
    prev = None
    while s != prev:  # innermost first, so nested wrappers unwrap too
        prev = s
        s = _TEXT_WRAPPER_RE.sub(r"\1", s)
    s = _DEGREE_RE.sub("", s)
    # lowercase before dropping spaces: in "\Delta X" the X is not part of the command
    s = re.sub(r"(\\[A-Za-z]+)|([^\\]+)", lambda m: m.group(1) or m.group(2).lower(), s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


def has_answer(answer: str | None) -> bool:
    """True unless the answer is None or normalizes to the empty string."""
    return answer is not None and normalize_answer(answer) != ""


# --------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------


def _clean_for_parse(s: str) -> str:
    """Case-preserving cleanup before math-verify (which needs real LaTeX:
    spaces and capitals matter there, e.g. ``\\pi r``, ``\\Delta``)."""
    s = _numbers_and_units(_strip_delimiters(s).replace("$", ""))
    s = s.replace("\\!", "").replace("{,}", ",")
    s = re.sub(r"(?<=\d)\\[,;:](?=\d)", "", s)  # 1\,000 -> 1000
    s = re.sub(r"\\[,;:]", " ", s)
    return s.strip().rstrip(".").strip()


def _signal_timeout() -> int | None:
    """math-verify's timeout for a call from this thread, or None for none.

    signal.alarm works only in the main thread; and an ITIMER_REAL already
    running there (pytest-timeout, the caller's own alarm) would be cancelled
    by math-verify's alarm(0), so it is left alone.
    """
    if MATH_VERIFY_TIMEOUT_S is None or os.name != "posix":
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
            return None
    except (AttributeError, OSError):  # pragma: no cover - exotic platforms
        return None
    return int(MATH_VERIFY_TIMEOUT_S)


class _DeliberateNoTimeoutFilter(logging.Filter):
    """Hide math-verify's one-time "Timeout is disabled" warning: this module
    turns the timeout off on purpose in worker threads (see the module
    docstring for what guards those calls instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_MV_LOG_FILTER = _DeliberateNoTimeoutFilter()
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_MV_LOG_FILTER)


def _call_math_verify(fn: Callable, *args, timeout_kw: str):
    t = _signal_timeout()
    try:
        return fn(*args, **{timeout_kw: t})
    except ValueError as e:
        # Not the main thread of the main interpreter after all: run untimed.
        if t is not None and "thread" in str(e):
            return fn(*args, **{timeout_kw: None})
        raise


def _is_safe_expr(expr) -> bool:
    """False for expressions sympy may take forever to evaluate exactly."""
    import sympy  # sympy: heavy, loaded where used

    if not isinstance(expr, sympy.Basic):
        return True
    try:
        for node in sympy.postorder_traversal(expr):
            if isinstance(node, sympy.Pow):
                base, exp = node.args
                if exp.free_symbols or not exp.is_number:
                    continue
                if base.is_number and not base.free_symbols and base in (0, 1, -1):
                    continue
                e = exp if exp.is_Number else exp.evalf(15)
                if not e.is_Number or not e.is_finite or abs(e) > MAX_SAFE_EXPONENT:
                    return False
            elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.binomial, sympy.gamma)):
                for arg in node.args:
                    if arg.is_number and not arg.free_symbols:
                        v = arg if arg.is_Number else arg.evalf(15)
                        if not v.is_Number or abs(v) > 10_000:
                            return False
    except Exception:  # noqa: BLE001 - sympy raises anything on odd input: not a number
        return False
    return True


@lru_cache(maxsize=_CACHE_SIZE)
def _math_verify_parse(clean: str) -> tuple:
    """math-verify's parse of one cleaned answer; () when unusable."""
    if not clean or len(clean) > MAX_PARSE_CHARS:
        return ()
    try:
        from math_verify import parse  # math_verify: heavy, loaded where used

        parsed = _call_math_verify(parse, "$" + clean + "$", timeout_kw="parsing_timeout")
    except Exception:  # noqa: BLE001 - math_verify raises anything on odd input: unparsed
        return ()
    import sympy  # sympy: heavy, loaded where used

    if not any(isinstance(p, (sympy.Basic, sympy.MatrixBase)) for p in parsed):
        return ()
    if not all(_is_safe_expr(p) for p in parsed):
        return ()
    return tuple(parsed)


@lru_cache(maxsize=_CACHE_SIZE)
def _plain_numbers(clean: str) -> tuple[complex, ...] | None:
    """Values of a parsed answer when every parsed form is a plain number
    (no symbols, sets, relations, matrices or percent signs) or a single
    assignment of one (``x = 3``, which math-verify compares by its value);
    else None."""
    import sympy  # sympy: heavy, loaded where used

    values = []
    for p in _math_verify_parse(clean):
        if isinstance(p, str):
            continue
        if isinstance(p, sympy.Eq) and isinstance(p.lhs, sympy.Symbol):
            p = p.rhs
        if (
            not isinstance(p, sympy.Expr)
            or not p.is_number
            or p.free_symbols
            or p.has(sympy.UnevaluatedExpr)
        ):
            return None
        try:
            v = complex(p.evalf(30))
        except Exception:  # noqa: BLE001 - sympy raises anything on odd input: not a number
            return None
        if not cmath.isfinite(v):
            return None
        values.append(v)
    return tuple(values) or None


def _clearly_different_numbers(a_clean: str, b_clean: str) -> bool:
    """Fast path for the common vote: two numbers that differ by more than
    math-verify could ever call equal (it rounds floats to 6 decimals and
    otherwise needs exact symbolic equality), so its slow simplify is
    skipped.  Conservative: a difference lost in evalf precision (a relative
    1e-20) is not "clear" and goes to math-verify."""
    va, vb = _plain_numbers(a_clean), _plain_numbers(b_clean)
    if va is None or vb is None:
        return False
    for x in va:
        for y in vb:
            d = abs(x - y)
            if d <= 1e-5 or d <= 1e-20 * max(abs(x), abs(y)):
                return False
    return True


def _math_verify_equal(a_clean: str, b_clean: str) -> bool:
    from math_verify import verify  # math_verify: heavy, loaded where used

    pa, pb = _math_verify_parse(a_clean), _math_verify_parse(b_clean)
    if _clearly_different_numbers(a_clean, b_clean):
        return False
    # verify(gold, target) is not symmetric (assignments, equation/interval
    # conversions); a vote needs a symmetric relation, so either way counts.
    for gold, target in ((pa, pb), (pb, pa)):
        try:
            if _call_math_verify(verify, list(gold), list(target), timeout_kw="timeout_seconds"):
                return True
        except Exception:  # noqa: BLE001 - math_verify raises anything on odd input: no match
            pass
    return False


_SYMPY_NAMES = {"sqrt", "pi", "e"}
_SYMPY_ALLOWED_RE = re.compile(r"^[0-9a-z+\-*/().]+$")


def _latex_to_plain(s: str) -> str:
    """The few LaTeX forms the numeric fallback understands (input normalized)."""
    frac = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
    sqrt = re.compile(r"\\sqrt\{([^{}]*)\}")
    prev = None
    while s != prev:
        prev = s
        s = frac.sub(r"((\1)/(\2))", s)
        s = sqrt.sub(r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*")
    return s.replace("^", "**").replace("{", "(").replace("}", ")")


@lru_cache(maxsize=_CACHE_SIZE)
def _sympy_value(normalized: str) -> complex | None:
    """Numeric value of a simple expression (``1/2``, ``2^3``, ``3\\sqrt{2}``).

    parse_expr evaluates Python, so only digits, operators, parentheses and
    the names sqrt/pi/e get through; anything else is None.
    """
    s = _latex_to_plain(normalized)
    if not s or len(s) > MAX_PARSE_CHARS or not _SYMPY_ALLOWED_RE.match(s):
        return None
    if "__" in s or not set(re.findall(r"[a-z]+", s)) <= _SYMPY_NAMES:
        return None
    try:
        import sympy  # sympy: heavy, loaded where used
        from sympy.parsing.sympy_parser import (  # sympy: heavy, loaded where used
            convert_xor,
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )

        expr = parse_expr(
            s,
            local_dict={"sqrt": sympy.sqrt, "pi": sympy.pi, "e": sympy.E},
            transformations=standard_transformations + (implicit_multiplication_application, convert_xor),
            evaluate=False,
        )
        if not isinstance(expr, sympy.Basic) or expr.free_symbols or not _is_safe_expr(expr):
            return None
        value = complex(expr.evalf(30))
    except Exception:  # noqa: BLE001 - sympy raises anything on odd input: not a number
        return None
    if not (cmath.isfinite(value)):
        return None
    return value


def _numeric_equal(a_norm: str, b_norm: str) -> bool:
    va, vb = _sympy_value(a_norm), _sympy_value(b_norm)
    if va is None or vb is None:
        return False
    return abs(va - vb) <= NUMERIC_REL_TOL * max(abs(va), abs(vb))


@lru_cache(maxsize=_CACHE_SIZE)
def _equivalent_pair(a: str, b: str) -> bool:
    """Cached on the (sorted) pair of raw answers."""
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    ca, cb = _clean_for_parse(a), _clean_for_parse(b)
    if _math_verify_parse(ca) and _math_verify_parse(cb):
        return _math_verify_equal(ca, cb)
    return _numeric_equal(na, nb)


def answers_equivalent(a: str | None, b: str | None) -> bool:
    """Whether two final answers are the same.

    - None (no answer) never equals anything, not even None; neither does an
      answer that normalizes to "".
    - Equal ``normalize_answer`` strings -> True.
    - Else, when math-verify parses both to sympy objects, its verdict
      (tried both ways round, so the relation is symmetric): ``1/2`` =
      ``0.5`` = ``\\frac{1}{2}``, ``3`` = ``3.0``, ``\\{1,2\\}`` =
      ``\\{2,1\\}``, ``2\\sqrt{3}`` = ``\\sqrt{12}``; intervals are compared
      with their endpoints' openness.  ``x=3`` = ``3``: math-verify reads a
      single assignment as its value, and we keep that (a vote should not
      split "x = 3" and "3").
    - Percent: a percent sign after a number is a unit and is dropped
      before any comparison, as MATH-style graders strip ``\\%``:
      ``50\\%`` = ``50`` and ``50\\%`` != ``0.5``.  (math-verify alone calls
      ``5\\%`` equal to both ``5`` and ``0.05``, which is not transitive, so
      a vote could depend on the order of the answers.)
    - e-notation is a number: ``1e3`` = ``1000`` (math-verify alone reads
      ``1e3`` as 3 times Euler's e).
    - Else a restricted sympy numeric check (relative tolerance 1e-9) of
      simple expressions such as ``2^3`` vs ``8``.
    - Else False.

    Safe to call from any thread; results are cached.
    """
    if a is None or b is None:
        return False
    a, b = str(a), str(b)
    return _equivalent_pair(a, b) if a <= b else _equivalent_pair(b, a)


def group_answers(
    answers: Sequence[str | None],
    equivalent: Callable[[str, str], bool] = answers_equivalent,
) -> list[int]:
    """A group id per answer: equivalent answers share one, ids in first-seen order.

    Decision: each missing answer (None or empty) gets its own singleton
    group, so group ids stay true equivalence classes (None equals nothing).
    The selection strategies never let such a group win a vote over a group
    with an answer (see ``mmprm_infer.selection``).

    A new answer joins the first earlier group whose first member (its
    representative) it is equivalent to; equivalence of math answers is not
    always transitive, and comparing against the representative keeps the
    result independent of how a group grew.
    """
    ids: list[int] = []
    reps: list[tuple[int, str]] = []
    by_key: dict[str, int] = {}
    next_id = 0
    for ans in answers:
        if not has_answer(ans):
            ids.append(next_id)
            next_id += 1
            continue
        key = normalize_answer(ans)
        gid = by_key.get(key)
        if gid is None:
            # has_answer(ans) above: a string
            gid = next((g for g, rep in reps if equivalent(rep, ans)), None)  # type: ignore[arg-type]
            if gid is None:
                gid = next_id
                next_id += 1
                reps.append((gid, ans))  # type: ignore[arg-type]
            by_key[key] = gid
        ids.append(gid)
    return ids


def clear_caches() -> None:
    """Drop the parse / comparison caches (e.g. after changing the limits above)."""
    for fn in (normalize_answer, _math_verify_parse, _plain_numbers, _sympy_value, _equivalent_pair):
        fn.cache_clear()


# --------------------------------------------------------------------------
# Verifier used by training (rollout correctness)
# --------------------------------------------------------------------------


class AnswerVerifier:
    """Checks a predicted solution (or bare answer) against a reference answer.

    ``verifier(predicted, reference) -> bool``.  The predicted text is run
    through ``extract`` (default ``extract_answer``); if that finds nothing
    and the text is a short single line, the text itself is taken as the
    answer, otherwise the prediction has no answer and is wrong.  The
    reference goes through the same extraction (a MATH-style reference
    solution with a ``\\boxed{}`` works), falling back to the whole string.

    ``judge(predicted_answer, reference_answer) -> bool`` replaces
    ``answers_equivalent`` (e.g. an LLM judge or a task-specific checker);
    it receives the extracted answers, the prediction's possibly None.
    """

    MAX_BARE_ANSWER_CHARS = 100

    def __init__(
        self,
        judge: Callable[[str | None, str], bool] | None = None,
        extract: Callable[[str], str | None] = extract_answer,
    ):
        self.judge = judge if judge is not None else answers_equivalent
        self.extract = extract

    def predicted_answer(self, predicted: str | None) -> str | None:
        if predicted is None:
            return None
        found = self.extract(predicted)
        if found is not None:
            return found
        bare = predicted.strip()
        if bare and "\n" not in bare and len(bare) <= self.MAX_BARE_ANSWER_CHARS:
            return bare
        return None

    def reference_answer(self, reference: str) -> str:
        if reference is None:
            raise ValueError("reference answer is None: every verified question needs a reference answer")
        found = self.extract(str(reference))
        return found if found is not None else str(reference).strip()

    def __call__(self, predicted: str | None, reference: str) -> bool:
        return bool(self.judge(self.predicted_answer(predicted), self.reference_answer(reference)))
