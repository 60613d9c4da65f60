"""Tiny PRM checkpoints built offline, for tests, demos and benchmarks.

No model hub is reachable, so everything a test or demo loads is built here
from real transformers classes with random weights, saved with
``save_pretrained`` and loaded back through the same code a user's real
checkpoint takes.  Tokenizers are byte-level BPE trained on a small built-in
corpus and carry each format's special tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForTokenClassification,
)

from mmprm_infer.models.qwen2_prm import Qwen2ForProcessRewardModel
from mmprm_infer.models.value_head import Qwen2ForPrmModel

# ChatML, as the Qwen2.5 and InternVL2.5 tokenizers format chats.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3.1's chat template as its tokenizer ships it, without the tool-calling branches: BOS, a
# system header with the knowledge-cutoff and date lines, then one header + trimmed content +
# <|eot_id|> per message (meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json).
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>")
# Llama 3's pre-tokenizer split (tokenizer.json), so newlines and digits split as in the real tokenizer.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """
Step 1: The rectangle is 12 cm long and 5 cm wide, so its area is 12 * 5 = 60 square cm.
Step 2: Half of the area is 60 / 2 = 30. The answer is 30.
Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four.
She sells the remainder at the farmers' market daily for $2 per fresh duck egg.
The bar chart shows the values 7, 3, 9 and 4. The sum of the two largest bars is 9 + 7 = 16.
Question: What is the total of the numbers in the grid? Process: Add each row, then add the rows.
Therefore the final answer is \\boxed{16}. We compute x + y = 10 and x - y = 2, so x = 6 and y = 4.
The triangle has angles of 30 degrees and 60 degrees, so the third angle is 180 - 90 = 90 degrees.
Let the number of apples be a. Then 3a + 4 = 19, so 3a = 15 and a = 5.
Please reason step by step, and put your final answer within \\boxed{}.
The image shows a pie chart with four sectors. Read the value of each sector carefully.
Multiply, divide, add and subtract the numbers. Count the cells in each row and column.
""" * 3


def build_tokenizer(
    extra_tokens: Sequence[str] = (),
    special_tokens: Sequence[str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    *,
    bos_token: str | None = None,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|endoftext|>",
    vocab_size: int = 600,
    chat_template: str | None = CHATML_TEMPLATE,
    corpus: Iterable[str] | None = None,
    single_token_words: Sequence[str] = (),
    llama3_split: bool = False,
    **tokenizer_kwargs,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (like Qwen's) carrying the given tokens.

    ``extra_tokens`` become single, non-special tokens (tags such as "ки",
    reward words such as "Yes"); ``bos_token`` makes encode() prepend it, as
    Llama/Mistral tokenizers do; ``single_token_words`` are checked to come
    out of training as one token each; ``tokenizer_kwargs`` go to the
    transformers wrapper (e.g. named image tokens); ``llama3_split`` pre-splits
    text with Llama 3's regex instead of GPT-2's.
    """
    specials = list(dict.fromkeys([*special_tokens, *([bos_token] if bos_token else [])]))
    tok = Tokenizer(models.BPE())
    if llama3_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else _CORPUS.splitlines(), trainer=trainer)
    tok.add_tokens([t for t in extra_tokens if tok.token_to_id(t) is None])
    if bos_token:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
            special_tokens=[(bos_token, tok.token_to_id(bos_token))]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=pad_token,
        bos_token=bos_token,
        additional_special_tokens=[t for t in specials if t not in (eos_token, pad_token, bos_token)],
        **tokenizer_kwargs,
    )
    if chat_template:
        wrapped.chat_template = chat_template
    for word in single_token_words:
        ids = wrapped.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"tiny tokenizer splits {word!r} into {ids}; enlarge the training corpus")
    return wrapped


def build_vl_tokenizer(special_tokens: Sequence[str], *, vocab_size: int, chat_template: str,
                       single_token_words: Sequence[str], **kwargs) -> PreTrainedTokenizerFast:
    """``build_tokenizer`` as the vision-language tiny checkpoints (InternVL, Qwen2.5-VL) set it up:
    ChatML turns, so ``<|im_end|>`` ends a turn and generation, ``<|endoftext|>`` pads, and a
    32768-token context (``model_max_length``); ``kwargs`` go to ``build_tokenizer``."""
    return build_tokenizer(
        special_tokens=special_tokens,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        vocab_size=vocab_size,
        chat_template=chat_template,
        single_token_words=single_token_words,
        model_max_length=32768,
        **kwargs,
    )


