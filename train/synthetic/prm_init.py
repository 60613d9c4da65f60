"""Small PRMs to train on the synthetic task, built offline.

``build_task_prm`` writes a tiny InternVL checkpoint (mm-prm format, images
included) -- or, with ``kind="text"``, a tiny Qwen2 causal LM for the
``custom`` format on the text version of the task -- whose tokenizer is
trained on the task's own text, with every integer from ``NUMBER_RANGE`` in
the corpus (bare and after a space) so that each number the task writes is
one token: a tiny model then compares "Row 2 is 4, 7, 2." with the picture's
values token by token instead of digit pieces.  Each reading's opening words
("Row 2, column C is", ``reading_keys``) are one token too, so a reading step
and the picture fact it must agree with share one key token and checking it
is a one-hop copy.  Next-token pretraining (``pretrain_reading``) with reading
and arithmetic drills (``reading_drill``, ``arithmetic_drill``) grows the
look-up and the sums; ``pretrain_step_verification`` turns them into a verdict
at the step marker, with dense true/perturbed statements, a verdict target at
every statement token (``token_verdicts``) and a short-to-full layout
curriculum, run twice: over all statements (``VERIFICATION_CURRICULUM``), then
over row and column readings only (``ROW_VERIFICATION_CURRICULUM``), so that
every value of those is checked, not only the last.  What each of these
bought, measured: RESULTS.md beside this file.

``prm_question(problem, with_image_text)`` is the question the PRM reads:
with ``with_image_text`` (the default of the pipeline) a text rendering of
the picture (``picture_facts``: every row, column, cell or bar worded as the
task's reading steps word them) precedes the question, *in addition to* the
image.  A randomly initialised vision tower that is frozen
during training (MM-PRM's recipe; the projector does not train either, see
train/trainer.py) cannot learn to read digits in a few CPU minutes, so the
text rendering is what lets a tiny PRM check reading steps.
"""

from __future__ import annotations

import os
import random as _random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from mmprm_infer.io.progress import progress_bar
from mmprm_infer.testing import tiny, tiny_internvl
from mmprm_infer.train.synthetic.policy import LOOKALIKE_DIGITS, SLIP_OFFSETS, neighbour_target
from mmprm_infer.train.synthetic.task import (
    BAR_NAMES,
    COL_NAMES,
    GRID_COLS,
    GRID_ROWS,
    Target,
    apply_op,
    format_arith,
    format_read,
    make_problems,
    parse_step,
)

__all__ = ["NUMBER_RANGE", "task_corpus", "build_task_tokenizer", "build_task_prm", "prm_question",
           "MMPRM_FORMAT_OPTIONS", "reading_keys", "picture_facts", "pretrain_reading", "reading_drill",
           "arithmetic_drill", "perturb_reading", "perturb_calculation",
           "verification_drill", "pretrain_step_verification", "VerificationPhase", "VERIFICATION_CURRICULUM",
           "ROW_VERIFICATION_CURRICULUM"]

NUMBER_RANGE = range(-60, 1000)  # every number the task and the policy's errors write, and more
# mm-prm on the tiny model: one 112 px tile (16 image tokens), no dynamic tiling.
MMPRM_FORMAT_OPTIONS = {"max_tiles": 1}


def picture_facts(problem) -> str:
    """The picture as a list of facts worded exactly like the task's reading steps: every row,
    column and cell of a table ("Row 2 is 4, 7, 2.", "Column C is 3, 2, 9.", "Row 2, column C is 2."),
    every bar of a chart ("Bar B is 7.").  A right reading step then appears verbatim above it --
    checking it is a copy task that a two-layer transformer learns (induction heads)."""

    targets = []
    if problem.kind == "grid":
        rows, cols = len(problem.values), len(problem.values[0])
        targets += [Target("row", r) for r in range(1, rows + 1)]
        targets += [Target("col", col=c) for c in range(1, cols + 1)]
        targets += [Target("cell", r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)]
    else:
        targets += [Target("bar", col=c) for c in range(1, len(problem.values[0]) + 1)]
    # one fact a line: each then starts with the same token ("Row", not " Row") as a step after its marker
    return "\n".join(format_read(t, problem.read(t)) for t in targets)


