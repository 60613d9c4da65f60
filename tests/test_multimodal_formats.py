"""mm-prm, visualprm and custom-on-InternVL equal their releases' own computation (fp32, 1e-5).

The "official" side of each test is written the way the release's code does
it: the query string built by hand (InternVL's ``internvl2_5`` template as
its MPT ``get_prompt`` renders it), ``<image>`` replaced by ``<img>`` +
``<IMG_CONTEXT>`` x 256 per tile + ``</img>``, ``tokenizer(query)``, the
reward positions found as the release finds them, and the model's OWN
forward with ``pixel_values`` (``model(input_ids=..., pixel_values=...)``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from prm_checks import check_bad_image_files, close, context_limit, load_release_model, noise_image

from mmprm_infer import PRM
from mmprm_infer.cli import main
from mmprm_infer.engines import ENGINES
from mmprm_infer.formats import FormatError
from mmprm_infer.formats.visualprm import VISUALPRM_SYSTEM_PROMPT, split_response
from mmprm_infer.testing.tiny_internvl import build_tiny_internvl
from mmprm_infer.vision import ImageLoadError, image_token_block, load_image

QUESTION = "What is the area of the shaded triangle in the figure?"
STEPS_A = ["The base is 6 and the height is 4.", "Area = 1/2 * 6 * 4 = 12.", "The answer is 12."]
STEPS_B = ["The base is 6.", "Area = 6 * 4 = 24, so the answer is \\boxed{24}."]
ENGINES_UNDER_TEST = ["reference", None]  # None: the default engine

# The releases' system prompts, written out here rather than taken from the code under test.
# InternVL2.5's default (template "internvl2_5", OpenGVLab/InternVL
# internvl_chat/internvl/conversation.py), used by MM-PRM:
INTERNVL25_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
# VisualPRM's PRM_SYSTEM_PROMPT (OpenGVLab/InternVL
# internvl_chat/tools/reasoning_data_pipeline/utils/constants.py; the prompt of its training data,
# carried by VisualPRM-8B's config as system_message):
VISUALPRM_RELEASE_PROMPT = """You are an advanced AI assistant, designed to serve as a process supervision model. \
In this task, I will provide a problem statement followed by the first step of the solution process. For each \
subsequent turn, I will give you a new step in the solution. Your role is to assess whether the solution process \
is correct up to the current step.

- In the **first round**, I will input the problem and the first step of the solution process.
- In **each subsequent round**, I will provide the next step in the solution.

For each step, you should:

- Respond with **"+"** if you believe the solution process is correct up to this step.
- Respond with **"-"** if you detect any issues or errors in the process up to this step.

Please note:
- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or justifications.

