"""Synthetic task (problems, checker, splits, images) and the synthetic policy."""

from __future__ import annotations

import re

import pytest

from mmprm_infer.answers import extract_answer
from mmprm_infer.policy import Policy, PolicyPrompt, split_steps
from mmprm_infer.train.synthetic.policy import ErrorRates, SyntheticPolicy, policy_report
from mmprm_infer.train.synthetic.task import (
    TEMPLATES,
    make_problem,
    make_problems,
    parse_step,
    problem_from_image,
    problem_seeds,
)

NO_ERRORS = ErrorRates(misread=0, trap_range=(0, 0), wrong_line=0, slip=0, drop_term=0, dup_term=0, skip_op=0,
                       dup_op=0)


@pytest.fixture(scope="module")
def problems():
    return make_problems(60, "train", seed=0)


# --------------------------------------------------------------------------
# problems and checker
# --------------------------------------------------------------------------


def test_every_template_and_gold_solution_checks(problems):
    assert {p.template for p in problems} == set(TEMPLATES)
    for p in problems:
        steps = p.gold_steps
        assert 5 <= len(steps) <= 7
        assert p.first_error(steps) is None
        assert p.is_correct_solution(p.gold_solution)
        assert all(p.check_step(steps[:k], steps[k]) for k in range(len(steps)))
        assert extract_answer(p.gold_solution) == p.answer == str(p.answer_value)
        assert steps[-1] == f"The answer is \\boxed{{{p.answer}}}."


def test_gold_steps_are_short_and_regular(problems):
    pattern = re.compile(r"^(Row \d|Column [A-C]|Bar [A-E]|-?\d+ [-+*] |The answer is \\boxed)")
    for p in problems:
        for s in p.gold_steps:
            assert pattern.match(s), s
            assert len(s.split()) <= 12


def _grid_problem(template="grid_sum_times_cell"):
    return next(p for p in make_problems(40, "train", 3) if p.template == template)


def test_checker_finds_misread_slip_dropped_term_and_carries_errors():
    p = _grid_problem()
    gold = p.gold_steps  # Row r is a, b, c. / a + b + c = s. / Row x, column Y is v. / s * v = t. / answer
    row = parse_step(gold[0])
    a, b, c = row.values
    wrong_a = a + 1 if a < 9 else a - 1
    misread = [gold[0].replace(f"is {a},", f"is {wrong_a},", 1)]
    carried_sum = wrong_a + b + c
    misread.append(f"{wrong_a} + {b} + {c} = {carried_sum}.")
    assert p.first_error(misread) == 0
    verdict = p.check_step([], misread[0])
    assert not verdict and "misread" in verdict.reason
    # the next step is arithmetically fine given the misread, but on a wrong path
    later = p.check_step(misread[:1], misread[1])
    assert not later and "earlier step" in later.reason
    assert p.step_labels(misread) == [False, False]

    slip = gold[:1] + [f"{a} + {b} + {c} = {a + b + c + 1}."]
    assert p.first_error(slip) == 1 and "slip" in p.check_step(slip[:1], slip[1]).reason
    dropped = gold[:1] + [f"{a} + {b} = {a + b}."]
    assert p.first_error(dropped) == 1
    doubled = gold[:1] + [f"{a} + {b} + {b} + {c} = {a + 2 * b + c}."]
    assert p.first_error(doubled) == 1
    early = gold[:2] + [f"The answer is \\boxed{{{a + b + c}}}."]
    assert p.first_error(early) == 2 and "before finishing" in p.check_step(early[:2], early[2]).reason
    extra = gold[:4] + [gold[3].split(" = ")[1].rstrip(".") + " * 2 = 0."]
    assert p.first_error(extra) == 4
    wrong_answer = gold[:4] + [f"The answer is \\boxed{{{p.answer_value + 1}}}."]
    assert p.first_error(wrong_answer) == 4
    assert p.first_error(gold[:2] + ["Let me think about this."]) == 2
    assert p.first_error(gold[:3]) is None  # a correct unfinished prefix
    assert not p.is_correct_solution(gold[:3])
    # reading something the question does not need
    other_row = 1 if parse_step(gold[0]).target.row != 1 else 2
    assert p.first_error([f"Row {other_row} is {', '.join(map(str, p.values[other_row - 1]))}."]) == 0