def prm_question(problem, with_image_text: bool = True) -> str:
    """The question text the PRM is trained and evaluated on (see the module docstring): with
    ``with_image_text``, ``picture_facts`` (the picture as text) then the question."""
    if not with_image_text:
        return problem.question
    return f"Picture:\n{picture_facts(problem)}\n{problem.question}"


def task_corpus(num_problems: int = 200, seed: int = 12345) -> list[str]:
    """Text of the synthetic task (questions, picture renderings, solutions) and every number."""

    lines: list[str] = []
    for p in make_problems(num_problems, "train", seed):
        lines.append(prm_question(p, True))
        lines.extend(p.gold_steps)
    for n in NUMBER_RANGE:  # " 13" (after a space) and "13" (after "{" or at a line start)
        lines.append(f"{n} = {n}, {n} + {n} - {n} * {n}. {{{n}}}")
    lines.append(tiny_internvl.INTERNVL25_SYSTEM_MESSAGE)
    lines.extend(tiny_internvl._training_corpus())
    return lines * 2


def reading_keys() -> list[str]:
    """Every reading's opening words up to its first value ("Row 2, column C is", "Bar B is"): one
    token each in the task tokenizer, so a reading step and the picture fact it must match share a
    single key token and checking the value is a one-hop copy (an induction head: find the earlier
    occurrence of this token, read the token after it) instead of matching a five-token phrase."""

    targets = [Target("row", r) for r in range(1, GRID_ROWS + 1)]
    targets += [Target("col", col=c) for c in range(1, GRID_COLS + 1)]
    targets += [Target("cell", r, c) for r in range(1, GRID_ROWS + 1) for c in range(1, GRID_COLS + 1)]
    targets += [Target("bar", col=c) for c in range(1, len(BAR_NAMES) + 1)]
    assert len(COL_NAMES) >= GRID_COLS
    return [f"{t.describe()} is" for t in targets]


def build_task_tokenizer(extra_special_tokens: Sequence[str] = ("<prm>",), *, internvl: bool = True,
                         vocab_size: int = 4000, key_tokens: bool = True):
    """Byte-level BPE over ``task_corpus`` (numbers one token each), with InternVL's specials;
    ``key_tokens`` adds ``reading_keys`` as single tokens."""
    corpus = task_corpus()
    keys = reading_keys() if key_tokens else []
    if internvl:
        specials = [tiny_internvl.PAD_TOKEN, tiny_internvl.IM_START, tiny_internvl.IM_END,
                    tiny_internvl.IMG_START_TOKEN, tiny_internvl.IMG_END_TOKEN, tiny_internvl.IMG_CONTEXT_TOKEN,
                    tiny_internvl.VIDEO_TOKEN]
        return tiny.build_tokenizer(
            special_tokens=specials + [t for t in extra_special_tokens if t not in specials],
            eos_token=tiny_internvl.IM_END, pad_token=tiny_internvl.PAD_TOKEN, vocab_size=vocab_size,
            chat_template=tiny_internvl.INTERNVL25_CHAT_TEMPLATE, corpus=corpus,
            extra_tokens=keys, single_token_words=(*tiny_internvl.SINGLE_TOKEN_WORDS, *keys),
            start_image_token=tiny_internvl.IMG_START_TOKEN, end_image_token=tiny_internvl.IMG_END_TOKEN,
            context_image_token=tiny_internvl.IMG_CONTEXT_TOKEN, video_token=tiny_internvl.VIDEO_TOKEN,
            model_max_length=32768,
        )
    return tiny.build_tokenizer(("+", "-", *keys),
                                special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<step>"),
                                vocab_size=vocab_size, corpus=corpus, single_token_words=("+", "-", *keys))