Your task is to verify the accuracy and correctness of each step in the given solution process."""


_noise_image = noise_image


@pytest.fixture(scope="module")
def ivl_dir(tmp_path_factory):
    """A tiny InternVL (Qwen2 text model) whose rewards spread away from 0.5 and depend on the image."""
    from transformers import InternVLForConditionalGeneration

    path = build_tiny_internvl(tmp_path_factory.mktemp("mm_ivl"), extra_special_tokens=("<prm>",), seed=5)
    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # stronger layers than the 0.02 init, so context and image move the rewards
        for name, param in model.model.language_model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(12.0)
        model.lm_head.weight.mul_(2.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(20.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ivl(ivl_dir):
    from transformers import InternVLForConditionalGeneration

    return load_release_model(InternVLForConditionalGeneration, ivl_dir)


@pytest.fixture(scope="module")
def wide_image():
    return _noise_image(900, 450, seed=1)  # 2x1 grid with max_tiles=2: 2 tiles + thumbnail


def _close(got, want):
    close(got, want, 1e-5, rtol=1e-5)


def _forward_rewards(model, tokenizer, query, positions_fn, pixel_values, good, bad):
    ids = tokenizer(query, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values).logits[0]
    pos = positions_fn(ids[0].tolist())
    cols = tokenizer.convert_tokens_to_ids([good, bad])
    return logits[pos][:, cols].softmax(-1)[:, 0].tolist()


# ------------------------------------------------------------------ mm-prm


def _mm_prm_release(model, tokenizer, question, steps_list, pixel_values, num_patches_list, close_user=False):
    """MM-PRM's batch_prm, one prompt at a time (what evaluate_*_prm.py feeds it)."""
    prm_id = tokenizer.convert_tokens_to_ids("<prm>")
    out = []
    for steps in steps_list:
        solution = "<prm>".join(steps) + "<prm>"
        prompt = f"Question: {question}\nProcess: {solution}"
        if pixel_values is not None and "<image>" not in prompt:
            # The release's single-image rule; several images take InternVL's multi-image prefix.
            prompt = ("<image>\n" if len(num_patches_list) == 1 else
                      "".join(f"Image-{i}: <image>\n" for i in range(1, len(num_patches_list) + 1))) + prompt
        user = "<|im_start|>user\n<|im_end|>\n" if close_user else "<|im_start|>user\n"  # '' is falsy in get_prompt
        query = (f"<|im_start|>system\n{INTERNVL25_SYSTEM_MESSAGE}<|im_end|>\n"
                 f"{user}<|im_start|>assistant\n{prompt}<|im_end|>\n")
        for n in num_patches_list:
            query = query.replace("<image>", image_token_block(n), 1)
        out.append(_forward_rewards(model, tokenizer, query, lambda ids: [i for i, t in enumerate(ids) if t == prm_id],
                                    pixel_values, "Yes", "No"))
    return out


@pytest.mark.parametrize("engine", ENGINES_UNDER_TEST)
def test_mm_prm_matches_release(ivl_dir, ivl, wide_image, engine):
    model, tokenizer = ivl
    pv = load_image(wide_image, max_tiles=2)
    assert pv.shape[0] == 3
    want = _mm_prm_release(model, tokenizer, QUESTION, [STEPS_A, STEPS_B], pv, [3])
    assert max(max(r) for r in want) - min(min(r) for r in want) > 0.05  # rewards are informative

    prm = PRM.from_pretrained(ivl_dir, max_tiles=2)  # mm-prm detected from <prm> in the tokenizer
    assert prm.format.name == "mm-prm"
    _close(prm.score(QUESTION, [STEPS_A, STEPS_B], image=wide_image, engine=engine), want)
    # MM-PRM's policy output (<step>/<answer> tags) splits into the same steps.
    tagged = "".join(f"<step>{s}</step>" for s in STEPS_A[:-1]) + f"<answer>{STEPS_A[-1]}</answer>"
    _close(prm.score(QUESTION, [tagged], image=wide_image, engine=engine), want[:1])


def test_mm_prm_image_changes_rewards(ivl_dir, wide_image):
    prm = PRM.from_pretrained(ivl_dir, format="mm-prm", max_tiles=2)
    a = prm.score(QUESTION, [STEPS_A], image=wide_image)[0]
    b = prm.score(QUESTION, [STEPS_A], image=_noise_image(900, 450, seed=7))[0]
    c = prm.score(QUESTION, [STEPS_A])[0]
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-3 and max(abs(x - y) for x, y in zip(a, c)) > 1e-3


def test_mm_prm_text_only_and_training_layout(ivl_dir, ivl):
    model, tokenizer = ivl
    prm = PRM.from_pretrained(ivl_dir, format="mm-prm")
    _close(prm.score(QUESTION, [STEPS_A], engine="reference"),
           _mm_prm_release(model, tokenizer, QUESTION, [STEPS_A], None, []))
    trained = PRM.from_pretrained(ivl_dir, format="mm-prm", close_user_turn=True, max_tiles=1)
    image = _noise_image(200, 160, seed=3)
    _close(trained.score(QUESTION, [STEPS_B], image=image),
           _mm_prm_release(model, tokenizer, QUESTION, [STEPS_B], load_image(image, max_tiles=1), [1], close_user=True))


