"""A tiny chat policy that writes step-by-step solutions, for tests, demos and load tests.

``build_tiny_step_policy(path)`` saves a Qwen2 (hidden 128, 4 heads: head
dim 32, the smallest vLLM's CPU attention accepts) trained for a few seconds
on ChatML conversations "What is a + b?" -> 1-3 steps of words, then
"So the answer is \\boxed{a+b}.", each step separated by "\\n\\n", then
``<|im_end|>`` and EOS.  Served by vLLM or transformers it writes several
steps and stops, so step-level search and reranking see real multi-step
samples.  No hub access: the tokenizer and model come from
``mmprm_infer.testing.tiny``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from mmprm_infer.testing.tiny import build_tiny_causal_lm

__all__ = ["build_tiny_step_policy", "STEP_WORDS"]

STEP_WORDS = "we add the numbers then multiply half of the area is so each row sum".split()


def build_tiny_step_policy(path: str | os.PathLike, *, train_steps: int = 150, seed: int = 0,
                           system_prompt: str | None = None) -> Path:
    """Build, train (CPU, seconds) and save the policy; returns ``path``.

    ``system_prompt``: the system turn the training conversations carry
    (None: none), to match how the policy will be prompted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # transformers: heavy, loaded where used

    path = Path(path)
    build_tiny_causal_lm(path, arch="qwen2", extra_tokens=(), hidden=128, heads=4, kv_heads=2, intermediate=256,
                         seed=11)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rng = random.Random(seed)
    torch.manual_seed(seed)

    def example() -> list[int]:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        steps = [" ".join(rng.choice(STEP_WORDS) for _ in range(rng.randint(3, 7))) + "."
                 for _ in range(rng.randint(1, 3))]
        steps.append(f"So the answer is \\boxed{{{a + b}}}.")
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        msgs += [{"role": "user", "content": f"What is {a} + {b}?"},
                 {"role": "assistant", "content": "\n\n".join(steps)}]
        return tok.encode(tok.apply_chat_template(msgs, tokenize=False) + tok.eos_token, add_special_tokens=False)

    data = [example() for _ in range(512)]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(train_steps):
        batch = rng.sample(data, 16)
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, seq in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, :len(seq)] = torch.tensor(seq)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path)
    return path