def build_task_prm(save_dir: str | os.PathLike, *, kind: str = "internvl", hidden: int = 128, layers: int = 4,
                   heads: int = 4, kv_heads: int = 2, intermediate: int = 256, image_size: int = 112,
                   seed: int = 0, key_tokens: bool = True) -> tuple[Path, str, dict]:
    """Write a random-weight PRM for the task; returns (path, format name, format options).

    ``kind="internvl"``: InternVLForConditionalGeneration (Qwen2 text model,
    one-layer vision tower, ``image_size`` px tiles), format mm-prm.
    ``kind="text"``: Qwen2ForCausalLM, format custom (``<step>`` tag, ``+``/``-``).
    """
    import torch  # torch: heavy, loaded where used
    from transformers import Qwen2Config, Qwen2ForCausalLM  # transformers: heavy, loaded where used

    save_dir = Path(save_dir)
    if kind == "internvl":
        tok = build_task_tokenizer(internvl=True, key_tokens=key_tokens)
        # build_tiny_internvl trains its own tokenizer over the same specials (same ids, in the same
        # order); the model is sized for ours, and ours replaces its files.
        tiny_internvl.build_tiny_internvl(save_dir, text_hidden=hidden, text_layers=layers, heads=heads,
                                          kv_heads=kv_heads, intermediate=intermediate, vocab_size=len(tok),
                                          image_size=image_size, seed=seed)
        from transformers import AutoConfig  # transformers: heavy, loaded where used

        cfg = AutoConfig.from_pretrained(save_dir)
        ctx = tok.convert_tokens_to_ids(tiny_internvl.IMG_CONTEXT_TOKEN)
        if cfg.image_token_id != ctx or cfg.text_config.pad_token_id != tok.pad_token_id:
            raise RuntimeError("task tokenizer's special-token ids differ from the tiny InternVL's")
        tok.save_pretrained(save_dir)
        return save_dir, "mm-prm", dict(MMPRM_FORMAT_OPTIONS)
    if kind != "text":
        raise ValueError(f"kind must be 'internvl' or 'text', got {kind!r}")
    tok = build_task_tokenizer(internvl=False, key_tokens=key_tokens)
    kwargs = tiny.text_config_kwargs(tok, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                                     intermediate=intermediate, max_positions=2048)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    tiny._save(model, tok, save_dir)
    return save_dir, "custom", {}


def reading_drill(problem, rng, k: int = 8) -> list[str]:
    """``k`` reading steps of the picture (a random sample of ``picture_facts``, in random order):
    dense copy practice for pretraining -- every value token must be looked up in the facts."""
    facts = picture_facts(problem).split("\n")
    return rng.sample(facts, min(k, len(facts)))


def arithmetic_drill(rng, k: int = 8) -> list[str]:
    """``k`` true calculations of the shapes the task's plans make (a sum of three digits, a sum times
    a small digit, a product of two digits, a product plus a row sum, a difference of sums), written
    as the task writes them: practice for checking a calculation's result, which reference solutions
    alone show once or twice per problem."""

    out = []
    for _ in range(k):
        shape = rng.randrange(5)
        if shape == 0:
            op, vals = "+", [rng.randint(1, 9) for _ in range(rng.choice((2, 3)))]
        elif shape == 1:
            op, vals = "*", [rng.randint(3, 27), rng.randint(2, 5)]
        elif shape == 2:
            op, vals = "*", [rng.randint(1, 9), rng.randint(1, 9)]
        elif shape == 3:
            op, vals = "+", [rng.randint(1, 81), rng.randint(3, 27)]
        else:
            a = rng.randint(4, 27)
            op, vals = "-", [a, rng.randint(1, min(a - 1, 27))]
        out.append(format_arith(op, vals, apply_op(op, vals)))
    return out


def _bare_text(question: str, steps: Sequence[str], tag: str) -> str:
    """The format's "Question: ...\nProcess: step<tag>step<tag>" text without its chat wrapper: what
    the pretraining stages feed the model."""
    return f"Question: {question}\nProcess: " + tag.join(steps) + tag


def _padded(batch: list[list[int]], tokenizer):
    """Right-padded input ids and attention mask of token lists (the tokenizer's pad id, else 0)."""
    import torch  # torch: heavy, loaded where used

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = max(len(b) for b in batch)
    ids = torch.tensor([b + [pad] * (n - len(b)) for b in batch])
    mask = torch.tensor([[1] * len(b) + [0] * (n - len(b)) for b in batch])
    return ids, mask


