"""Benchmark workloads: model shapes, cached random-weight checkpoints, deterministic inputs.

W1 (text) and W2 (multimodal) follow the project design notes ("Benchmark
workloads".  Models are built offline with the library's own tiny builders
(``mmprm_infer.testing.tiny`` / ``mmprm_infer.testing.tiny_internvl``), saved once under a
cache directory and loaded back through ``PRM.from_pretrained`` (or, for the
InternVL fallback route, ``from_pretrained`` of the transformers class).

Inputs are text built from a seeded word list; the word counts are fitted so
that the *measured* token counts hit the targets (P shared prompt tokens, S
suffix tokens per candidate), and the measured counts are what the report
prints.  Every engine scores exactly the token sequences ``prm.encode``
produces from that text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class TextModelSpec:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 1408
    vocab_size: int = 32000
    max_positions: int = 8192  # room for the P = 4000 sweep point

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class VisionSpec:
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    intermediate: int = 512
    image_size: int = 448  # tile side; 448 / 14 = 32 patches -> 16 x 16 = 256 tokens per tile
    patch_size: int = 14

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return (side // 2) ** 2


@dataclass(frozen=True)
class Workload:
    """One benchmark point: a model and the shape of one question's candidates."""

    name: str  # "W1" / "W2"
    model: TextModelSpec
    n_candidates: int  # N
    prompt_tokens: int  # W1: shared prompt P; W2: the question text alone (image tokens come on top)
    suffix_tokens: int  # S, tokens per candidate after the shared prompt
    steps: int = 8
    vision: VisionSpec | None = None  # W2 only
    max_tiles: int = 6  # W2: 6 tiles + thumbnail = 7 tiles
    seed: int = 0

    @property
    def multimodal(self) -> bool:
        return self.vision is not None

    def with_(self, **changes) -> Workload:
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        return f"{self.name} N={self.n_candidates} P={self.prompt_tokens} S={self.suffix_tokens}"


W1_MODEL = TextModelSpec()
W1 = Workload("W1", W1_MODEL, n_candidates=16, prompt_tokens=1000, suffix_tokens=200, steps=8)
W2 = Workload("W2", W1_MODEL, n_candidates=16, prompt_tokens=100, suffix_tokens=300, steps=8, vision=VisionSpec())
# W3: the GEMM regime of real PRMs -- two decoder layers at Qwen2.5-7B's dimensions (the bench's GEMM target); the
# vocabulary only as big as the tokenizer and the inputs need.
W3_MODEL = TextModelSpec(hidden=3584, layers=2, heads=28, kv_heads=4, intermediate=18944, vocab_size=4096,
                         max_positions=4096)
W3 = Workload("W3", W3_MODEL, n_candidates=16, prompt_tokens=1000, suffix_tokens=200, steps=8)
SWEEP_N = (1, 4, 16, 64)
SWEEP_P = (100, 1000, 4000)

# --quick: tiny dims for CI smoke runs.  head_dim 32 (vLLM's CPU attention needs >= 32).
QUICK_MODEL = TextModelSpec(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab_size=1024,
                            max_positions=2048)
QUICK_W1 = Workload("W1", QUICK_MODEL, n_candidates=4, prompt_tokens=64, suffix_tokens=48, steps=4)
QUICK_W2 = Workload("W2", QUICK_MODEL, n_candidates=4, prompt_tokens=20, suffix_tokens=48, steps=4,
                    vision=VisionSpec(hidden=32, layers=1, heads=1, intermediate=64, image_size=224))
QUICK_W3 = Workload("W3", QUICK_MODEL.__class__(hidden=128, layers=2, heads=4, kv_heads=1, intermediate=384,
                                                 vocab_size=1024, max_positions=2048),
                    n_candidates=4, prompt_tokens=64, suffix_tokens=48, steps=4)
QUICK_SWEEP_N = (1, 2, 4)
QUICK_SWEEP_P = (32, 64)


def base_workloads(which: str, quick: bool) -> list[Workload]:
    w1, w2, w3 = (QUICK_W1, QUICK_W2, QUICK_W3) if quick else (W1, W2, W3)
    return {"W1": [w1], "W2": [w2], "W3": [w3], "all": [w1, w2, w3]}[which]


def sweep_points(base: Workload, quick: bool) -> list[tuple[str, Workload]]:
    """(axis, workload) for the N sweep then the P sweep of a text workload; the base point is shared."""
    ns, ps = (QUICK_SWEEP_N, QUICK_SWEEP_P) if quick else (SWEEP_N, SWEEP_P)
    points = [("N", base.with_(n_candidates=n)) for n in ns]
    points += [("P", base.with_(prompt_tokens=p)) for p in ps]
    return points