def text_config_kwargs(tokenizer, *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                       max_positions: int, vocab_size: int | None = None, tie_word_embeddings: bool = False) -> dict:
    """Qwen2Config/LlamaConfig arguments for a tiny text model over ``tokenizer``."""
    return dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny_causal_lm(
    save_dir: str | os.PathLike,
    *,
    arch: str = "qwen2",
    extra_tokens: Sequence[str] = ("ки", "+", "-"),
    bos_token: str | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 2048,
    vocab_size: int | None = None,
    config_extra: dict | None = None,
    seed: int = 0,
) -> Path:
    """A random-weight Qwen2ForCausalLM or LlamaForCausalLM with its tokenizer, saved to save_dir."""
    tokenizer = build_tokenizer(extra_tokens, bos_token=bos_token)
    kwargs = text_config_kwargs(tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                                intermediate=intermediate, max_positions=max_positions, vocab_size=vocab_size)
    if bos_token:
        kwargs["bos_token_id"] = tokenizer.bos_token_id
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs, **(config_extra or {})))
    return _save(model, tokenizer, save_dir)


def build_tiny_qwen_prm(
    save_dir: str | os.PathLike,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 2048,
    seed: int = 0,
) -> Path:
    """A random-weight Qwen2ForProcessRewardModel laid out as the Qwen2.5-Math-PRM release."""
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"))
    torch.manual_seed(seed)
    config = Qwen2Config(**text_config_kwargs(tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                                              intermediate=intermediate, max_positions=max_positions))
    model = Qwen2ForProcessRewardModel(config)
    return _save(model, tokenizer, save_dir)


# Sizes of every tiny text model unless the caller overrides some (hidden, layers, heads, ...).
TINY_SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=2048)


def _tiny_config(config_cls, tokenizer, sizes: dict, **extra):
    unknown = set(sizes) - set(TINY_SIZES)
    if unknown:
        raise TypeError(f"unknown size argument(s) {sorted(unknown)}; sizes are {sorted(TINY_SIZES)}")
    return config_cls(**text_config_kwargs(tokenizer, **{**TINY_SIZES, **sizes}), **extra)


def build_tiny_token_classification_prm(save_dir: str | os.PathLike, *, step_separator: str | None = None,
                                        seed: int = 0, **sizes) -> Path:
    """A random-weight 2-label Qwen2ForTokenClassification, as TRL's PRMTrainer saves one.

    ``step_separator`` is recorded in config.json when given (the token-classification
    format reads it from there); ``sizes`` override ``TINY_SIZES``."""
    tokenizer = build_tokenizer()
    extra = {"step_separator": step_separator} if step_separator is not None else {}
    torch.manual_seed(seed)
    config = _tiny_config(Qwen2Config, tokenizer, sizes, num_labels=2, **extra)
    return _save(Qwen2ForTokenClassification(config), tokenizer, save_dir)


def build_tiny_skywork_prm(save_dir: str | os.PathLike, *, with_lm_head: bool = True, seed: int = 0,
                           **sizes) -> Path:
    """A random-weight Skywork-o1-Open-PRM layout: Qwen2 body ``model.*``, ``v_head.summary.*``,
    and (as the release's checkpoints hold) the unused ``lm_head.weight``; architecture
    ``Qwen2ForPrmModel``.  The tokenizer has a BOS token it does not prepend itself (Qwen's way)."""

    tokenizer = build_tokenizer()
    tokenizer.bos_token = "<|endoftext|>"
    torch.manual_seed(seed)
    config = _tiny_config(Qwen2Config, tokenizer, sizes)
    path = _save(Qwen2ForPrmModel(config), tokenizer, save_dir)
    if with_lm_head:
        weights = load_file(str(path / "model.safetensors"))
        weights["lm_head.weight"] = torch.randn(config.vocab_size, config.hidden_size) * 0.02
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def build_tiny_rlhflow_prm(save_dir: str | os.PathLike, *, seed: int = 0, **sizes) -> Path:
    """A random-weight LlamaForCausalLM with a Llama-3.1-style tokenizer (special tokens, BOS,
    pre-tokenizer split and chat template), the layout of RLHFlow's Llama3.1-8B PRMs."""
    tokenizer = build_tokenizer(
        special_tokens=LLAMA3_SPECIAL_TOKENS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>", chat_template=LLAMA31_CHAT_TEMPLATE, llama3_split=True,
    )
    torch.manual_seed(seed)
    config = _tiny_config(LlamaConfig, tokenizer, sizes, bos_token_id=tokenizer.bos_token_id)
    return _save(LlamaForCausalLM(config), tokenizer, save_dir)


def _save(model: torch.nn.Module, tokenizer, save_dir: str | os.PathLike) -> Path:
    path = Path(save_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
