"""Bad input gets a clear error naming the input and the fix; counts and order always match."""

from __future__ import annotations

import pytest
import torch

from mmprm_infer import PRM, rerank
from mmprm_infer.engines import NonFiniteRewardError
from mmprm_infer.formats import FormatError
from mmprm_infer.testing.tiny import build_tiny_causal_lm

Q = "What is 2 + 3?"


@pytest.fixture(scope="module")
def prm(shepherd_dir):
    return PRM.from_pretrained(shepherd_dir, format="math-shepherd")


@pytest.mark.parametrize("engine", ["reference", None])
def test_empty_candidate_list(prm, engine):
    with pytest.raises(ValueError, match="candidates is empty"):
        prm.score(Q, [], engine=engine)
    with pytest.raises(ValueError, match="empty"):
        rerank(Q, [], prm=prm)


def test_bare_string_instead_of_list(prm):
    with pytest.raises(TypeError, match=r"wrap a single one as \[solution\]"):
        prm.score(Q, "Step 1: 2 + 3 = 5 ки")


@pytest.mark.parametrize("bad", ["", "   \n\n  ", [], ["ok", "  "]])
def test_candidate_without_steps_names_it(prm, bad):
    with pytest.raises(FormatError, match="candidate 1 has"):
        prm.score(Q, ["2 + 3 = 5", bad])


def test_candidate_of_wrong_type(prm):
    with pytest.raises(TypeError, match="candidate 0 is a int"):
        prm.score(Q, [5])


def test_step_containing_the_tag_is_rejected(prm):
    with pytest.raises(FormatError, match="contains 'ки'|expected 2 step marker"):
        prm.score(Q, [["2 + 3 ки = 5", "so 5"]])


def test_input_longer_than_context_names_candidate_and_lengths(tmp_path):
    path = build_tiny_causal_lm(tmp_path / "short", arch="llama", bos_token="<s>", max_positions=64)
    prm = PRM.from_pretrained(path, format="math-shepherd")
    long_steps = ["2 + 3 = 5 and then some more words to make it long"] * 8
    with pytest.raises(ValueError, match=r"candidate 1 is \d+ tokens long .* context of 64 tokens"):
        prm.score(Q, [["5"], long_steps])


def test_tokenizer_missing_format_tokens_is_named(custom_dir):
    with pytest.raises(FormatError, match="'<prm_missing>'"):
        PRM.from_pretrained(custom_dir, format="custom", step_tag="<prm_missing>")
    with pytest.raises(FormatError, match="good token 'Yes_not_there'"):
        PRM.from_pretrained(custom_dir, format="custom", step_tag="<step>", good_token="Yes_not_there")


def test_qwen_format_needs_its_tag(custom_dir):
    with pytest.raises(FormatError, match="<extra_0>"):
        PRM.from_pretrained(custom_dir, format="qwen2.5-math-prm")


@pytest.mark.parametrize("engine", ["reference", None])
def test_non_finite_logits_raise(shepherd_dir, engine):
    prm = PRM.from_pretrained(shepherd_dir, format="math-shepherd")
    with torch.no_grad():
        prm.model.get_output_embeddings().weight.fill_(float("nan"))
    with pytest.raises(NonFiniteRewardError, match="question 0 candidate 0"):
        prm.score(Q, [["2 + 3 = 5"]], engine=engine)


def test_image_in_text_only_format(prm, tmp_path):
    from PIL import Image

    img = Image.new("RGB", (32, 32))
    with pytest.raises(FormatError, match="text-only"):
        prm.score(Q, [["5"]], image=img)


def test_unknown_names_list_the_choices(shepherd_dir, prm):
    with pytest.raises(ValueError, match="choose one of"):
        PRM.from_pretrained(shepherd_dir, format="nope")
    with pytest.raises(ValueError, match="choose one of"):
        rerank(Q, ["a"], prm=prm, aggregate="median")
    with pytest.raises(ValueError, match="engine"):
        prm.score(Q, ["a"], engine="warp")


def test_format_cannot_be_guessed(custom_dir):
    with pytest.raises(ValueError, match="pass format="):
        PRM.from_pretrained(custom_dir)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        PRM.from_pretrained(tmp_path)


def test_output_count_and_order_match_input(prm):
    cands = [["a"], ["b", "c"], ["d", "e", "f"], ["a"]]
    rewards = prm.score(Q, cands)
    assert [len(r) for r in rewards] == [1, 2, 3, 1]
    assert rewards[0] == pytest.approx(rewards[3], abs=1e-6)
    reversed_rewards = prm.score(Q, cands[::-1])
    for a, b in zip(rewards, reversed_rewards[::-1]):
        assert a == pytest.approx(b, abs=1e-5)
    for r in rewards:
        assert all(0.0 <= x <= 1.0 for x in r)


# --- hardening: a checkpoint whose weights are not the model's ---------------------------------
def _copy_checkpoint(src, dst, edit):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_missing_or_unexpected_weight_is_an_error_naming_it(qwen_prm_dir, tmp_path):
    from mmprm_infer.loading import IncompleteCheckpointError

    body = "model.layers.1.mlp.down_proj.weight"
    missing = _copy_checkpoint(qwen_prm_dir, tmp_path / "missing", lambda t: t.pop(body))
    with pytest.raises(IncompleteCheckpointError, match=f"1 weight\\(s\\) the model needs are missing from it: {body}"):
        PRM.from_pretrained(missing)
    extra = _copy_checkpoint(qwen_prm_dir, tmp_path / "extra",
                             lambda t: t.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(IncompleteCheckpointError, match="1 weight\\(s\\) the model does not have: model.extra.weight"):
        PRM.from_pretrained(extra)
    PRM.from_pretrained(qwen_prm_dir)  # the complete checkpoint still loads


def test_the_command_names_the_missing_weight(qwen_prm_dir, tmp_path):
    import json

    from mmprm_infer.cli import main

    broken = _copy_checkpoint(qwen_prm_dir, tmp_path / "p", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": "q", "candidates": ["a"]}) + "\n")
    with pytest.raises(SystemExit, match="cannot load the PRM .*missing from it: model.layers.1.mlp.down_proj.weight"):
        main(["score", "--prm", str(broken), "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--quiet"])
    assert not (tmp_path / "o.jsonl").exists()


def test_a_safetensors_header_claiming_a_terabyte_is_named(qwen_prm_dir, tmp_path):
    import shutil

    from mmprm_infer.loading import CheckpointMismatchError

    broken = tmp_path / "huge"
    shutil.copytree(qwen_prm_dir, broken)
    (broken / "model.safetensors").write_bytes((2 ** 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointMismatchError, match=r"model.safetensors is not a valid safetensors file: its "
                                                      r"header claims 1099511627776 bytes, the file holds 10"):
        PRM.from_pretrained(broken)