def test_mm_prm_several_images(ivl_dir, ivl, tmp_path):
    model, tokenizer = ivl
    first, second = _noise_image(200, 160, seed=4), _noise_image(160, 240, seed=5)
    second.save(tmp_path / "second.png")
    pv = [load_image(first, max_tiles=1), load_image(tmp_path / "second.png", max_tiles=1)]
    prm = PRM.from_pretrained(ivl_dir, format="mm-prm", max_tiles=1)
    # No placeholder in the question: InternVL's multi-image prefix "Image-k: <image>\n".
    want = _mm_prm_release(model, tokenizer, QUESTION, [STEPS_A], torch.cat(pv), [1, 1])
    _close(prm.score(QUESTION, [STEPS_A], image=[first, tmp_path / "second.png"]), want)
    # Placeholders the user wrote are used where they stand.
    question = f"Compare <image> with <image>. {QUESTION}"
    want = _mm_prm_release(model, tokenizer, question, [STEPS_A], torch.cat(pv), [1, 1])
    _close(prm.score(question, [STEPS_A], image=[first, str(tmp_path / "second.png")], engine="reference"), want)


# ------------------------------------------------------------------ visualprm


def _visualprm_release(model, tokenizer, question, response, pixel_values, num_patches_list, max_steps=None,
                       system_message=INTERNVL25_SYSTEM_MESSAGE):
    """InternVLRewardModel.generate_steps_with_soft_score_v2 (str2score {'+': 1, '-': 0}) as
    select_best_response calls it: split on "\\n\\n" without strip, merged only when max_steps is given;
    the system message from the checkpoint's config, else the internvl2_5 template's default."""
    steps = response.split("\n\n")
    if max_steps is not None:
        run = math.ceil(len(steps) / max_steps)
        steps = ["\n\n".join(steps[i:i + run]) for i in range(0, len(steps), run)]
    if pixel_values is not None and "<image>" not in question:
        question = "<image>\n" + question
    query = f"<|im_start|>system\n{system_message}<|im_end|>\n"
    for k, step in enumerate(steps):
        if k == 0:
            step = f"### Question:\n{question}\n\n### Solution Process:\n{step}"
        query += f"<|im_start|>user\n{step}<|im_end|>\n<|im_start|>assistant\n+<|im_end|>\n"
    for n in num_patches_list:
        query = query.replace("<image>", image_token_block(n), 1)

    def find_placeholder_idx(ids):
        bos = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        target = tokenizer("<|im_start|>assistant\n+<|im_end|>\n", add_special_tokens=False).input_ids
        return [i + len(bos) - 1 for i in range(len(ids)) if ids[i:i + len(target)] == target]

    return _forward_rewards(model, tokenizer, query, find_placeholder_idx, pixel_values, "+", "-"), steps


@pytest.mark.parametrize("engine", ENGINES_UNDER_TEST)
def test_visualprm_matches_release(ivl_dir, ivl, wide_image, engine):
    model, tokenizer = ivl
    pieces = [f"Step {i}: the running total is {3 * i}." for i in range(1, 15)]
    responses = ["\n\n".join(pieces), "\n\n".join(STEPS_A)]
    pv = load_image(wide_image, max_tiles=2)
    want, steps = zip(*[_visualprm_release(model, tokenizer, QUESTION, r, pv, [3]) for r in responses])
    assert [len(s) for s in steps] == [14, 3]  # no merging by default
    prm = PRM.from_pretrained(ivl_dir, format="visualprm", max_tiles=2)
    _close(prm.score(QUESTION, responses, image=wide_image, engine=engine), list(want))
    # Steps given as a list are scored as given.
    _close(prm.score(QUESTION, [list(steps[0])], image=wide_image, engine=engine), [want[0]])
    # max_steps=12, as InternVL's data pipeline passes it: 14 pieces -> 7 merged steps
    merged, merged_steps = _visualprm_release(model, tokenizer, QUESTION, responses[0], pv, [3], max_steps=12)
    assert len(merged_steps) == 7
    prm12 = PRM.from_pretrained(ivl_dir, format="visualprm", max_tiles=2, max_steps=12)
    _close(prm12.score(QUESTION, responses[:1], image=wide_image, engine=engine), [merged])


