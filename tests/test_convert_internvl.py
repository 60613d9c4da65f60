"""`mmprm convert-internvl`: a published InternVLChatModel checkpoint becomes a native one
whose rewards equal the ORIGINAL forward, computed independently from the raw published
tensors (tests/internvl_published.py), fp32 within 1e-5."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from internvl_published import VISUALPRM_SYSTEM, published_logits, source_tokenizer, write_published_internvl
from PIL import Image
from safetensors import safe_open

from mmprm_infer import PRM
from mmprm_infer.cli import main
from mmprm_infer.formats.internvl_base import INTERNVL25_SYSTEM_MESSAGE
from mmprm_infer.models import convert_internvl as conv
from mmprm_infer.vision import image_token_block, load_image

QUESTION = "In the figure, what is the length of side AB?"
STEPS_A = ["Angle C is a right angle.", "By Pythagoras AB = sqrt(3^2 + 4^2) = 5.", "The answer is 5."]
STEPS_B = ["AB is the hypotenuse.", "AB = 3 + 4 = 7. The answer is \\boxed{7}."]


def _image(seed=0, size=(900, 450)):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def _close(got, want):
    assert [len(r) for r in got] == [len(r) for r in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=1e-5, atol=1e-5)


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    src = write_published_internvl(tmp_path_factory.mktemp("pub_internlm2"), "internlm2", seed=1, qk_norm=True)
    dst = tmp_path_factory.mktemp("native_internlm2") / "out"
    report = conv.convert_internvl(src, dst, log=_quiet)
    return src, dst, report


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    src = write_published_internvl(tmp_path_factory.mktemp("pub_qwen2"), "qwen2", seed=2, vision_layers=1,
                                   system_message=VISUALPRM_SYSTEM)
    dst = tmp_path_factory.mktemp("native_qwen2") / "out"
    report = conv.convert_internvl(src, dst, log=_quiet)
    return src, dst, report


def _mm_prm_oracle(src, question, steps_list, image, max_tiles):
    """MM-PRM's batch_prm on the published checkpoint, its forward restated in plain torch."""
    tok = source_tokenizer(src)
    pv = load_image(image, max_tiles=max_tiles)
    ctx, prm_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>"), tok.convert_tokens_to_ids("<prm>")
    cols = tok.convert_tokens_to_ids(["Yes", "No"])
    out = []
    for steps in steps_list:
        prompt = "<image>\n" + f"Question: {question}\nProcess: " + "<prm>".join(steps) + "<prm>"
        query = (f"<|im_start|>system\n{INTERNVL25_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n"
                 f"<|im_start|>assistant\n{prompt}<|im_end|>\n").replace("<image>", image_token_block(pv.shape[0]), 1)
        ids = tok(query).input_ids
        logits = published_logits(src, ids, pv, ctx)
        pos = [i for i, t in enumerate(ids) if t == prm_id]
        out.append(logits[pos][:, cols].softmax(-1)[:, 0].tolist())
    return out


def test_internlm2_conversion_matches_published_forward(internlm2):
    src, dst, report = internlm2
    assert report.lm_kind == "internlm2" and report.format == "mm-prm" and report.shards == 2
    image = _image(3)
    want = _mm_prm_oracle(src, QUESTION, [STEPS_A, STEPS_B], image, max_tiles=2)  # 2 tiles + thumbnail
    assert max(max(r) for r in want) - min(min(r) for r in want) > 0.02
    prm = PRM.from_pretrained(dst, max_tiles=2)
    assert prm.format.name == "mm-prm"
    assert prm.encode(QUESTION, [STEPS_A], image=image).candidates[0].input_ids[0] == prm.tokenizer.bos_token_id
    _close(prm.score(QUESTION, [STEPS_A, STEPS_B], image=image, engine="reference"), want)
    _close(prm.score(QUESTION, [STEPS_A, STEPS_B], image=image), want)


def test_converted_model_loads_every_weight(internlm2, qwen2):
    from transformers import InternVLForConditionalGeneration

    for _, dst, _ in (internlm2, qwen2):
        _, info = InternVLForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_converted_tokenizer_encodes_like_the_source(internlm2, qwen2):
    from transformers import AutoTokenizer

    for src, dst, _ in (internlm2, qwen2):
        want, got = source_tokenizer(src), AutoTokenizer.from_pretrained(dst)
        for probe in conv.TOKENIZER_PROBES:
            assert got(probe).input_ids == want(probe).input_ids, probe
        config = json.loads((dst / "config.json").read_text())
        assert config["image_token_id"] == want.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert AutoTokenizer.from_pretrained(internlm2[1])("x").input_ids[0] == source_tokenizer(internlm2[0]).bos_token_id