def test_checker_on_bars_and_column_questions():
    for template in ("bars_pair_times_bar", "bars_triple_minus_bar", "grid_row_minus_col",
                     "grid_cell_product_plus_row"):
        p = _grid_problem(template)
        gold = p.gold_steps
        for k, step in enumerate(gold):
            parsed = parse_step(step)
            if parsed.kind == "read":
                bad = step.replace(str(parsed.values[-1]) + ".", str(parsed.values[-1] % 9 + 1) + ".")
                assert p.first_error(gold[:k] + [bad]) == k, (template, bad)
            elif parsed.kind == "arith":
                bad = step.replace(f"= {parsed.result}.", f"= {parsed.result + 2}.")
                assert p.first_error(gold[:k] + [bad]) == k


def test_splits_are_disjoint_and_deterministic():
    train, test = problem_seeds(300, "train", 0), problem_seeds(300, "test", 0)
    assert not set(train) & set(test)
    tr, te = make_problems(300, "train", 0), make_problems(300, "test", 0)
    assert {p.id for p in tr}.isdisjoint({p.id for p in te})
    assert all(p.split == "train" for p in tr) and all(p.split == "test" for p in te)
    again = make_problems(5, "test", 0)
    assert [(p.question, p.values) for p in again] == [(p.question, p.values) for p in te[:5]]
    assert make_problems(3, "train", 1)[0].seed not in train
    with pytest.raises(ValueError, match="split"):
        problem_seeds(3, "dev")


def test_image_text_and_self_describing_png(tmp_path):
    for template in ("grid_sum_times_cell", "bars_pair_times_bar"):
        p = _grid_problem(template)
        img = p.image
        assert img.mode == "RGB" and 150 <= img.width <= 300 and 150 <= img.height <= 300
        assert len(img.getcolors(1 << 16)) > 2  # something drawn
        for r, row in enumerate(p.values, 1):
            line = ", ".join(map(str, row))
            assert (f"Row {r}: {line}" if p.kind == "grid" else "\n".join(
                f"Bar {'ABCDE'[c]}: {v}" for c, v in enumerate(row))) in p.image_text
        assert p.prompt_question(text_only=True).startswith(p.image_text)
        assert p.prompt_question(text_only=False) == p.question
        path = tmp_path / f"{p.id}.png"
        p.save_image(path)
        back = problem_from_image(str(path))
        assert back is not None and back.gold_steps == p.gold_steps and back.id == p.id
        assert problem_from_image(p.image).values == p.values
    assert make_problem(7, template="bars_triple_minus_bar").template == "bars_triple_minus_bar"


# --------------------------------------------------------------------------
# synthetic policy
# --------------------------------------------------------------------------


def _prompts(problems, text_only=False):
    return [PolicyPrompt(p.prompt_question(text_only), [] if text_only else [p.image]) for p in problems]


def test_policy_protocol_and_determinism(problems):
    pol = SyntheticPolicy(problems, seed=3)
    assert isinstance(pol, Policy)
    a = pol.generate(_prompts(problems[:10]), n=8)
    b = SyntheticPolicy(problems, seed=3).generate(_prompts(problems[:10]), n=8)
    c = SyntheticPolicy(problems, seed=4).generate(_prompts(problems[:10]), n=8)
    assert a == b and a != c
    assert len(a) == 10 and all(len(x) == 8 for x in a)
    # asking again gives fresh samples, reproducibly
    assert pol.generate(_prompts(problems[:10]), n=8) != a
    # order-independent: one question alone gets the same samples as in a batch
    assert SyntheticPolicy(problems, seed=3).generate(_prompts(problems[4:5]), n=8)[0] == a[4]
    # text-only prompts resolve through the known problems
    t = SyntheticPolicy(problems, seed=3).generate(_prompts(problems[:3], text_only=True), n=4)
    assert all(extract_answer(s) is not None for row in t for s in row)
    with pytest.raises(ValueError, match="unknown problem"):
        SyntheticPolicy().generate([PolicyPrompt("What is 2 + 2?")], n=1)


def test_temperature_zero_is_the_reference(problems):
    pol = SyntheticPolicy(problems, seed=0)
    out = pol.generate(_prompts(problems[:20]), n=2, temperature=0.0)
    for p, sols in zip(problems, out):
        assert sols == [p.gold_solution] * 2


def test_continues_partial_solutions(problems):
    pol = SyntheticPolicy(problems, rates=NO_ERRORS, seed=0)
    for p in problems[:15]:
        for k in range(len(p.gold_steps)):
            prompt = PolicyPrompt(p.question, [p.image], p.gold_steps[:k])
            (cont,) = pol.generate([prompt], n=1)[0:1][0]
            assert split_steps(cont) == p.gold_steps[k:]
        done = PolicyPrompt(p.question, [p.image], p.gold_steps)
        assert pol.generate([done], n=2) == [["", ""]]


