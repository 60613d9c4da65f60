"""PRM: a checkpoint, its tokenizer and its format, scoring candidates."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmprm_infer.engines import DEFAULT_ENGINE, EncodedQuestion, Engine, get_engine
from mmprm_infer.formats import EncodedCandidate, FormatError, PRMFormat, get_format
from mmprm_infer.loading import (
    FORMAT_KEY,
    FORMAT_OPTIONS_KEY,
    REMOTE_CODE_REFUSAL,
    LoadOptions,
    load_checkpoint,
    resolve_checkpoint,
)
from mmprm_infer.models import RewardHead, adapter_for

Candidate = str | Sequence[str]


@dataclass
class ScoringItem:
    """One question with its candidates, as accepted by ``PRM.score_batch``."""

    question: str
    candidates: Sequence[Candidate]
    image: Any = None


class PRM:
    """A process reward model ready to score step-by-step solutions.

    ``PRM(model, tokenizer, format="math-shepherd")`` wraps a loaded
    transformers model; ``PRM.from_pretrained(path)`` loads one from disk.
    """

    def __init__(self, model, tokenizer, format: str | PRMFormat, *, engine: str | Engine | None = None,
                 max_batch_tokens: int | None = None, **format_options):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.format = get_format(format, **format_options)
        self.format_options = format_options
        self.format.check_tokenizer(tokenizer)
        self.adapter = adapter_for(model, self.format.model_kind)
        self.columns = self.format.reward_columns(tokenizer)
        self.max_batch_tokens = max_batch_tokens
        self.default_engine = engine or DEFAULT_ENGINE
        self._engines: dict[str | Engine, Engine] = {}  # a default engine given as an Engine is its own key

    @property
    def reward_head(self) -> RewardHead:
        """The adapter's reward head on this format's columns: ``rewards`` / ``logit_diff`` of final-normed
        hidden rows at step markers (what the engines score with and the trainer's loss differentiates)."""
        return self.adapter.reward_head(self.columns)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, format: str | None = None, device=None, dtype=None,
                        engine: str | None = None, *, torch_dtype=None, device_map=None,
                        attn_implementation: str | None = None, trust_remote_code: bool = False,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = True, max_batch_tokens: int | None = None,
                        **format_options) -> PRM:
        """Load a PRM from a checkpoint folder, or a hub id in the local Hugging Face cache (never downloaded).

        ``format``: read from the checkpoint when None.  ``device``: None picks cuda when torch sees a GPU,
        else cpu.  ``dtype`` (or transformers' older name ``torch_dtype``): None is float32 on CPU and
        bfloat16 on CUDA; ``"auto"`` the checkpoint's.  ``device_map``: one device (``"cuda:0"``,
        ``{"": 0}``) for any engine, or a map spreading the model over devices (``"auto"``) for the engines
        that take it (``loading.DEVICE_MAP_ENGINES``).  ``attn_implementation`` goes to transformers (the
        reference engine and training use it; the fast engine runs its own shared-prefix attention).
        ``trust_remote_code=True`` is refused: every supported format loads with transformers' classes or
        this library's.  Other keywords are the format's options (``custom``: ``step_tag`` ...).
        """
        if trust_remote_code:
            raise ValueError(REMOTE_CODE_REFUSAL)
        if not local_files_only:
            raise ValueError("local_files_only=False: this library never downloads a model; fetch it once "
                             "(`hf download ORG/NAME`) and load it from the local Hugging Face cache or its folder")
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one (torch_dtype "
                                 "is transformers' older name for dtype)")
            dtype = torch_dtype
        options = LoadOptions(device=device, dtype=dtype, device_map=device_map,
                              attn_implementation=attn_implementation, engine=engine)
        folder = resolve_checkpoint(path, revision=revision, cache_dir=cache_dir)
        model, tokenizer, name, saved_options = load_checkpoint(folder, format, dtype, options.device,
                                                                format_options, load_options=options)
        return cls(model, tokenizer, name, engine=engine, max_batch_tokens=max_batch_tokens,
                   **{**saved_options, **format_options})

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save model and tokenizer so ``from_pretrained(path)`` needs no format argument."""
        setattr(self.model.config, FORMAT_KEY, self.format.name)
        options = self.format_options or _non_default_fields(self.format)
        setattr(self.model.config, FORMAT_OPTIONS_KEY, options)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # --- input handling -------------------------------------------------
    def split_candidate(self, candidate: Candidate, index: int) -> list[str]:
        if isinstance(candidate, str):
            steps = self.format.split_steps(candidate)
        elif isinstance(candidate, (list, tuple)) and all(isinstance(s, str) for s in candidate):
            steps = list(candidate)
        else:
            raise TypeError(
                f"candidate {index} is a {type(candidate).__name__}; give a solution string or a "
                "list of step strings"
            )
        if not steps or any(not s.strip() for s in steps):
            raise FormatError(
                f"candidate {index} has {'no steps' if not steps else 'an empty step'}; every candidate "
                "needs at least one step of non-blank text (drop or fix it before scoring)"
            )
        return steps

    def encode(self, question: str, candidates: Sequence[Candidate], image=None, *,
               errors: dict[int, str] | None = None) -> EncodedQuestion:
        """Token ids and marker positions of every candidate, image features computed once.

        ``errors``: when given, a candidate that cannot be encoded (no steps, a step tag inside its text,
        longer than the model's context) is left out instead of failing the call, and why goes into
        ``errors[its index]``; the encoded candidates are the others, in input order.  Errors about the
        question or the image are raised either way.
        """
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        if isinstance(candidates, str) or not isinstance(candidates, Sequence):
            raise TypeError("candidates must be a list of solutions; wrap a single one as [solution]")
        if len(candidates) == 0:
            raise ValueError("candidates is empty: give at least one candidate solution to score")
        if errors is not None:
            self._check_question(question)
        image_tokens, image_features = self._prepare_images(image)
        limit = self.adapter.max_positions
        encoded: list[EncodedCandidate] = []
        for i, cand in enumerate(candidates):
            try:
                enc = self.format.encode(self.tokenizer, question, self.split_candidate(cand, i), image_tokens)
                if limit is not None and len(enc.input_ids) > limit:
                    raise ValueError(
                        f"candidate {i} is {len(enc.input_ids)} tokens long (question, image and steps), "
                        f"more than the model's context of {limit} tokens; shorten the candidate or question"
                    )
            except (FormatError, ValueError, TypeError) as exc:
                if errors is None:
                    raise
                errors[i] = str(exc)
                continue
            encoded.append(enc)
        if not encoded:
            # Nothing readable: if the question itself is the problem, say so rather than blaming every candidate.
            self.format.encode(self.tokenizer, question, ["x"], image_tokens)
        return EncodedQuestion(encoded, image_features)

    def _check_question(self, question: str) -> None:
        """A question longer than the context fails once here, instead of once for every candidate.

        Only questions of more characters than the context has tokens are tokenized here (a token spans at
        least one character, almost always), so the usual short question costs nothing extra.
        """
        limit = self.adapter.max_positions
        if limit is None or len(question) <= limit:
            return
        tokens = len(self.tokenizer(question, add_special_tokens=False)["input_ids"])
        if tokens > limit:
            raise ValueError(f"the question is {tokens} tokens long, more than the model's context of {limit} "
                             "tokens; shorten the question")

    def _prepare_images(self, image) -> tuple[list[str], torch.Tensor | None]:
        """Placeholder text per image and the image features, computed once per question."""
        if image is None or (isinstance(image, (list, tuple)) and len(image) == 0):
            return [], None
        if not self.format.supports_images:
            raise FormatError(
                f"format {self.format.name!r} is text-only and cannot take an image; pass image=None "
                "or use a multimodal format (mm-prm, visualprm, custom on a vision-language model)"
            )
        # formats that support images define prepare_images
        return self.format.prepare_images(self.adapter, image)  # type: ignore[attr-defined]

    # --- scoring --------------------------------------------------------
    def engine(self, name: str | Engine | None = None) -> Engine:
        if isinstance(name, Engine):
            engine = name
        else:
            key = name or self.default_engine
            if key not in self._engines:
                self._engines[key] = get_engine(key, max_batch_tokens=self.max_batch_tokens)
            engine = self._engines[key]
        attach = getattr(engine, "attach", None)
        if attach is not None:  # an engine that runs the checkpoint itself (vLLM) learns its path and format
            attach(self)
        return engine

    def warmup(self, engine: str | Engine | None = None, **sizes) -> dict[str, float]:
        """Make ``engine``'s one-time choices and preparations now (path measurements, packed weights, the
        first call's kernel set-up), so a server's or CLI's first request does not pay them; seconds per
        step, {} for an engine without any.  sizes: the warm-up call's shape (see ``FastEngine.warmup``)."""
        chosen = self.engine(engine)
        warm = getattr(chosen, "warmup", None)
        return warm(self.adapter, self.columns, **sizes) if warm is not None else {}

    def score(
        self, question: str, candidates: Sequence[Candidate], image=None, engine: str | None = None
    ) -> list[list[float]]:
        """Step rewards in [0, 1]: one list per candidate, one reward per step, input order."""
        return self.score_batch([ScoringItem(question, candidates, image)], engine=engine)[0]

    def score_batch(
        self, items: Sequence[ScoringItem | tuple | dict], engine: str | Engine | None = None
    ) -> list[list[list[float]]]:
        """Score many questions in one call; each question's prefix is shared by its candidates."""
        questions = [self.encode(it.question, it.candidates, it.image) for it in map(_as_item, items)]
        return self.engine(engine).score(self.adapter, self.columns, questions)

    def score_readable(self, items: Sequence[ScoringItem | tuple | dict], engine: str | Engine | None = None
                       ) -> tuple[list[list[list[float] | None]], list[dict[int, str]]]:
        """``score_batch`` that does not fail on a candidate the PRM cannot read (see ``encode``'s ``errors``):
        such a candidate's step rewards are None, and each item's dict says why (candidate index -> reason).
        Sampled text from a policy hits these cases; one bad sample must not fail the others.  One engine call."""
        as_items = [_as_item(it) for it in items]
        errors: list[dict[int, str]] = [{} for _ in as_items]
        questions = [self.encode(it.question, it.candidates, it.image, errors=e) for it, e in zip(as_items, errors)]
        rewards = self.engine(engine).score(self.adapter, self.columns, questions)
        out: list[list[list[float] | None]] = []
        for item, errs, got in zip(as_items, errors, rewards):
            scored = iter(got)
            out.append([None if i in errs else next(scored) for i in range(len(item.candidates))])
        return out, errors


def batch_then_each(run: Callable[[list], list], items: Sequence, failed: Callable[[Any, Exception], Any]) -> list:
    """``run(items)``, one result per item, in one call; when that raises, ``run([item])`` for each item, so
    only a bad item fails: its result is then ``failed(item, exception)``."""
    items = list(items)
    try:
        return list(run(items))
    except Exception as exc:  # noqa: BLE001 - any item can be bad; the caller says what its failure looks like
        if len(items) == 1:
            return [failed(items[0], exc)]
    out = []
    for item in items:
        try:
            out.append(run([item])[0])
        except Exception as exc:  # noqa: BLE001
            out.append(failed(item, exc))
    return out


def _as_item(item) -> ScoringItem:
    if isinstance(item, ScoringItem):
        return item
    if isinstance(item, dict):
        return ScoringItem(item["question"], item["candidates"], item.get("image"))
    return ScoringItem(*item)


def _non_default_fields(fmt: PRMFormat) -> dict:
    if not dataclasses.is_dataclass(fmt):
        return {}
    return {f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt) if getattr(fmt, f.name) != f.default}