def test_visualprm_text_only_and_custom_system_prompt(ivl_dir, ivl):
    model, tokenizer = ivl
    want, _ = _visualprm_release(model, tokenizer, QUESTION, "\n\n".join(STEPS_B), None, [])
    prm = PRM.from_pretrained(ivl_dir, format="visualprm")
    _close(prm.score(QUESTION, ["\n\n".join(STEPS_B)], engine="reference"), [want])
    with pytest.raises(FormatError, match="empty step"):  # no strip: a trailing blank line is an empty step
        prm.score(QUESTION, ["\n\n".join(STEPS_B) + "\n\n"])
    other = PRM.from_pretrained(ivl_dir, format="visualprm", system_prompt="Judge each step.")
    assert other.score(QUESTION, [STEPS_B])[0] != pytest.approx(want, abs=1e-6)


def test_visualprm_system_message_from_the_checkpoint_config(ivl_dir, ivl, tmp_path):
    """A checkpoint whose config carries VisualPRM's prompt (as VisualPRM-8B's does) is scored with it."""
    import shutil

    model, tokenizer = ivl
    path = tmp_path / "visualprm"
    shutil.copytree(ivl_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["system_message"] = VISUALPRM_RELEASE_PROMPT
    (path / "config.json").write_text(json.dumps(config))
    want, _ = _visualprm_release(model, tokenizer, QUESTION, "\n\n".join(STEPS_A), None, [],
                                 system_message=VISUALPRM_RELEASE_PROMPT)
    prm = PRM.from_pretrained(path, format="visualprm")
    _close(prm.score(QUESTION, ["\n\n".join(STEPS_A)], engine="reference"), [want])


def test_visualprm_release_prompt_constant():
    """The library's copy of VisualPRM's prompt (convert_internvl compares checkpoints' messages with it) is the \
release's."""
    assert VISUALPRM_SYSTEM_PROMPT == VISUALPRM_RELEASE_PROMPT


def test_visualprm_split_rule():
    pieces = [str(i) for i in range(25)]
    assert split_response("\n\n".join(pieces[:12]), max_steps=12) == pieces[:12]
    merged = split_response("\n\n".join(pieces[:13]), max_steps=12)  # ceil(13/12) = 2 per step
    assert merged == ["0\n\n1", "2\n\n3", "4\n\n5", "6\n\n7", "8\n\n9", "10\n\n11", "12"]
    assert len(split_response("\n\n".join(pieces), max_steps=12)) == 9  # runs of 3
    assert split_response("a\n\nb", max_steps=None) == ["a", "b"]


def test_visualprm_placeholder_count_must_match(ivl_dir):
    prm = PRM.from_pretrained(ivl_dir, format="visualprm", max_tiles=1)
    with pytest.raises(FormatError, match=r"got 1 image\(s\) but the question holds 2"):
        prm.score("Compare <image> and <image>.", [STEPS_A], image=_noise_image(100, 100))


# ------------------------------------------------------------------ custom on InternVL


@pytest.mark.parametrize("engine", ENGINES_UNDER_TEST)
def test_custom_format_on_internvl_with_image(ivl_dir, ivl, engine):
    model, tokenizer = ivl
    image = _noise_image(300, 200, seed=9)
    pv = load_image(image, max_tiles=1)
    prm_id = tokenizer.convert_tokens_to_ids("<prm>")
    want = []
    for steps in (STEPS_A, STEPS_B):
        text = f"{image_token_block(pv.shape[0])}\nQ: {QUESTION}\n" + "\n".join(s + "<prm>" for s in steps)
        want.append(_forward_rewards(model, tokenizer, text, lambda ids: [i for i, t in enumerate(ids) if t == prm_id],
                                     pv, "Yes", "No"))
    prm = PRM.from_pretrained(ivl_dir, format="custom", model_kind="internvl", step_tag="<prm>", good_token="Yes",
                              bad_token="No", prompt_template="{images}\nQ: {question}\n", max_tiles=1)
    _close(prm.score(QUESTION, [STEPS_A, STEPS_B], image=image, engine=engine), want)


def test_custom_internvl_options_survive_save(ivl_dir, tmp_path):
    prm = PRM.from_pretrained(ivl_dir, format="custom", model_kind="internvl", step_tag="<prm>", good_token="Yes",
                              bad_token="No", prompt_template="{images}{question}\n", max_tiles=1)
    prm.save_pretrained(tmp_path / "saved")
    again = PRM.from_pretrained(tmp_path / "saved")
    assert again.format == prm.format and again.adapter.kind == "internvl"
    image = _noise_image(120, 90)
    _close(again.score(QUESTION, [STEPS_A], image=image), prm.score(QUESTION, [STEPS_A], image=image))


# ------------------------------------------------------------------ vision runs once


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_vision_tower_runs_once_per_question(ivl_dir, engine):
    if engine not in ENGINES:
        pytest.skip(f"engine {engine!r} is not registered")
    prm = PRM.from_pretrained(ivl_dir, format="mm-prm", max_tiles=1)
    calls = []
    handle = prm.model.model.vision_tower.register_forward_hook(
        lambda m, i, o: calls.append(o.last_hidden_state.shape[0]))
    try:
        image = _noise_image(200, 150)
        rewards = prm.score(QUESTION, [STEPS_A, STEPS_B, STEPS_A[:2], STEPS_B[:1]], image=image, engine=engine)
        assert len(rewards) == 4 and calls == [1]
        prm.score_batch([(QUESTION, [STEPS_A, STEPS_B], image), (QUESTION, [STEPS_B] * 3, [image, image])],
                        engine=engine)
        assert calls == [1, 1, 2]  # once per question, all tiles of all its images in one call
    finally:
        handle.remove()


def test_training_mode_features_train_the_projector_only(ivl_dir):
    prm = PRM.from_pretrained(ivl_dir, format="mm-prm", max_tiles=1)
    image = _noise_image(200, 150)
    frozen = prm.encode(QUESTION, [STEPS_A], image=image).image_features
    assert frozen.is_inference()
    prm.model.train()
    try:
        live = prm.encode(QUESTION, [STEPS_A], image=image).image_features
    finally:
        prm.model.eval()
    torch.testing.assert_close(live.detach(), frozen.clone(), rtol=1e-6, atol=1e-6)
    live.square().sum().backward()
    assert all(p.grad is not None for p in prm.model.model.multi_modal_projector.parameters())
    assert all(p.grad is None for p in prm.model.model.vision_tower.parameters())


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def mm(ivl_dir):
    return PRM.from_pretrained(ivl_dir, format="mm-prm", max_tiles=2)


def test_missing_and_unreadable_image_files_are_named(mm, tmp_path):
    check_bad_image_files(mm, QUESTION, STEPS_A, tmp_path)


def test_zero_size_image(mm):
    with pytest.raises(ImageLoadError, match="zero size"):
        mm.score(QUESTION, [STEPS_A], image=Image.new("RGB", (0, 10)))


def test_image_for_text_only_format(custom_dir, ivl_dir):
    text_prm = PRM.from_pretrained(custom_dir, format="custom", step_tag="<step>")
    with pytest.raises(FormatError, match="text-only"):
        text_prm.score(QUESTION, [STEPS_A], image=_noise_image(50, 50))
    with pytest.raises(ValueError, match="model_kind"):
        PRM.from_pretrained(ivl_dir, format="custom", model_kind="qwen2-vl")


def test_huge_image_is_tiled_within_the_cap(mm, image_work):
    huge = Image.new("RGB", (6000, 4000), (90, 120, 200))
    encoded = mm.encode(QUESTION, [STEPS_A], image=huge)
    assert encoded.image_features.shape[0] == 3 * 256  # 2x1 grid (cap 2) + thumbnail
    # resized as uint8 to the capped grid first; only tiles become arrays (no clock needed to see it)
    assert image_work.resized == [(2 * 448, 448), (448, 448)]
    assert set(image_work.arrays) == {(448, 448)}
    rewards = mm.score(QUESTION, [STEPS_A], image=huge)
    assert all(0.0 <= r <= 1.0 for r in rewards[0])


def test_more_images_than_context(mm):
    with context_limit(mm, 1024):
        with pytest.raises(FormatError, match=r"5 image\(s\) take 1290 tokens .* context of 1024 tokens"):
            mm.score(QUESTION, [STEPS_A], image=[_noise_image(64, 64, seed=s) for s in range(5)])
        # Images that fit, but not with the text: the candidate length check names the sizes.
        with pytest.raises(ValueError, match="more than the model's context of 1024"):
            mm.score(QUESTION, [STEPS_A * 30], image=[_noise_image(64, 64, seed=s) for s in range(3)])


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK"])
def test_non_rgb_images_are_converted(mm, mode):
    image = _noise_image(160, 120, seed=11, mode=mode)
    got = mm.score(QUESTION, [STEPS_B], image=image)
    want = mm.score(QUESTION, [STEPS_B], image=image.convert("RGB"))  # what InternVL's load_image does
    _close(got, want)


def test_step_containing_the_tag_is_rejected(mm):
    with pytest.raises(FormatError, match="<prm>"):
        mm.score(QUESTION, [["first <prm> step", "second"]])


# ------------------------------------------------------------------ CLI


def test_cli_scores_images_relative_to_the_jsonl(ivl_dir, tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    _noise_image(300, 200, seed=21).save(data / "img" / "a.png")
    _noise_image(200, 300, seed=22).save(data / "img" / "b.jpg")
    (data / "img" / "bad.png").write_bytes(b"not an image")
    records = [
        {"id": "one", "question": QUESTION, "image": "img/a.png", "candidates": ["\n\n".join(STEPS_A), STEPS_B]},
        {"id": "two", "question": QUESTION, "images": ["img/a.png", "img/b.jpg"], "candidates": [STEPS_B]},
        {"id": "missing", "question": QUESTION, "image": "img/none.png", "candidates": [STEPS_B]},
        {"id": "broken", "question": QUESTION, "image": "img/bad.png", "candidates": [STEPS_B]},
    ]
    src, dst = data / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert main(["score", "--prm", str(ivl_dir), "-i", str(src), "-o", str(dst), "--quiet", "--max-tiles", "1",
                 "--on-error", "skip"]) == 3  # finished, with error records (README: exit status)
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4]
    prm = PRM.from_pretrained(ivl_dir, max_tiles=1)
    _close(out[0]["step_rewards"], prm.score(QUESTION, records[0]["candidates"], image=data / "img" / "a.png"))
    _close(out[1]["step_rewards"],
           prm.score(QUESTION, records[1]["candidates"], image=[data / "img" / "a.png", data / "img" / "b.jpg"]))
    assert "line 3" in out[2]["error"] and "none.png" in out[2]["error"]
    assert "line 4" in out[3]["error"] and "bad.png" in out[3]["error"]
    with pytest.raises(SystemExit, match=r"line 4: .*bad\.png"):
        main(["score", "--prm", str(ivl_dir), "-i", str(_only(src, 3)), "-o", str(dst), "--quiet"])


def _only(src, index):
    """A copy of the JSONL with its first `index` lines blanked, keeping line numbers."""
    lines = src.read_text().splitlines()
    out = src.with_name("only.jsonl")
    out.write_text("\n".join("" if i < index else line for i, line in enumerate(lines)) + "\n")
    return out
