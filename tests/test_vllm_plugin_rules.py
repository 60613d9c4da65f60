"""The vLLM plugin's rules and engine="vllm"'s routing, without vLLM (main suite).

The plugin's two rules are plain functions (integrations/vllm_plugin/positions.py): which computed row holds a
reward, and how much of a prompt the prefix cache may supply.  The engine's format routing
(mmprm_infer/engines/vllm_routes.py) decides before vLLM starts.  tests/test_vllm_plugin.py runs both inside vLLM.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mmprm_infer import PRM
from mmprm_infer.engines.vllm_routes import (
    ROUTE_LM_HEAD,
    ROUTE_PRM_HEAD,
    VllmUnsupportedError,
    route_for,
    step_tag_of,
)
from mmprm_infer.formats import RewardColumns
from mmprm_infer.integrations.vllm_plugin.positions import (
    PooledRowsError,
    block_aligned,
    cache_hit_limit,
    computed_offset,
    reward_rows,
)
from mmprm_infer.integrations.vllm_plugin.versions import ALLOW_UNTESTED_ENV, TESTED_VLLM_VERSIONS, version_refusal

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


# --- rows -------------------------------------------------------------------


def test_rows_are_prompt_positions_less_the_cached_length():
    # a 100-token prompt of which the last 36 were computed (64 from the cache): tag 70 is row 6
    assert computed_offset(100, 36) == 64
    assert reward_rows([70, 80, 99], 100, 36) == [6, 16, 35]
    # nothing cached: rows are positions (vLLM's behaviour without a hit)
    assert reward_rows([3, 9], 10, 10) == [3, 9]
    # only the tag itself computed
    assert reward_rows([64], 65, 1) == [0]
    assert reward_rows([], 50, 10) == []


def test_a_position_that_was_not_computed_is_an_error_never_another_row():
    with pytest.raises(PooledRowsError, match="prompt position 60, but only positions 64..99 were computed"):
        reward_rows([60, 70], 100, 36)
    with pytest.raises(PooledRowsError, match="holds 12 hidden-state rows for a prompt of 10"):
        computed_offset(10, 12)


# --- the cache-hit cap --------------------------------------------------------


def test_cache_hit_limit():
    ids = [1, 5, 5, 9, 7, 9, 2]
    assert cache_hit_limit("token_classify", 9, ids) == 3  # the first tag
    assert cache_hit_limit("token_embed", 7, ids) == 4
    assert cache_hit_limit("token_classify", 1, ids) == 0  # a tag at position 0: nothing may come from the cache
    assert cache_hit_limit("token_classify", 42, ids) is None  # no tag: nothing pooled, no limit
    assert cache_hit_limit("token_classify", None, ids) == 0  # every position pooled (ALL, or STEP without a tag)
    assert cache_hit_limit("token_classify", 9, None) == 0  # embeddings only: no ids to find the tag in
    assert cache_hit_limit("token_classify", 9, tuple(ids)) == 3
    for other in ("embed", "classify", None, "plugin"):  # not token-wise pooling (or generation): untouched
        assert cache_hit_limit(other, 9, ids) is None


def test_block_aligned():
    assert block_aligned(75, 32) == 64
    assert block_aligned(64, 32) == 64
    assert block_aligned(63, 32) == 32
    assert block_aligned(31, 32) == 0
    assert block_aligned(1000, 128) == 896


# --- the version guard ----------------------------------------------------------


def test_version_guard():
    assert TESTED_VLLM_VERSIONS == ("0.32.0",)
    assert version_refusal("0.32.0", env={}) is None
    reason = version_refusal("0.33.1", env={})
    assert reason is not None and "0.33.1" in reason and "0.32.0" in reason and ALLOW_UNTESTED_ENV in reason
    assert version_refusal("0.33.1", env={ALLOW_UNTESTED_ENV: "1"}) is None
    assert version_refusal("0.33.1", env={ALLOW_UNTESTED_ENV: "yes"}) is not None


# --- engine="vllm" routing ------------------------------------------------------


class _Tok:
    """convert_ids_to_tokens / convert_tokens_to_ids over a small table."""

    def __init__(self, table):
        self.table = table

    def convert_ids_to_tokens(self, ids):
        return [self.table[i] for i in ids]

    def convert_tokens_to_ids(self, tokens):
        inverse = {v: k for k, v in self.table.items()}
        return [inverse.get(t, 0) for t in tokens]


def test_routes():
    tok = _Tok({11: "+", 13: "Ġ-"})
    route = route_for("math-shepherd", "causal_lm", ["LlamaForCausalLM"], RewardColumns(11, 13), tok)
    assert route.kind == ROUTE_LM_HEAD and route.reward_column == 0
    assert route.llm_kwargs["hf_overrides"] == {"classifier_from_token": ["+", "Ġ-"], "method": "no_post_processing"}
    route = route_for("qwen2.5-math-prm", "qwen2_prm", ["Qwen2ForProcessRewardModel"], RewardColumns(1, 0), tok)
    assert route.kind == ROUTE_PRM_HEAD and route.reward_column == 1
    with pytest.raises(VllmUnsupportedError, match="architecture Qwen2ForProcessRewardModel"):
        route_for("qwen2.5-math-prm", "qwen2_prm", ["Qwen2ForCausalLM"], RewardColumns(1, 0), tok)
    with pytest.raises(VllmUnsupportedError, match="do not round-trip"):
        route_for("custom", "causal_lm", ["Qwen2ForCausalLM"], RewardColumns(11, 12), _Tok({11: "+", 12: "+"}))
    for name, kind in (("rlhflow", "causal_lm"), ("skywork", "value_head"), ("visualprm", "internvl"),
                       ("token-classification", "token_classification"), ("vl-prm", "qwen2_5_vl"),
                       ("mm-prm", "internvl")):
        with pytest.raises(VllmUnsupportedError, match=f"cannot score format '{name}'.*engine='fast'"):
            route_for(name, kind, ["X"], RewardColumns(11, 13), tok)
    with pytest.raises(VllmUnsupportedError, match="'custom' on InternVL: vLLM runs InternVL only with torchvision"):
        route_for("custom", "internvl", ["InternVLForConditionalGeneration"], RewardColumns(11, 13), tok)
    with pytest.raises(VllmUnsupportedError, match="model kind 'value_head'"):
        route_for("my-format", "value_head", ["X"], RewardColumns(11, 13), tok)


def test_step_tag_must_be_exactly_the_reward_positions():
    assert step_tag_of([1, 7, 4, 9, 4, 9], [3, 5], "c0") == 9
    with pytest.raises(VllmUnsupportedError, match=r"token 4 occurs at \[2, 4\]"):
        step_tag_of([1, 7, 4, 9, 4, 9], [4], "c0")  # 4 also occurs at 2
    with pytest.raises(VllmUnsupportedError, match="no reward position"):
        step_tag_of([1, 2], [], "c0")


def test_unsupported_format_is_refused_before_vllm_is_imported(tmp_path):
    from mmprm_infer.testing.tiny import build_tiny_rlhflow_prm

    prm = PRM.from_pretrained(build_tiny_rlhflow_prm(tmp_path / "r"), format="rlhflow", dtype=torch.float32)
    with pytest.raises(VllmUnsupportedError, match="rlhflow"):
        prm.score("What is 1 + 1?", [["add them", "it is 2"]], engine="vllm")


def test_in_memory_model_is_refused_with_the_fix(shepherd_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaForCausalLM.config_class.from_pretrained(shepherd_dir))  # not from a folder
    prm = PRM(model, AutoTokenizer.from_pretrained(shepherd_dir), format="math-shepherd")
    with pytest.raises(VllmUnsupportedError, match="save it with prm.save_pretrained"):
        prm.score("What is 1 + 1?", [["it is 2"]], engine="vllm")


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message where vLLM is not installed")
def test_without_vllm_the_engine_says_how_to_install(shepherd_dir):
    prm = PRM.from_pretrained(shepherd_dir, format="math-shepherd", dtype=torch.float32)
    with pytest.raises(ModuleNotFoundError, match="engine 'vllm' needs vLLM"):
        prm.score("What is 1 + 1?", [["it is 2"]], engine="vllm")


def test_engine_options(monkeypatch):
    from mmprm_infer.engines.vllm_pooling import ARGS_ENV, VllmPoolingEngine

    monkeypatch.setenv(ARGS_ENV, '{"gpu_memory_utilization": 0.3, "enforce_eager": true}')
    engine = VllmPoolingEngine(llm_kwargs={"enforce_eager": False})
    assert engine.llm_kwargs == {"gpu_memory_utilization": 0.3, "enforce_eager": False}  # the caller's win
    monkeypatch.setenv(ARGS_ENV, "[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        VllmPoolingEngine()
    monkeypatch.delenv(ARGS_ENV)
    with pytest.raises(ValueError, match=r"sets \['pooler_config'\] itself"):
        VllmPoolingEngine(llm_kwargs={"pooler_config": None})