def test_errors_carry_into_later_steps_and_answer(problems):
    pol = SyntheticPolicy(problems, seed=1)
    for p in [q for q in problems if q.template == "grid_sum_times_cell"][:5]:
        row = parse_step(p.gold_steps[0])
        vals = list(row.values)
        vals[1] = vals[1] % 9 + 1
        partial = [f"{row.target.describe()} is {', '.join(map(str, vals))}."]
        conts = pol.generate([PolicyPrompt(p.question, [p.image], partial)], n=16)[0]
        for cont in conts:
            steps = split_steps(cont)
            full = partial + steps
            assert p.first_error(full) == 0
            assert extract_answer(cont) != p.answer  # never lucky
            nxt = parse_step(steps[0])
            if nxt.kind == "arith" and len(nxt.values) == 3:  # no dropped / doubled term
                assert list(nxt.values) == vals  # the sum uses the misread values
        # a correct prefix can still end right
        good = pol.generate([PolicyPrompt(p.question, [p.image], p.gold_steps[:2])], n=16)[0]
        assert any(extract_answer(s) == p.answer for s in good)


def test_error_mix_accuracy_and_majority_vote():
    probs = make_problems(120, "test", 0)
    rep = policy_report(probs, SyntheticPolicy(probs, seed=0), n=16)
    acc, maj = rep["accuracy"], rep["majority@16"]
    assert 0.33 <= acc <= 0.55, rep
    assert acc + 0.1 <= maj <= 0.8, rep  # majority helps but is clearly imperfect
    assert rep["pass@16"] >= 0.95  # a good PRM has something to pick
    assert rep["problems_with_agreeing_wrong_answers"] >= 0.25  # wrong answers that agree with each other
    assert set(rep["first_error_kinds"]) == {"misread", "arithmetic slip", "dropped/doubled term", "skipped operation",
                                             "duplicated operation"}, rep


# --------------------------------------------------------------------------
def test_prm_question_facts_and_drills_are_true(problems):
    import random

    from mmprm_infer.train.synthetic.prm_init import picture_facts, prm_question, reading_drill

    for p in problems[:20]:
        facts = picture_facts(p).split("\n")
        assert len(facts) == (15 if p.kind == "grid" else 5)
        for line in facts:  # worded exactly like a reading step, with the picture's values
            step = parse_step(line)
            assert step.kind == "read" and step.values == p.read(step.target)
        assert prm_question(p).startswith("Picture:\nRow " if p.kind == "grid" else "Picture:\nBar ")
        assert prm_question(p).endswith(p.question) and prm_question(p, False) == p.question
        drill = reading_drill(p, random.Random(p.seed))
        assert len(drill) == min(8, len(facts)) and len(set(drill)) == len(drill) and set(drill) <= set(facts)
    from mmprm_infer.train.synthetic.prm_init import arithmetic_drill
    from mmprm_infer.train.synthetic.task import apply_op

    rng = random.Random(0)
    for _ in range(50):  # true calculations, in the task's wording
        for line in arithmetic_drill(rng):
            step = parse_step(line)
            assert step.kind == "arith" and len(set(step.ops)) == 1
            assert step.result == apply_op(step.ops[0], step.values) and step.result >= 0


def test_task_tokenizer_gives_a_reading_and_its_fact_one_shared_key_token(problems):
    """A reading step (after the step tag) and the picture fact it must match open with the same single
    key token and carry the same value tokens, so checking it is a one-hop copy for the tiny PRM."""
    from mmprm_infer.train.synthetic.prm_init import build_task_tokenizer, picture_facts, prm_question, reading_keys

    tok = build_task_tokenizer()
    keys = reading_keys()
    assert len(keys) == 3 + 3 + 9 + 5 and len(set(keys)) == len(keys)
    key_ids = {tok.convert_tokens_to_ids(k) for k in keys}
    assert len(key_ids) == len(keys) and all(len(tok.encode(k, add_special_tokens=False)) == 1 for k in keys)
    for p in problems[:10]:
        facts = picture_facts(p).split("\n")
        ids = tok.encode(f"Question: {prm_question(p)}\nProcess: " + "<prm>".join(p.gold_steps) + "<prm>",
                         add_special_tokens=False)
        for step in p.gold_steps:
            if parse_step(step).kind != "read":
                continue
            assert step in facts
            step_ids = tok.encode("<prm>" + step, add_special_tokens=False)[1:]
            assert step_ids[0] in key_ids and tok.decode(step_ids) == step
            fact_ids = tok.encode("\n" + step, add_special_tokens=False)[1:]
            assert fact_ids == step_ids
            # both occur in the PRM's input: once among the facts, once as the step
            n = sum(ids[i:i + len(step_ids)] == step_ids for i in range(len(ids)))
            assert n >= 2
    assert tok.decode(tok.encode("Row 2, column C is 5.")) == "Row 2, column C is 5."
    assert len(build_task_tokenizer(key_tokens=False).encode("Row 2, column C is", add_special_tokens=False)) > 1