def test_qwen2_conversion_visualprm_matches_published_forward(qwen2):
    src, dst, report = qwen2
    assert report.lm_kind == "qwen2" and report.format == "visualprm"
    tok = source_tokenizer(src)
    image = _image(4, size=(300, 200))
    pv = load_image(image, max_tiles=1)
    response = "\n\n".join(STEPS_A)
    # VisualPRM's soft_v2 path, system message = the checkpoint's config.system_message.
    query = f"<|im_start|>system\n{VISUALPRM_SYSTEM}<|im_end|>\n"
    for k, step in enumerate(response.split("\n\n")):
        if k == 0:
            step = f"### Question:\n<image>\n{QUESTION}\n\n### Solution Process:\n{step}"
        query += f"<|im_start|>user\n{step}<|im_end|>\n<|im_start|>assistant\n+<|im_end|>\n"
    query = query.replace("<image>", image_token_block(pv.shape[0]), 1)
    ids = tok(query).input_ids
    logits = published_logits(src, ids, pv, tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    head = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    target = tok("<|im_start|>assistant\n+<|im_end|>\n", add_special_tokens=False).input_ids
    pos = [i + len(head) - 1 for i in range(len(ids)) if ids[i:i + len(target)] == target]
    want = [logits[pos][:, tok.convert_tokens_to_ids(["+", "-"])].softmax(-1)[:, 0].tolist()]

    prm = PRM.from_pretrained(dst, max_tiles=1)
    assert prm.format.name == "visualprm" and prm.format.system_prompt == VISUALPRM_SYSTEM
    _close(prm.score(QUESTION, [response], image=image, engine="reference"), want)
    _close(prm.score(QUESTION, [response], image=image), want)


def test_wqkv_split_follows_internlm2_grouping():
    heads, kv_heads, d, hidden = 8, 2, 3, 5
    groups = heads // kv_heads
    rows = torch.arange(kv_heads * (groups + 2) * d, dtype=torch.float32)
    weight = rows[:, None].repeat(1, hidden)
    q, k, v = conv.split_wqkv(weight, heads, kv_heads, d)
    assert q.shape == (heads * d, hidden) and k.shape == v.shape == (kv_heads * d, hidden)
    for j in range(heads):  # query head j = kv group j // groups, slot j % groups
        start = ((j // groups) * (groups + 2) + j % groups) * d
        assert q[j * d:(j + 1) * d, 0].tolist() == list(range(start, start + d))
    for h in range(kv_heads):
        assert k[h * d:(h + 1) * d, 0].tolist() == list(
            range((h * (groups + 2) + groups) * d, (h * (groups + 2) + groups + 1) * d))
        assert v[h * d:(h + 1) * d, 0].tolist() == list(
            range((h * (groups + 2) + groups + 1) * d, (h * (groups + 2) + groups + 2) * d))
    qb, kb, vb = conv.split_wqkv(rows, heads, kv_heads, d)  # a bias splits the same way
    assert torch.equal(qb, q[:, 0]) and torch.equal(kb, k[:, 0]) and torch.equal(vb, v[:, 0])


def test_weights_are_streamed_shard_by_shard(internlm2, tmp_path, monkeypatch):
    src, _, _ = internlm2
    import safetensors.torch as st

    written, original = [], st.save_file

    def spy(tensors, filename, metadata=None):
        written.append((filename, len(tensors)))
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", spy)
    conv.convert_internvl(src, tmp_path / "out", log=_quiet)
    # One output shard per source shard, written in turn.
    assert [name.rsplit("/", 1)[-1] for name, _ in written] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sum(n for _, n in written) == len(index["weight_map"])


def test_dtype_option_and_cli(internlm2, tmp_path):
    src, _, _ = internlm2
    out = tmp_path / "bf16"
    assert main(["convert-internvl", str(src), str(out), "--dtype", "bfloat16"]) == 0
    with safe_open(str(out / "model-00001-of-00002.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    prm = PRM.from_pretrained(out, dtype="float32", max_tiles=1)
    assert all(0 <= r <= 1 for r in prm.score(QUESTION, [STEPS_A], image=_image(5, (200, 200)))[0])
    with pytest.raises(SystemExit, match="not empty"):
        main(["convert-internvl", str(src), str(out)])


def test_bad_sources_are_explained(internlm2, qwen2, tmp_path):
    src, dst, _ = internlm2
    with pytest.raises(conv.ConversionError, match="not InternVL's published layout"):
        conv.convert_internvl(dst, tmp_path / "again", log=_quiet)  # already native
    with pytest.raises(ValueError, match="convert-internvl"):
        PRM.from_pretrained(src)  # the published layout is not loaded directly
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["architectures"] = ["Phi3ForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(conv.ConversionError, match="Phi3ForCausalLM"):
        conv.convert_internvl(broken, tmp_path / "x", log=_quiet)
    config["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    config["llm_config"]["num_key_value_heads"] = 4  # does not match the stored wqkv
    (broken / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json",
                 "model-00001-of-00002.safetensors"):
        (broken / name).write_bytes((src / name).read_bytes())
    with pytest.raises(conv.ConversionError, match="model-00002-of-00002.safetensors"):
        conv.convert_internvl(broken, tmp_path / "y", log=_quiet)  # a shard is missing
    (broken / "model-00002-of-00002.safetensors").write_bytes((src / "model-00002-of-00002.safetensors").read_bytes())
    with pytest.raises(conv.ConversionError, match=r"wqkv has 128 rows, expected 192 = 4 kv heads"):
        conv.convert_internvl(broken, tmp_path / "z", log=_quiet)


def test_recorded_system_prompt_follows_the_release_code():
    # VisualPRM renders with config.system_message when set, else the internvl2_5 default;
    # MM-PRM's batch_prm always uses the template default (no option needed).
    assert conv._format_options("visualprm", {}, _quiet) == {"system_prompt": INTERNVL25_SYSTEM_MESSAGE}
    assert (conv._format_options("visualprm", {"system_message": ""}, _quiet)
            == {"system_prompt": INTERNVL25_SYSTEM_MESSAGE})
    from mmprm_infer.formats.visualprm import VISUALPRM_SYSTEM_PROMPT

    assert conv._format_options("visualprm", {"system_message": VISUALPRM_SYSTEM_PROMPT}, _quiet) == {}
    assert conv._format_options("mm-prm", {"system_message": "anything"}, _quiet) == {}


# --- hardening: --overwrite never destroys the source; DST changes only when complete ----------------
def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_dst_around_or_inside_src_is_refused_even_with_overwrite(internlm2, tmp_path):
    import shutil

    published, _, _ = internlm2
    parent = tmp_path / "models"
    src = parent / "published"
    shutil.copytree(published, src)
    files = sorted(p.name for p in src.iterdir())
    with pytest.raises(SystemExit, match="DST .*models contains SRC .*published; writing .* would destroy the source"):
        main(["convert-internvl", str(src), str(parent), "--overwrite"])
    with pytest.raises(conv.ConversionError, match="lies inside SRC"):
        conv.convert_internvl(src, src / "native", overwrite=True, log=_quiet)
    with pytest.raises(conv.ConversionError, match="is SRC"):
        conv.convert_internvl(src, parent / "." / "published", overwrite=True, log=_quiet)
    assert sorted(p.name for p in src.iterdir()) == files  # nothing read was deleted, nothing written


def test_overwrite_replaces_dst_only_with_a_complete_conversion(internlm2, tmp_path):
    import shutil

    published, _, _ = internlm2
    dst = tmp_path / "native"
    dst.mkdir()
    (dst / "previous.txt").write_text("the previous conversion")
    broken = tmp_path / "truncated"
    shutil.copytree(published, broken)
    shard = broken / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a download cut short
    with pytest.raises(SystemExit, match="model-00002-of-00002.safetensors cannot be read .*truncated or damaged"):
        main(["convert-internvl", str(broken), str(dst), "--overwrite"])
    assert sorted(p.name for p in dst.iterdir()) == ["previous.txt"] and _siblings(dst) == []
    assert main(["convert-internvl", str(published), str(dst), "--overwrite"]) == 0
    assert not (dst / "previous.txt").exists() and (dst / "model.safetensors.index.json").is_file()
    assert _siblings(dst) == []
    PRM.from_pretrained(dst, dtype="float32", max_tiles=1)