def pretrain_reading(prm, problems, *, steps: int = 500, batch_size: int = 16, lr: float = 3e-3,
                     with_image_text: bool = True, drills: bool = True, seed: int = 0,
                     progress: bool = True) -> list[float]:
    """Next-token pretraining of the PRM's text model on "picture facts + question + reference
    solution" (no labels, no images): reading steps become copies of the facts above them, which
    grows the copy (induction) circuit a reward signal at step markers alone is slow to find.
    ``drills`` adds one "reading drill" per problem (``reading_drill``) and one arithmetic drill
    (``arithmetic_drill``, after the bare question: no picture to read); RESULTS.md has what key
    tokens and drills do to the next-value accuracy.  Returns the loss per step.  Uses the LM head
    the checkpoint already has."""

    import torch  # torch: heavy, loaded where used

    tok = prm.tokenizer
    model = prm.model
    tag = getattr(prm.format, "step_tag", "\n\n")  # steps joined as the PRM format joins them: same tokens
    rng = _random.Random(seed)
    texts = [_bare_text(prm_question(p, with_image_text), p.gold_steps, tag) for p in problems]
    if drills and with_image_text:
        texts += [_bare_text(prm_question(p, True), reading_drill(p, rng), tag)
                  for p in problems]  # (only with the picture's text: a drill copies from it)
    if drills:
        texts += [_bare_text(p.question, arithmetic_drill(rng), tag) for p in problems]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)))
    losses: list[float] = []
    model.train()
    for _ in progress_bar(range(steps), desc="pretrain reading", unit="steps", disable=not progress):
        batch = [tok.encode(t) for t in rng.sample(texts, min(batch_size, len(texts)))]
        ids, mask = _padded(batch, tok)
        labels = ids.masked_fill(mask == 0, -100)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return losses


def perturb_reading(statement: str, rng, problem=None) -> str:
    """A reading statement made wrong the way a reader errs: one value changed to a look-alike digit,
    a neighbouring digit or any other digit (always a different digit from 1 to 9), or -- given its
    ``problem``, one time in five -- the values of the neighbouring row / column / cell / bar."""

    read = parse_step(statement)
    target = cast(Target, read.target)  # a reading statement has one
    values = list(read.values)
    if problem is not None and rng.random() < 0.2:
        other = problem.read(neighbour_target(problem, target, rng))
        if len(other) == len(values) and list(other) != values:
            return format_read(target, other)
    j = rng.randrange(len(values))
    v = values[j]
    u = rng.random()
    w = LOOKALIKE_DIGITS[v] if u < 0.3 else v + rng.choice((-1, 1)) if u < 0.6 else rng.randint(1, 9)
    if w == v or not 1 <= w <= 9:
        w = rng.choice([x for x in range(1, 10) if x != v])
    values[j] = w
    return format_read(target, values)


def perturb_calculation(statement: str, rng) -> str:
    """A calculation with its result off by 1, 2 or 10 (the policy's arithmetic slips)."""

    calc = parse_step(statement)
    return format_arith(calc.ops[0], calc.values, calc.result + rng.choice(SLIP_OFFSETS))


VERIFICATION_LAYOUTS = ("used", "distractors", "full")


def _check_layout(layout: str) -> None:
    if layout not in VERIFICATION_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, VERIFICATION_LAYOUTS))}, got {layout!r}")