def test_verification_drills_are_true_exactly_when_labelled_so(problems):
    import random

    from mmprm_infer.train.synthetic.prm_init import picture_facts, prm_question, verification_drill
    from mmprm_infer.train.synthetic.task import apply_op

    rng = random.Random(0)
    seen = set()
    for p in problems[:20]:
        facts = picture_facts(p).split("\n")
        for layout in ("used", "distractors", "full"):
            question, statements, labels = verification_drill(p, rng, statements=8, layout=layout,
                                                              arithmetic_share=0.4)
            assert len(statements) == len(labels) == 8
            if layout == "full":
                assert question == prm_question(p, True)
                shown = facts
            else:
                shown = question.removeprefix("Picture:\n").split("\n")
                assert set(shown) <= set(facts)
            for statement, label in zip(statements, labels):
                step = parse_step(statement)
                if step.kind == "read":
                    # a true reading is one of the facts shown; a false one changes one value of a shown fact
                    assert p.has_target(step.target) and any(parse_step(f).target == step.target for f in shown)
                    true = step.values == p.read(step.target)
                    assert true == (statement in facts)
                    if not true:  # one value changed, or the values of a neighbouring line (a wrong-line read)
                        changed = sum(a != b for a, b in zip(step.values, p.read(step.target)))
                        assert changed == 1 or any(step.values == p.read(parse_step(f).target) for f in facts)
                        seen.add(("changed", changed))
                else:
                    assert step.kind == "arith"
                    true = apply_op(step.ops[0], list(step.values)) == step.result
                assert label == (1.0 if true else 0.0)
                seen.add((step.kind, label))
            if layout == "used":
                read_targets = {parse_step(s).target for s in statements if parse_step(s).kind == "read"}
                assert {parse_step(f).target for f in shown} == read_targets
    assert {("read", 1.0), ("read", 0.0), ("arith", 1.0), ("arith", 0.0), ("changed", 1)} <= seen
    assert any(kind == "changed" and n > 1 for kind, n in seen)  # wrong-line reads happen too
    with pytest.raises(ValueError, match="layout"):
        verification_drill(problems[0], rng, layout="all")


def test_prefix_verdicts_mark_each_statement_right_until_it_departs_from_its_true_version(problems):
    import random

    from mmprm_infer.train.synthetic.prm_init import _prefix_verdicts, build_task_tokenizer, verification_drill

    tok = build_task_tokenizer()
    tag = tok.convert_tokens_to_ids("<prm>")
    rng = random.Random(4)
    departures = 0
    for p in problems[:15]:
        for layout in ("used", "full"):
            truths: list[str] = []
            question, statements, labels = verification_drill(p, rng, statements=6, layout=layout,
                                                              arithmetic_share=0.4, truths=truths)
            assert len(truths) == len(statements)
            assert [s == t for s, t in zip(statements, truths)] == [label == 1.0 for label in labels]
            ids, verdicts = _prefix_verdicts(tok, question, statements, truths, "<prm>", tag)
            assert len(ids) == len(verdicts)
            true_ids, true_verdicts = _prefix_verdicts(tok, question, truths, truths, "<prm>", tag)
            assert set(true_verdicts) == {-1.0, 1.0}
            markers = [i for i, t in enumerate(ids) if t == tag]
            true_markers = [i for i, t in enumerate(true_ids) if t == tag]
            assert len(markers) == len(statements) and all(verdicts[i] == -1.0 for i in markers)
            # nothing before the first statement is scored; statement k's tokens sit between markers k-1 and k
            begin = next(i for i, v in enumerate(verdicts) if v != -1.0)
            assert tok.decode(ids[:begin]).rstrip() == f"Question: {question}\nProcess:"
            assert tok.decode(ids[begin:markers[0]]).strip() == statements[0]
            true_begin = begin
            for k, (end, label) in enumerate(zip(markers, labels)):
                span = verdicts[begin:end]
                assert span and -1.0 not in span
                assert span == sorted(span, reverse=True)  # right so far, then wrong to the marker
                assert span[-1] == label  # the token before the marker agrees with the marker's label
                stmt_ids, true_stmt_ids = ids[begin:end], true_ids[true_begin:true_markers[k]]
                if label == 0.0:
                    cut = span.index(0.0)
                    assert stmt_ids[:cut] == true_stmt_ids[:cut] and stmt_ids[cut] != true_stmt_ids[cut]
                    departures += cut > 1  # a later value of a row, or a calculation's result
                else:
                    assert stmt_ids == true_stmt_ids
                begin, true_begin = end + 1, true_markers[k] + 1
    assert departures > 0


