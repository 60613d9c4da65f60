"""The fast engine: each prefix once, all suffixes packed, rewards only at markers.

Per question the shared prefix (longest common token prefix of its
candidates, cut before any reward position and so that every candidate keeps
a suffix token) runs once through the text decoder; its per-layer K/V is kept
once (``shared_prefix.PrefixKV``).  The candidates' suffix tokens are packed
without padding into one batch-1 sequence, cut by a token budget, with
position ids continuing after the prefix; every layer's attention is the
shared-prefix kernel (see ``shared_prefix``).  Only the decoder body runs: the
hidden rows at marker positions go to the adapter's reward head, so the LM
head never sees the other tokens.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

from mmprm_infer.engines.base import EncodedQuestion, Engine, check_finite
from mmprm_infer.engines.fused_layers import FusedDecoder
from mmprm_infer.engines.last_layer import last_layer_rows_only
from mmprm_infer.engines.linear_paths import PATHS as LINEAR_PATHS
from mmprm_infer.engines.linear_paths import PackedLinears, compute_dtype
from mmprm_infer.engines.linear_paths import choose_path as choose_linear_path
from mmprm_infer.engines.shared_prefix import (
    LAYOUT_KWARG,
    Group,
    PackedLayout,
    PrefixKV,
    shared_prefix_attention_enabled,
)
from mmprm_infer.formats.base import EncodedCandidate, RewardColumns
from mmprm_infer.kernels.prefix_attention import prefix_attention_paths
from mmprm_infer.models.adapters import ModelAdapter


def shared_prefix_length(question: EncodedQuestion) -> int:
    """Longest common prefix, ending before every reward position and leaving each candidate >= 1 token."""
    cands = question.candidates
    # commonprefix works on any sequences; it compares only the lexicographic min and max (fast, in C).
    common = len(os.path.commonprefix([c.input_ids for c in cands]))
    first_reward = min((c.reward_positions[0] for c in cands if c.reward_positions), default=common)
    return max(0, min(common, first_reward, min(len(c.input_ids) for c in cands) - 1))


@dataclass
class _Item:
    """One candidate waiting in a suffix batch."""

    question: int
    candidate: int
    prefix: PrefixKV


class FastEngine(Engine):
    name = "fast"

    # Tokens per forward when the caller sets no budget.  On CPU small batches
    # keep activations in cache: W1 at 1024 runs as fast as at 16384 with
    # about half the peak memory (bench/README.md); GPUs want large batches.
    DEFAULT_BUDGET = {"cpu": 1024, "cuda": 16384}

    def __init__(self, max_batch_tokens: int | None = None, prune_last_layer: bool = True, linear: str = "auto",
                 fused: bool = True):
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if linear not in LINEAR_PATHS:
            raise ValueError(f"linear must be one of {list(LINEAR_PATHS)}, got {linear!r}")
        self.max_batch_tokens = max_batch_tokens
        # CPU linear layers: "auto" measures torch's path against oneDNN with prepacked weights
        # once per model shape set and keeps the faster (linear_paths.py).
        self.linear = linear
        self._packs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> PackedLinears
        # The last decoder layer runs its queries, attention, MLP and final norm for the marker rows
        # only (last_layer.py); False runs it whole (the equivalence tests compare both).
        self.prune_last_layer = prune_last_layer
        # Llama/Qwen2/Mistral decoders run as fused steps (fused_layers.py); False keeps transformers'
        # modules with the shared-prefix attention plugged in (what every other decoder runs).
        self.fused = fused
        self._fused: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> FusedDecoder
        self._told: set = set()  # (decoder id, dtype) whose fp32 fallback was announced

    def batch_budget(self, adapter: ModelAdapter) -> int:
        return self.max_batch_tokens or self.DEFAULT_BUDGET.get(adapter.device.type, 16384)

    @torch.inference_mode()
    def score(self, adapter: ModelAdapter, columns: RewardColumns, questions: list[EncodedQuestion]):
        results: list[list] = [[None] * len(q.candidates) for q in questions]
        budget = self.batch_budget(adapter)
        decoder = adapter.decoder
        with self._decoder_path(adapter, decoder, budget):
            batch: list[_Item] = []
            batch_tokens = 0
            for qi, question in enumerate(questions):
                if not question.candidates:
                    continue
                prefix = self._run_prefix(adapter, decoder, question, budget)
                for ci, cand in enumerate(question.candidates):
                    n = len(cand.input_ids) - prefix.length
                    # A candidate longer than the budget still runs, alone.
                    if batch and batch_tokens + n > budget:
                        self._run_suffixes(adapter, decoder, columns, questions, batch, results)
                        batch, batch_tokens = [], 0
                    batch.append(_Item(qi, ci, prefix))
                    batch_tokens += n
            if batch:
                self._run_suffixes(adapter, decoder, columns, questions, batch, results)
        return results

    def linear_path(self, adapter: ModelAdapter, decoder=None) -> str:
        """The path this engine's linear layers take for ``adapter``'s model: "torch" or "onednn"."""
        if adapter.device.type != "cpu":
            return "torch"
        return choose_linear_path(decoder or adapter.decoder, self.batch_budget(adapter), self.linear,
                                  dtype=self.compute_dtype(adapter)[0])

    def compute_dtype(self, adapter: ModelAdapter) -> tuple[torch.dtype, str]:
        """(dtype, why) the decoder body runs in: the model's, or fp32 for a half-precision model on a CPU
        without fast half-precision GEMMs (fused path; transformers' modules keep the model's dtype)."""
        if not self._uses_fused(adapter.decoder):
            return adapter.dtype, "the model's dtype (transformers' modules)"
        return compute_dtype(adapter.dtype, adapter.device)

    def describe(self, adapter: ModelAdapter) -> dict:
        """How this engine runs ``adapter``'s model here: decoder path, compute dtype and why, linear path
        (the fused layers' own where they compute on the model's weights for lack of memory)."""
        dtype, why = self.compute_dtype(adapter)
        info = {"decoder": "transformers modules", "compute_dtype": str(dtype).removeprefix("torch."),
                "compute_dtype_why": why, "linear_path": self.linear_path(adapter),
                "last_layer": "marker rows" if self.prune_last_layer else "every row",
                "prefix_attention": prefix_attention_paths()}
        if self._uses_fused(adapter.decoder):
            fused = self._fused_decoder(adapter, adapter.decoder, self.batch_budget(adapter))
            info.update(decoder="fused layers" if fused.copies else "fused layers on the model's weights "
                        "(no memory for a fused copy)", linear_path=fused.path)
        return info

    def warmup(self, adapter: ModelAdapter, columns: RewardColumns, prefix_tokens: int = 512,
               candidates: int = 2, suffix_tokens: int = 64) -> dict[str, float]:
        """Make the one-time choices and preparations now, outside a user's first call; seconds per step.

        "choices": the linear path, the compute dtype and the CPU's prefix-attention path, measured once
        per process and shape class; "prepare": fused and packed weights; "first_call": one scoring call
        on synthetic ids of these sizes (oneDNN creates its kernels per shape on first use).  A server or
        CLI calls it once after loading (``PRM.warmup``)."""
        seconds = {}
        start = time.perf_counter()
        self.describe(adapter)
        seconds["choices"] = time.perf_counter() - start
        start = time.perf_counter()
        if self._uses_fused(adapter.decoder):
            self._fused_decoder(adapter, adapter.decoder, self.batch_budget(adapter)).prepared()
        seconds["prepare"] = time.perf_counter() - start
        start = time.perf_counter()
        self.score(adapter, columns, [_synthetic_question(prefix_tokens, candidates, suffix_tokens)])
        seconds["first_call"] = time.perf_counter() - start
        return seconds

    def _uses_fused(self, decoder) -> bool:
        return self.fused and FusedDecoder.supports(decoder)

    def _fused_decoder(self, adapter: ModelAdapter, decoder, budget: int) -> FusedDecoder:
        dtype, why = self.compute_dtype(adapter)
        if dtype != adapter.dtype and (id(decoder), dtype) not in self._told:
            self._told.add((id(decoder), dtype))
            warnings.warn(f"mmprm fast engine: a {adapter.dtype} model computes in {why}", stacklevel=3)
        path = self.linear_path(adapter, decoder)
        fused = self._fused.get(decoder)
        if fused is None or (fused.dtype, fused.path, fused.rows) != (dtype, path, budget):
            fused = self._fused[decoder] = FusedDecoder(decoder, dtype, path, budget)
        return fused

    def _decoder_path(self, adapter: ModelAdapter, decoder, budget: int) -> ExitStack:
        """Shared-prefix attention, plus the fused layers or (other decoders) the last-layer pruning and
        packed linears on transformers' modules."""
        stack = ExitStack()
        stack.enter_context(shared_prefix_attention_enabled(decoder))
        if self._uses_fused(decoder):
            stack.enter_context(self._fused_decoder(adapter, decoder, budget).active())
            return stack
        if self.prune_last_layer:
            stack.enter_context(last_layer_rows_only(decoder))
        stack.enter_context(self._linear_path(adapter, decoder, budget))
        return stack

    def _linear_path(self, adapter: ModelAdapter, decoder, budget: int):
        if self.linear_path(adapter, decoder) == "torch":
            return nullcontext()
        if decoder not in self._packs:
            self._packs[decoder] = PackedLinears(decoder, budget)
        return self._packs[decoder].active()

    # --- passes ------------------------------------------------------------
    def _embeds(self, adapter: ModelAdapter, question: EncodedQuestion, ids: list[int]) -> torch.Tensor | None:
        """Image-merged embeddings of a whole candidate (placeholder counts must match), or None for text."""
        if question.image_features is None:
            return None
        tensor = torch.tensor(ids, dtype=torch.long, device=adapter.device)
        return adapter.merge_image_features(tensor, question.image_features)

    def _forward(self, adapter, decoder, ids: list[int], embeds: torch.Tensor | None, positions: list[int],
                 layout: PackedLayout) -> torch.Tensor:
        device = adapter.device
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        pos = pos[None] if pos.dim() == 1 else pos.T[:, None]  # [1, T]; M-RoPE (t, h, w) rows -> [3, 1, T]
        inputs = ({"inputs_embeds": embeds[None]} if embeds is not None
                  else {"input_ids": torch.tensor(ids, dtype=torch.long, device=device)[None]})
        # use_cache=False: no DynamicCache copy of the K/V; the layout carries all attention state.
        out = decoder(**inputs, position_ids=pos, use_cache=False, **{LAYOUT_KWARG: layout})
        return out.last_hidden_state[0]

    def _run_prefix(self, adapter, decoder, question: EncodedQuestion, budget: int) -> PrefixKV:
        """Run the prefix once, in budget-sized chunks that attend to the K/V stored so far."""
        prefix = PrefixKV(shared_prefix_length(question))
        if prefix.length == 0:
            return prefix
        ids = question.candidates[0].input_ids
        embeds = self._embeds(adapter, question, ids)
        rope = adapter.position_ids(ids, question.image_features)
        for start in range(0, prefix.length, budget):
            end = min(prefix.length, start + budget)
            # rows=[]: nothing of the prefix is read, so its last layer only stores K/V
            layout = PackedLayout([Group(0, end - start, prefix, start, [0, end - start], append=True)],
                                  rows=[] if self.prune_last_layer else None)
            self._forward(adapter, decoder, ids[start:end], None if embeds is None else embeds[start:end],
                          _positions(rope, start, end), layout)
        return prefix

    def _run_suffixes(self, adapter, decoder, columns, questions, batch: list[_Item], results) -> None:
        ids: list[int] = []
        positions: list[int] = []
        image_rows: list[tuple[int, torch.Tensor]] = []  # (packed start, image-merged suffix embeddings)
        markers: list[int] = []  # packed rows holding a reward position
        cu_markers = [0]
        groups: list[Group] = []
        for item in batch:
            question = questions[item.question]
            cand = question.candidates[item.candidate]
            p = item.prefix.length
            if not groups or groups[-1].prefix is not item.prefix:
                groups.append(Group(len(ids), len(ids), item.prefix, p, [0]))
            markers.extend(len(ids) + r - p for r in cand.reward_positions)
            cu_markers.append(len(markers))
            full = self._embeds(adapter, question, cand.input_ids)
            if full is not None:
                image_rows.append((len(ids), full[p:]))
            ids.extend(cand.input_ids[p:])
            positions.extend(_positions(adapter.position_ids(cand.input_ids, question.image_features),
                                        p, len(cand.input_ids)))
            groups[-1].end = len(ids)
            groups[-1].cu_seqlens.append(groups[-1].end - groups[-1].start)
        packed_embeds = None
        if image_rows:  # an image somewhere: the whole batch goes in as embeddings
            packed_embeds = adapter.embed(torch.tensor(ids, dtype=torch.long, device=adapter.device))
            for start, rows in image_rows:
                packed_embeds[start:start + rows.shape[0]] = rows
        layout = PackedLayout(groups, rows=markers if self.prune_last_layer else None)
        hidden = self._forward(adapter, decoder, ids, packed_embeds, positions, layout)
        if self.prune_last_layer:  # the decoder returned the marker rows alone, in order
            index = torch.arange(len(markers), device=hidden.device)
        else:
            index = torch.tensor(markers, dtype=torch.long, device=hidden.device)
        rows = hidden.index_select(0, index)
        rewards = adapter.reward_head(columns).rewards(rows)
        # One device sync per batch; on failure find and name the first bad candidate.
        if not (torch.isfinite(rows).all() and torch.isfinite(rewards).all()):
            for item, a, b in zip(batch, cu_markers, cu_markers[1:]):
                check_finite(rows[a:b], item.question, item.candidate)
                check_finite(rewards[a:b], item.question, item.candidate)
        values = rewards.tolist()
        for item, a, b in zip(batch, cu_markers, cu_markers[1:]):
            results[item.question][item.candidate] = values[a:b]


def _synthetic_question(prefix_tokens: int, candidates: int, suffix_tokens: int) -> EncodedQuestion:
    """Token ids 1, 2, ... (any vocabulary has them): a shared prefix, then candidates with a marker at every
    16th suffix token and at their last one."""
    prefix = list(range(1, prefix_tokens + 1))
    cands = []
    for c in range(candidates):
        ids = prefix + [1 + (c * suffix_tokens + i) % 97 for i in range(suffix_tokens)]
        markers = sorted({len(ids) - 1, *range(prefix_tokens + 15, len(ids), 16)})
        cands.append(EncodedCandidate(ids, markers))
    return EncodedQuestion(cands)


def _positions(rope: torch.Tensor | None, start: int, end: int) -> list:
    """Positions start..end-1, or there the (t, h, w) rows of an M-RoPE model's ids [3, T] for the whole
    candidate (``adapter.position_ids``): a suffix continues its prefix's positions, image offsets included."""
    return list(range(start, end)) if rope is None else rope[:, start:end].T.tolist()
