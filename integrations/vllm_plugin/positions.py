"""The two rules of the patch as plain functions (no vLLM import): which computed row holds each reward,
and how much of a prompt the prefix cache may supply.

Token-wise pooling reads hidden states at positions of the *prompt*.  With prefix caching a request's
forward pass computes only the prompt's uncached tail, and under chunked prefill that tail arrives in
pieces that the pooler concatenates; either way the rows it holds are the hidden states of the last
``num_rows`` prompt positions.  So:

* a reward at prompt position ``p`` is row ``p - (prompt_len - num_rows)``;
* every reward position must have been computed: the cache hit must stop at or before the first one.
"""

from __future__ import annotations

from collections.abc import Sequence

TOKEN_TASKS = ("token_embed", "token_classify")


class PooledRowsError(RuntimeError):
    """The pooler holds no hidden state for a position it must read: the engine would have mis-indexed."""


def computed_offset(prompt_len: int, num_rows: int) -> int:
    """Prompt position of the first computed row: the rows are the last ``num_rows`` positions."""
    if num_rows > prompt_len:
        raise PooledRowsError(
            f"the pooler holds {num_rows} hidden-state rows for a prompt of {prompt_len} tokens; its rows must "
            "be the prompt's computed tail (a preempted chunked prefill keeps stale chunks?)")
    return prompt_len - num_rows


def reward_rows(step_positions: Sequence[int], prompt_len: int, num_rows: int) -> list[int]:
    """Rows of the computed tail that hold the hidden states at ``step_positions`` (prompt positions)."""
    offset = computed_offset(prompt_len, num_rows)
    if step_positions and step_positions[0] < offset:
        raise PooledRowsError(
            f"a reward is read at prompt position {step_positions[0]}, but only positions {offset}..{prompt_len - 1} "
            "were computed (the rest came from the prefix cache): the cache hit was not capped before the first "
            "reward position")
    return [p - offset for p in step_positions]


def cache_hit_limit(task: str | None, step_tag_id: int | None, prompt_token_ids: Sequence[int] | None,
                    ) -> int | None:
    """How many leading prompt tokens the prefix cache may supply to a pooling request; None: no limit.

    * not token-wise pooling (embed, classify, generation): no limit;
    * STEP pooling with a step tag: the position of the first tag, so that every tag is computed;
      a prompt without a tag pools nothing: no limit;
    * token-wise pooling of every position (ALL, or STEP without a tag): 0, every position is needed;
      likewise a prompt given as embeddings only (no token ids to find the tag in).
    """
    if task not in TOKEN_TASKS:
        return None
    if step_tag_id is None or prompt_token_ids is None:
        return 0
    ids = prompt_token_ids if isinstance(prompt_token_ids, list) else list(prompt_token_ids)
    try:
        return ids.index(step_tag_id)
    except ValueError:
        return None


def block_aligned(limit: int, block_size: int) -> int:
    """The longest block-aligned cache hit that stays within ``limit`` tokens (hits are whole blocks)."""
    return limit - limit % block_size
