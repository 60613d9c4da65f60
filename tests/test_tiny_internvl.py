"""Tiny InternVL checkpoint: reload, tokens, and the shared-vision route.

The fast engine runs the vision tower once and feeds every candidate's text
model ``inputs_embeds`` with the image-context rows replaced by the image
features; here that route is checked against the model's own forward.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmprm_infer.testing.tiny_internvl import INTERNVL25_SYSTEM_MESSAGE, build_tiny_internvl
from mmprm_infer.vision import IMG_CONTEXT_TOKEN, image_token_block, load_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    path = build_tiny_internvl(tmp_path_factory.mktemp("tiny_internvl"), extra_special_tokens=("<prm>",))
    model, info = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return path, model.eval(), AutoTokenizer.from_pretrained(path)


def _prompt_ids(tokenizer, num_tiles, steps):
    chat = [{"role": "user", "content": ""}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|im_start|>user\n", "<|im_start|>user\n" + image_token_block(num_tiles) + "\n")
    text += "Question: What is the area?\nProcess: " + "<prm>".join(steps) + "<prm>"
    return tokenizer(text, return_tensors="pt").input_ids


def test_reloads_natively(tiny):
    path, model, tokenizer = tiny
    from transformers import InternVLForConditionalGeneration

    again = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    cfg = model.config
    assert cfg.image_token_id == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert (cfg.image_seq_length, cfg.downsample_ratio, cfg.vision_feature_layer) == (256, 0.5, -1)
    assert cfg.text_config.model_type == "qwen2"
    # untied head: reward = two rows of a head that is not the embedding
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_tokenizer_tokens_and_template(tiny):
    _, model, tokenizer = tiny
    for token in ("<img>", "</img>", IMG_CONTEXT_TOKEN, "<|im_start|>", "<|im_end|>", "<prm>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    for word in ("Yes", "No", "+", "-"):
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    assert len(tokenizer) <= model.config.text_config.vocab_size
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        f"<|im_start|>system\n{INTERNVL25_SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = _prompt_ids(tokenizer, 2, ["a", "b"])
    assert (ids == model.config.image_token_id).sum() == 2 * 256
    assert (ids == tokenizer.convert_tokens_to_ids("<prm>")).sum() == 2


def test_one_tile_gives_256_tokens(tiny):
    _, model, _ = tiny
    pixel_values = load_image(Image.new("RGB", (448, 448), (0, 128, 255)))
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values).pooler_output
    assert features.shape == (1, 256, model.config.text_config.hidden_size)


def test_shared_vision_route_equals_full_forward(tiny):
    _, model, tokenizer = tiny
    image = Image.effect_mandelbrot((900, 600), (-2, -1, 1, 1), 50).convert("RGB")
    pixel_values = load_image(image)  # 3x2 grid + thumbnail
    assert pixel_values.shape[0] == 7
    candidates = [["x = 3", "area = 9"], ["x = 4", "area = 8"]]  # same length: one batch
    input_ids = torch.cat([_prompt_ids(tokenizer, 7, steps) for steps in candidates])
    assert input_ids.shape[0] == 2

    with torch.no_grad():
        # What MM-PRM's batch_prm does: the image's tiles repeated per row.
        full = model(input_ids=input_ids, pixel_values=torch.cat([pixel_values] * 2)).logits

        # Vision once for all candidates.
        image_out = model.get_image_features(pixel_values=pixel_values)
        features = image_out.pooler_output  # [tiles, 256, hidden]
        embeds = model.get_input_embeddings()(input_ids)
        mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
        per_row = features.reshape(-1, embeds.shape[-1]).repeat(input_ids.shape[0], 1)
        embeds = embeds.masked_scatter(mask, per_row.to(embeds.dtype))
        via_embeds = model(inputs_embeds=embeds).logits
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        via_text_model = model.lm_head(hidden)
        via_cached = torch.cat(
            [model(input_ids=row[None], mm_encoder_outputs={"image": image_out}).logits for row in input_ids]
        )

    for other in (via_embeds, via_text_model, via_cached):
        assert other.shape == full.shape
        assert torch.allclose(other, full, atol=1e-5, rtol=0), (other - full).abs().max()
