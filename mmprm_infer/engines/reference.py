"""The oracle: one full forward per candidate, full logits, as the releases do.

Obviously correct and slow on purpose; the fast engine is tested against it.
Rewards are read from the model's own output at the reward positions through
the adapter's reward head (``output_columns`` and ``rewards_from_columns``:
the release's softmax over the good/bad columns, or sigmoid of a value), not
from the head rows the fast engine reads, so the two readouts stay independent.
"""

from __future__ import annotations

import torch

from mmprm_infer.engines.base import EncodedQuestion, Engine, check_finite
from mmprm_infer.formats.base import RewardColumns
from mmprm_infer.models.adapters import ModelAdapter


class ReferenceEngine(Engine):
    name = "reference"

    def __init__(self, max_batch_tokens: int | None = None):
        # Accepted so every engine is built the same way; the oracle runs one candidate at a time.
        del max_batch_tokens

    @torch.inference_mode()
    def score(self, adapter: ModelAdapter, columns: RewardColumns, questions: list[EncodedQuestion]):
        head = adapter.reward_head(columns)
        results = []
        for qi, question in enumerate(questions):
            per_candidate = []
            for ci, cand in enumerate(question.candidates):
                ids = torch.tensor(cand.input_ids, dtype=torch.long, device=adapter.device)
                embeds = adapter.merge_image_features(ids, question.image_features)
                positions = adapter.position_ids(cand.input_ids, question.image_features)  # M-RoPE, else None
                logits = (adapter.full_logits(ids, embeds) if positions is None
                          else adapter.full_logits(ids, embeds, positions))
                read = head.output_columns(logits[cand.reward_positions])
                check_finite(read, qi, ci)
                rewards = head.rewards_from_columns(read)
                per_candidate.append(rewards.tolist())
            results.append(per_candidate)
        return results
