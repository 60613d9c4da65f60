"""Each text format's rewards equal its release's own computation (fp32, 1e-5).

The "official" side of every test is written the way the release's snippet
does it: build the input string by hand, run the model's forward, read the
softmax over the two reward columns at the marker positions.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmprm_infer import PRM
from mmprm_infer.models.qwen2_prm import Qwen2ForProcessRewardModel

QUESTION = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. How many are left?"
STEPS_A = ["She uses 3 + 4 = 7 eggs.", "16 - 7 = 9 eggs are left.", "The answer is 9."]
STEPS_B = ["She uses 3 * 4 = 12 eggs.", "16 - 12 = 4. The answer is \\boxed{4}."]


def _assert_close(got: list[list[float]], want: list[list[float]]) -> None:
    assert [len(r) for r in got] == [len(r) for r in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=1e-5, atol=1e-5)


def test_math_shepherd_matches_release(shepherd_dir):
    tokenizer = AutoTokenizer.from_pretrained(shepherd_dir)
    model = AutoModelForCausalLM.from_pretrained(shepherd_dir, dtype=torch.float32).eval()
    # The release's snippet, with BOS dropped from the "+ -" encoding.
    candidate_tokens = tokenizer.encode("+ -")[1:]
    step_tag_id = tokenizer.encode("ки")[-1]
    want = []
    for steps in (STEPS_A, STEPS_B):
        output = "\n".join(f"Step {i}: {s} ки" for i, s in enumerate(steps, 1))
        input_id = torch.tensor([tokenizer.encode(f"{QUESTION} {output}")])
        assert input_id[0, 0].item() == tokenizer.bos_token_id
        with torch.no_grad():
            logits = model(input_id).logits[:, :, candidate_tokens]
        scores = logits.softmax(dim=-1)[:, :, 0]
        want.append(scores[input_id == step_tag_id].tolist())

    prm = PRM.from_pretrained(shepherd_dir, format="math-shepherd")
    _assert_close(prm.score(QUESTION, [STEPS_A, STEPS_B], engine="reference"), want)
    _assert_close(prm.score(QUESTION, [STEPS_A, STEPS_B]), want)
    # A solution string in the release's own layout splits into the same steps.
    text = "\n".join(f"Step {i}: {s} ки" for i, s in enumerate(STEPS_A, 1))
    _assert_close(prm.score(QUESTION, [text]), want[:1])


def test_qwen_math_prm_matches_release(qwen_prm_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_prm_dir)
    model = Qwen2ForProcessRewardModel.from_pretrained(qwen_prm_dir, dtype=torch.float32).eval()
    want = []
    for steps in (STEPS_A, STEPS_B):
        messages = [
            {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
        ]
        conversation = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        input_ids = tokenizer.encode(conversation, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        step_sep_id = tokenizer.encode("<extra_0>")[0]
        probs = logits.softmax(dim=-1)[input_ids == step_sep_id]
        want.append(probs[:, 1].tolist())

    prm = PRM.from_pretrained(qwen_prm_dir)  # format auto-detected from the architecture
    assert prm.format.name == "qwen2.5-math-prm"
    _assert_close(prm.score(QUESTION, [STEPS_A, STEPS_B], engine="reference"), want)
    _assert_close(prm.score(QUESTION, [STEPS_A, STEPS_B]), want)
    _assert_close(prm.score(QUESTION, ["\n\n".join(STEPS_A)]), want[:1])


def test_qwen_prm_checkpoint_keys_match_release_layout(qwen_prm_dir):
    from safetensors import safe_open

    with safe_open(str(qwen_prm_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= keys
    assert "model.embed_tokens.weight" in keys and not any(k.startswith("lm_head") for k in keys)


def test_custom_format_matches_direct_computation(custom_dir):
    tokenizer = AutoTokenizer.from_pretrained(custom_dir)
    model = AutoModelForCausalLM.from_pretrained(custom_dir, dtype=torch.float32).eval()
    good, bad, tag = (tokenizer.convert_tokens_to_ids(t) for t in ("+", "-", "<step>"))
    want = []
    for steps in (STEPS_A, STEPS_B):
        text = f"{QUESTION}\n" + "\n".join(s + "<step>" for s in steps)
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            logits = model(ids).logits[0]
        pos = (ids[0] == tag).nonzero().flatten()
        want.append(logits[pos][:, [good, bad]].softmax(-1)[:, 0].tolist())

    prm = PRM(model, tokenizer, format="custom", step_tag="<step>", good_token="+", bad_token="-")
    _assert_close(prm.score(QUESTION, [STEPS_A, STEPS_B], engine="reference"), want)
    _assert_close(prm.score(QUESTION, [STEPS_A, STEPS_B]), want)


def test_save_pretrained_remembers_format_and_options(custom_dir, tmp_path):
    prm = PRM.from_pretrained(custom_dir, format="custom", step_tag="<step>", prompt_template="Q: {images}{question}\n")
    prm.save_pretrained(tmp_path / "saved")
    again = PRM.from_pretrained(tmp_path / "saved")
    assert again.format == prm.format
    _assert_close(again.score(QUESTION, [STEPS_A]), prm.score(QUESTION, [STEPS_A]))