def verification_drill(problem, rng, *, statements: int = 6, layout: str = "full",
                       arithmetic_share: float = 0.3, distractors: int = 4,
                       multi_value_share: float | None = None,
                       truths: list[str] | None = None) -> tuple[str, list[str], list[float]]:
    """One step-verification example: a question and ``statements`` statements, each a reading of
    the picture (a fact line of ``picture_facts``) or a calculation (``arithmetic_drill``, with
    probability ``arithmetic_share``), kept true or perturbed (``perturb_reading`` /
    ``perturb_calculation``) with probability 1/2 each; returns (question, statements, labels) with
    label 1.0 for a true statement.  ``layout``: "used" shows only the fact lines the statements
    read, "distractors" those and ``distractors`` other lines, "full" the PRM's own question
    (``prm_question``: every fact line, then the problem's question).  A picture with readings of
    several values (rows, columns) has them read with probability ``multi_value_share`` (``None``:
    every fact line alike; ``ROW_VERIFICATION_CURRICULUM`` draws only those).  ``truths``, when
    given, gets each statement's true version appended (the statement itself where it is true)."""

    _check_layout(layout)
    facts = picture_facts(problem).split("\n")
    if multi_value_share is not None:
        multi = [f for f in facts if len(parse_step(f).values) > 1]
        single = [f for f in facts if f not in multi]
    out: list[str] = []
    labels: list[float] = []
    used: list[str] = []
    for _ in range(statements):
        true = rng.random() < 0.5
        if rng.random() < arithmetic_share:
            truth = arithmetic_drill(rng, 1)[0]
            out.append(truth if true else perturb_calculation(truth, rng))
        else:
            if multi_value_share is None:
                truth = rng.choice(facts)
            else:
                truth = rng.choice(multi if multi and (not single or rng.random() < multi_value_share) else single)
            used.append(truth)
            out.append(truth if true else perturb_reading(truth, rng, problem))
        labels.append(1.0 if true else 0.0)
        if truths is not None:
            truths.append(truth)
    if layout == "full":
        return prm_question(problem, True), out, labels
    shown = list(dict.fromkeys(used))
    if layout == "distractors":
        shown += rng.sample([f for f in facts if f not in shown], min(distractors, len(facts) - len(shown)))
    rng.shuffle(shown)
    return "Picture:\n" + "\n".join(shown), out, labels


@dataclass(frozen=True)
class VerificationPhase:
    """One phase of a step-verification curriculum (``pretrain_step_verification``)."""

    share: float  # of the stage's steps
    layout: str  # verification_drill's layout: "used", "distractors" or "full"
    calculations: bool = True  # statements include calculations (at the stage's arithmetic_share)
    multi_value_share: float | None = None  # several-value readings drawn this often; None: fact lines alike

    def __post_init__(self):
        _check_layout(self.layout)
        if not self.share > 0:
            raise ValueError(f"a phase's share of the steps must be > 0, got {self.share}")


# The comparison at the marker forms only on short layouts, and calculations from the start delay it:
# first the fact lines the statements read, no calculations; then distractor lines; then the whole
# question (the measurements that chose this: RESULTS.md, "Step verification").
VERIFICATION_CURRICULUM = (
    VerificationPhase(0.4, "used", calculations=False),
    VerificationPhase(0.3, "distractors"),
    VerificationPhase(0.3, "full"),
)
# After VERIFICATION_CURRICULUM the marker checks mostly the *last* value of a row or column reading
# (RESULTS.md).  The same short-to-full walk again with row and column readings only (bar charts, which
# have none, keep their one-value readings) teaches it every value.
ROW_VERIFICATION_CURRICULUM = (
    VerificationPhase(0.34, "used", calculations=False, multi_value_share=1.0),
    VerificationPhase(0.33, "distractors", calculations=False, multi_value_share=1.0),
    VerificationPhase(0.33, "full", calculations=False, multi_value_share=1.0),
)