# ---------------------------------------------------------------------------
# checkpoints (built once, cached by a hash of spec + builder source)

TEXT_FORMAT = "math-shepherd"  # W1: tag "ки", reward tokens "+" / "-"


def _source_hash(*objs) -> str:
    h = hashlib.sha256()
    for obj in objs:
        h.update(inspect.getsource(obj).encode())
    return h.hexdigest()[:10]


def _cached(cache_dir: Path, kind: str, spec: dict, builder: Callable[[Path], Any], source_key: str) -> Path:
    key = hashlib.sha256(json.dumps({"spec": spec, "src": source_key}, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{kind}-{key}"
    done = path / "BENCH_SPEC.json"
    if not done.is_file():
        builder(path)
        done.write_text(json.dumps(spec, indent=1, sort_keys=True))
    return path


def _spread_weights(model, hidden: int, prefix: str = "", seed: int = 0) -> None:
    """Redraw every 2-D weight under ``prefix`` except embeddings from N(0, (1.1 / sqrt(hidden))^2).

    With transformers' default init (std 0.02) a random decoder barely mixes
    context: every marker's reward sits at 0.50 +- 0.01, so "fast agrees with
    reference" would say little.  With this std the rewards spread over
    (0.02, 0.98) (checked on W1) and stay finite.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    std = 1.1 / hidden ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix) and p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def text_checkpoint(spec: TextModelSpec, cache_dir: Path) -> Path:
    """A Qwen2ForCausalLM (random weights, seed 0) with the math-shepherd tokens, cached."""
    from mmprm_infer.testing import tiny

    def build(path: Path) -> None:
        from transformers import AutoModelForCausalLM

        tiny.build_tiny_causal_lm(
            path, arch="qwen2", extra_tokens=("ки", "+", "-"), hidden=spec.hidden, layers=spec.layers,
            heads=spec.heads, kv_heads=spec.kv_heads, intermediate=spec.intermediate,
            max_positions=spec.max_positions, vocab_size=spec.vocab_size, seed=0,
        )
        model = AutoModelForCausalLM.from_pretrained(path)
        _spread_weights(model, spec.hidden)
        model.save_pretrained(path)

    return _cached(cache_dir, "qwen2", dataclasses.asdict(spec), build, _source_hash(tiny, _spread_weights))


def internvl_checkpoint(spec: TextModelSpec, vision: VisionSpec, cache_dir: Path) -> Path:
    """An InternVLForConditionalGeneration (the W1 text model dims + a small vision tower), cached."""
    from mmprm_infer.testing import tiny_internvl

    def build(path: Path) -> None:
        tiny_internvl.build_tiny_internvl(
            path, text_hidden=spec.hidden, text_layers=spec.layers, heads=spec.heads, kv_heads=spec.kv_heads,
            intermediate=spec.intermediate, vocab_size=spec.vocab_size, vision_hidden=vision.hidden,
            vision_layers=vision.layers, vision_heads=vision.heads, vision_intermediate=vision.intermediate,
            image_size=vision.image_size, patch_size=vision.patch_size, extra_special_tokens=("<prm>",), seed=0,
        )
        from transformers import InternVLForConditionalGeneration

        model = InternVLForConditionalGeneration.from_pretrained(path)
        _spread_weights(model, spec.hidden, prefix="model.language_model.")
        _spread_weights(model, spec.hidden, prefix="lm_head.", seed=1)
        model.save_pretrained(path)

    spec_dict = {"text": dataclasses.asdict(spec), "vision": dataclasses.asdict(vision)}
    return _cached(cache_dir, "internvl", spec_dict, build, _source_hash(tiny_internvl, _spread_weights))


# ---------------------------------------------------------------------------
# deterministic inputs

WORDS = (
    "the rectangle is long and wide so its area square half of answer ducks lay eggs per day she eats three "
    "for breakfast bakes muffins with four sells remainder at market daily fresh duck egg bar chart shows "
    "values sum two largest bars question what total numbers in grid process add each row then rows "
    "therefore final we compute triangle has angles degrees third let number apples be reason step by put "
    "your within image pie sectors read value sector carefully multiply divide subtract count cells column "
    "circle radius perimeter product line figure equals gives becomes makes first"
).split() + [str(i) for i in range(2, 100, 7)]


@dataclass
class Inputs:
    """One question with its candidates, as text (and image), plus the measured token counts."""

    question: str
    candidates: list[list[str]]  # steps per candidate
    image: Any = None  # PIL image (W2)
    token_counts: dict = field(default_factory=dict)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _fit(count: Callable[[int], int], target: int, lo: int = 1) -> int:
    """Smallest word count k >= lo with count(k) >= target (count grows with k)."""
    hi = max(lo, 1)
    while count(hi) < target:
        lo, hi = hi + 1, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


def _fit_words(words: Sequence[str], count: Callable[[list[str]], int], target: int) -> list[str]:
    """Fewest leading ``words`` reaching ``target`` tokens; then, if that overshoots, swap the last
    word for another list word that lands exactly on ``target`` (deterministic order), if one does."""
    n = _fit(lambda k: count(list(words[:k])), target)
    chosen = list(words[:n])
    if count(chosen) > target:
        for alt in WORDS:
            trial = chosen[:-1] + [alt]
            if count(trial) == target:
                return trial
    return chosen


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    import os

    return len(os.path.commonprefix([list(s) for s in seqs]))


def make_inputs(prm, w: Workload, image_tokens: Sequence[str] = (), image: Any = None) -> Inputs:
    """Question and N candidates of ``w.steps`` steps whose token counts hit the workload's targets.

    Text workloads fit the question so the prompt the candidates share is
    ``w.prompt_tokens`` long; multimodal ones fit the question text alone to
    ``w.prompt_tokens`` (the image adds its tokens on top).  Each candidate
    then gets ``w.suffix_tokens`` more tokens, spread over its steps.
    """
    fmt, tok = prm.format, prm.tokenizer
    rng = random.Random(w.seed)
    pool = [rng.choice(WORDS) for _ in range(20 * max(w.prompt_tokens, 64))]

    def encode(question: str, steps: list[str]) -> list[int]:
        return fmt.encode(tok, question, steps, list(image_tokens)).input_ids

    # Each candidate opens with its own word, so candidates share only the prompt.
    openers = [WORDS[c % len(WORDS)] for c in range(w.n_candidates)]

    def shared(question: str) -> int:
        # What the candidates share: the common prefix of one-step solutions with every opener
        # (and two probes, so one candidate alone still counts as "the prompt" only).
        probes = ["alpha", "zeta", *openers]
        return common_prefix_len([encode(question, [p]) for p in probes])

    def question_text(ws: list[str]) -> str:
        return " ".join(ws).capitalize() + "?"

    if w.multimodal:
        fitted = _fit_words(pool, lambda ws: len(tok.encode(question_text(ws), add_special_tokens=False)),
                            w.prompt_tokens)
    else:
        fitted = _fit_words(pool, lambda ws: shared(question_text(ws)), w.prompt_tokens)
    question = question_text(fitted)
    prompt_len = shared(question)

    candidates = []
    for c in range(w.n_candidates):
        crng = random.Random(f"{w.seed}-{c}")
        words = [openers[c]] + [crng.choice(WORDS) for _ in range(40 * w.suffix_tokens)]
        steps: list[str] = []
        used = 0
        for s in range(w.steps):
            target = round(w.suffix_tokens * (s + 1) / w.steps)

            def suffix(ws: list[str]) -> int:
                # B023: called only by _fit_words below, within this iteration
                return len(encode(question, steps + [" ".join(ws)])) - prompt_len  # noqa: B023

            step_words = _fit_words(words[used:], suffix, target)
            steps.append(" ".join(step_words))
            used += len(step_words)
        candidates.append(steps)
    return Inputs(question, candidates, image)


def measure_tokens(prm, inputs: Inputs) -> dict:
    """Token counts exactly as the engines see them (prm.encode), incl. the FLOP-relevant layout."""
    from mmprm_infer.engines.fast import shared_prefix_length

    encoded = prm.encode(inputs.question, inputs.candidates, inputs.image)
    lengths = [len(c.input_ids) for c in encoded.candidates]
    prefix = shared_prefix_length(encoded)
    suffixes = [n - prefix for n in lengths]
    image_token_count = 0
    if inputs.image is not None:
        image_id = getattr(prm.model.config, "image_token_id", None)
        image_token_count = sum(1 for t in encoded.candidates[0].input_ids if t == image_id)
    return {
        "shared_prefix": prefix,
        "suffix_lengths": suffixes,
        "suffix_mean": sum(suffixes) / len(suffixes),
        "candidate_lengths": lengths,
        "total_tokens": sum(lengths),  # what a no-sharing engine runs
        "unique_tokens": prefix + sum(suffixes),  # what a sharing engine must run
        "markers": [c.num_steps for c in encoded.candidates],
        "image_tokens": image_token_count,
        "question_tokens": len(prm.tokenizer.encode(inputs.question, add_special_tokens=False)),
    }


def bench_image(max_tiles: int, tile: int):
    """A deterministic 3:2 image; with max_tiles 6 it tiles 3 x 2 (+ thumbnail = 7 tiles)."""
    from PIL import Image

    return Image.effect_mandelbrot((3 * tile, 2 * tile), (-2, -1, 1, 1), 60).convert("RGB")