def test_row_verification_drills_read_only_rows_and_columns_where_a_picture_has_them(problems):
    import random

    from mmprm_infer.train.synthetic.prm_init import VerificationPhase, verification_drill

    rng = random.Random(3)
    kinds = {"grid": set(), "bars": set()}
    for p in problems[:20]:
        _, statements, _ = verification_drill(p, rng, statements=8, layout="used", arithmetic_share=0.0,
                                              multi_value_share=1.0)
        kinds[p.kind] |= {parse_step(s).target.kind for s in statements}
    assert kinds["grid"] == {"row", "col"}  # never a cell
    assert kinds["bars"] <= {"bar"}  # a bar chart keeps its one-value readings
    with pytest.raises(ValueError, match="layout"):
        VerificationPhase(0.5, "everything")
    with pytest.raises(ValueError, match="share"):
        VerificationPhase(0.0, "used")
    from mmprm_infer.train.synthetic.prm_init import pretrain_step_verification

    with pytest.raises(ValueError, match="curriculum"):
        pretrain_step_verification(None, problems, steps=1, curriculum=(), progress=False)


def test_step_verification_follows_its_curriculum_and_trains_the_scorers_readout(problems, tmp_path, monkeypatch):
    import random

    import mmprm_infer.train.synthetic.prm_init as prm_init
    from mmprm_infer.prm import PRM, ScoringItem

    path, fmt, opts = prm_init.build_task_prm(tmp_path / "m", hidden=32, layers=1, heads=2, kv_heads=1,
                                              intermediate=64)
    prm = PRM.from_pretrained(path, format=fmt, dtype="float32", **opts)
    calls = []
    real = prm_init.verification_drill

    def recording(problem, rng, **kw):
        calls.append((kw["layout"], kw["arithmetic_share"], kw["multi_value_share"]))
        return real(problem, rng, **kw)

    monkeypatch.setattr(prm_init, "verification_drill", recording)
    # a fixed drill to check: its rewards through the scorer before and after
    question, statements, labels = real(problems[0], random.Random(1), statements=6, layout="full",
                                        arithmetic_share=0.5)
    item = ScoringItem(question, [statements], problems[0].image)
    before = prm.score_batch([item])[0][0]
    losses = prm_init.pretrain_step_verification(prm, problems[:4], steps=10, batch_size=2, lr=1e-2,
                                                 arithmetic_share=0.5, progress=False)
    assert len(losses) == 10 and all(x > 0 for x in losses)
    phases = [c for i, c in enumerate(calls) if i % 2 == 0]  # one record per step (batch of 2)
    # 40 % / 30 % / 30 %: short layout without calculations first, then distractors, then the PRM's question
    assert phases == [("used", 0.0, None)] * 4 + [("distractors", 0.5, None)] * 3 + [("full", 0.5, None)] * 3
    calls.clear()
    prm_init.pretrain_step_verification(prm, problems[:4], steps=9, batch_size=2, arithmetic_share=0.5,
                                        curriculum=prm_init.ROW_VERIFICATION_CURRICULUM, progress=False)
    phases = [c for i, c in enumerate(calls) if i % 2 == 0]
    # the row pass: the same walk, rows and columns only, no calculations
    assert phases == [("used", 0.0, 1.0)] * 4 + [("distractors", 0.0, 1.0)] * 3 + [("full", 0.0, 1.0)] * 2
    after = prm.score_batch([item])[0][0]
    assert after != before  # the stage moved what the scorer reads at the markers
    # with a verdict at every statement token too: the same marker loss is returned, the readout moves
    losses = prm_init.pretrain_step_verification(prm, problems[:4], steps=3, batch_size=2, lr=1e-2,
                                                 token_verdicts=1.0, progress=False)
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    assert prm.score_batch([item])[0][0] != after