def _prefix_verdicts(tok, question: str, statements: Sequence[str], truths: Sequence[str], tag: str,
                     tag_id: int) -> tuple[list[int], list[float]]:
    """Token ids of a drill and, per token, whether its statement is right *so far* (1.0 up to the
    first token where it departs from its true version, 0.0 from there to its marker; -1.0 outside
    statements and at markers): a verdict target at every statement token, not only at the marker."""
    text = _bare_text(question, statements, tag)
    enc = tok(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    true_ids = tok.encode(_bare_text(question, truths, tag))
    opening = len(text) - len(tag.join(statements) + tag)
    # the first statement's first token may carry the space before it (" 20" after "Process:")
    first = next(i for i, (_, b) in enumerate(enc["offset_mapping"]) if b > opening)
    verdicts = [-1.0] * len(ids)
    markers = [i for i, t in enumerate(ids) if t == tag_id]
    true_markers = [i for i, t in enumerate(true_ids) if t == tag_id]
    begin, true_begin = first, first
    for end, true_end in zip(markers, true_markers):
        span, true_span = ids[begin:end], true_ids[true_begin:true_end]
        right = next((j for j, (a, b) in enumerate(zip(span, true_span)) if a != b), min(len(span), len(true_span)))
        for j in range(len(span)):
            verdicts[begin + j] = 1.0 if j < right else 0.0
        begin, true_begin = end + 1, true_end + 1
    return ids, verdicts


def pretrain_step_verification(prm, problems, *, steps: int = 3000, batch_size: int = 16, lr: float = 1e-3,
                               statements: int = 6, arithmetic_share: float = 0.3,
                               curriculum: Sequence[VerificationPhase] = VERIFICATION_CURRICULUM, seed: int = 0,
                               token_verdicts: float = 0.0,
                               progress: bool = True, desc: str = "step verification") -> list[float]:
    """Step verification at the marker, before PRM training: the format's good/bad verdict after
    every statement of ``verification_drill`` examples (a true or perturbed reading of the picture's
    text or calculation; no policy and no labels from MCTS or the checker -- perturbations of the
    task's own text, as image-text matching in VLM pretraining), binary cross-entropy on the same
    logit difference the trainer and the scorer read.  ``curriculum``: ``VerificationPhase`` items
    in order, each a share of the steps with its layout, whether calculations (``arithmetic_share`` of
    the statements) join, and how often several-value readings are drawn (see
    ``VERIFICATION_CURRICULUM`` and ``ROW_VERIFICATION_CURRICULUM`` for what was measured).
    ``token_verdicts`` > 0 adds, with that weight, the same loss at every statement token against
    "right so far" (``_prefix_verdicts``): the value token where a statement departs from the truth
    is where the mismatch shows, and a marker's verdict is then its last token's (the losses with
    and without, seed by seed: RESULTS.md).  Each call has its own optimizer: a second curriculum
    is a second call.  Returns the marker loss per step (without the token term); ``ValueError``
    on an empty ``curriculum``.
    """

    import torch  # torch: heavy, loaded where used
    import torch.nn.functional as F  # torch: heavy, loaded where used

    if not curriculum:
        raise ValueError("curriculum needs at least one VerificationPhase (e.g. VERIFICATION_CURRICULUM)")
    tok, model, fmt, adapter, head = prm.tokenizer, prm.model, prm.format, prm.adapter, prm.reward_head
    tag = tok.convert_tokens_to_ids(fmt.step_tag)
    bounds, total = [], 0.0
    for phase in curriculum:
        total += phase.share
        bounds.append((total * steps, phase))
    rng = _random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    for step in progress_bar(range(steps), desc=desc, unit="steps", disable=not progress):
        phase = next((ph for end, ph in bounds if step < end), bounds[-1][1])
        batch, targets, verdicts = [], [], []
        for p in rng.sample(problems, min(batch_size, len(problems))):
            truths: list[str] = []
            question, stmts, labels = verification_drill(
                p, rng, statements=statements, layout=phase.layout,
                arithmetic_share=arithmetic_share if phase.calculations else 0.0,
                multi_value_share=phase.multi_value_share, truths=truths)
            if token_verdicts:
                row, row_verdicts = _prefix_verdicts(tok, question, stmts, truths, fmt.step_tag, tag)
                batch.append(row)
                verdicts.append(row_verdicts)
            else:
                batch.append(tok.encode(_bare_text(question, stmts, fmt.step_tag)))
            targets += labels
        ids, mask = _padded(batch, tok)
        hidden = adapter.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        markers = (ids == tag) & (mask == 1)
        diff = head.logit_diff(hidden[markers])  # the scorer's readout: two head rows
        loss = F.binary_cross_entropy_with_logits(diff, torch.tensor(targets))
        losses.append(loss.item())
        if token_verdicts:
            dense = torch.tensor([v + [-1.0] * (ids.shape[1] - len(v)) for v in verdicts])
            where = dense >= 0
            token_diff = head.logit_diff(hidden[where])
            loss = loss + token_verdicts * F.binary_cross_entropy_with_logits(token_diff, dense[where])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return losses
