"""rlhflow, skywork and token-classification equal their releases' own computation; the
format-vs-checkpoint guard; VisualPRM's inference defaults.

The release side of each exactness test is written here from the release's code (named
above each), with plain transformers classes and the weights read from the checkpoint: the
input is built the release's way and, where the release runs one forward per step, it is
run once per step here too.  Tiny checkpoints have their weights scaled up so the rewards
spread over (0, 1) instead of sitting near 0.5.
"""

from __future__ import annotations

import json

import pytest
import torch
from prm_checks import (
    check_bad_input_errors,
    close,
    no_weights_built,  # noqa: F401 - a fixture
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer, Qwen2ForCausalLM

from mmprm_infer import PRM
from mmprm_infer.formats import FORMATS, FormatError
from mmprm_infer.loading import CheckpointMismatchError
from mmprm_infer.testing.tiny import (
    build_tiny_causal_lm,
    build_tiny_qwen_prm,
    build_tiny_rlhflow_prm,
    build_tiny_skywork_prm,
    build_tiny_token_classification_prm,
)

QUESTION = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. How many are left?"
STEPS_A = ["She uses 3 + 4 = 7 eggs.", "16 - 7 = 9 eggs are left.", "The answer is 9."]
STEPS_B = ["She uses 3 * 4 = 12 eggs.", "16 - 12 = 4. The answer is \\boxed{4}."]
STEPS_C = ["The bar chart shows 7, 3, 9 and 4.", "Half of the area is 60 / 2 = 30.", "So x = 6 and y = 4.",
           "Therefore the final answer is \\boxed{16}."]
CANDIDATES = [STEPS_A, STEPS_B, STEPS_C]


def _spread(path, body: float = 8.0, head: float = 8.0) -> None:
    """Scale a saved checkpoint's 2-D weights in place (embeddings kept): rewards spread over (0, 1)."""
    file = path / "model.safetensors"
    weights = load_file(str(file))
    for name, w in weights.items():
        if w.dim() == 2 and "embed" not in name:
            w.mul_(head if name.split(".")[0] in ("lm_head", "score", "v_head") else body)
    save_file(weights, str(file), metadata={"format": "pt"})


_close = close


def _check_both_engines(prm, want, candidates=CANDIDATES, question=QUESTION):
    spread = [r for rs in want for r in rs]
    assert max(spread) - min(spread) > 0.2, spread  # informative rewards, not a band around 0.5
    _close(prm.score(question, candidates, engine="reference"), want, 1e-5)
    _close(prm.score(question, candidates), want, 1e-4)  # the default (fast) engine


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def token_cls_dir(tmp_path_factory):
    path = build_tiny_token_classification_prm(tmp_path_factory.mktemp("token_cls"), seed=11)
    _spread(path)
    return path


@pytest.fixture(scope="module")
def skywork_dir(tmp_path_factory):
    path = build_tiny_skywork_prm(tmp_path_factory.mktemp("skywork"), seed=12)
    _spread(path, head=4.0)
    return path


@pytest.fixture(scope="module")
def rlhflow_dir(tmp_path_factory):
    path = build_tiny_rlhflow_prm(tmp_path_factory.mktemp("rlhflow"), seed=13)
    _spread(path, head=4.0)
    return path


@pytest.fixture(scope="module")
def qwen_prm_ckpt(tmp_path_factory):
    return build_tiny_qwen_prm(tmp_path_factory.mktemp("qwen_prm_guard"), seed=14)


# ------------------------------------------------------------------ token-classification


def _token_classification_release(path, question, steps_list, sep="\n"):
    """TRL's PRM inference (docs / PRMTrainer model cards): per step k, the text
    sep.join((prompt, *steps[:k])) + sep through AutoModelForTokenClassification,
    LABEL_1's probability at the last token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for steps in steps_list:
        rewards = []
        for k in range(1, len(steps) + 1):
            text = sep.join((question, *steps[:k])) + sep
            inputs = tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits[0, -1]
            rewards.append(logits.softmax(-1)[1].item())
        out.append(rewards)
    return out


def test_token_classification_matches_release(token_cls_dir):
    want = _token_classification_release(token_cls_dir, QUESTION, CANDIDATES)
    prm = PRM.from_pretrained(token_cls_dir)  # detected: a 2-label *ForTokenClassification
    assert prm.format.name == "token-classification" and prm.format.step_separator == "\n"
    _check_both_engines(prm, want)
    _close(prm.score(QUESTION, ["\n\n".join(STEPS_A)]), want[:1], 1e-4)


def test_token_classification_separator_from_config_or_given(tmp_path):
    path = build_tiny_token_classification_prm(tmp_path / "sep", step_separator="\n\n", seed=15)
    _spread(path)
    want = _token_classification_release(path, QUESTION, CANDIDATES, sep="\n\n")
    prm = PRM.from_pretrained(path)
    assert prm.format.step_separator == "\n\n"  # recorded in config.json
    _check_both_engines(prm, want)
    given = PRM.from_pretrained(path, step_separator=" ки ")
    assert given.format.step_separator == " ки "


def test_token_classification_refuses_three_labels(tmp_path):
    path = build_tiny_token_classification_prm(tmp_path / "three", seed=16)
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="2-label token classifier.*3 labels"):
        PRM.from_pretrained(path, format="token-classification")


# ------------------------------------------------------------------ skywork


def _skywork_release(path, problem, responses):
    """skywork-o1-prm-inference: prepare_input(problem, response, tokenizer, step_token="\\n"),
    the body's last hidden state through v_head.summary, sigmoid (return_probs=True), read
    where reward_flags is 1 (derive_step_rewards)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    body = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # model.* + lm_head.*
    head = load_file(str(path / "model.safetensors"))
    w, b = head["v_head.summary.weight"], head["v_head.summary.bias"]
    out = []
    for response in responses:
        input_ids = tokenizer.encode(tokenizer.bos_token + problem + "\n")
        flags = [0] * len(input_ids)
        step_token_id = tokenizer.encode("\n")[-1]
        for step in response.split("\n"):
            step_ids = (tokenizer.encode(step) if step != "" else []) + [step_token_id]
            input_ids += step_ids
            flags += [0] * (len(step_ids) - 1) + [1]
        with torch.no_grad():
            hidden = body(torch.tensor([input_ids]), output_hidden_states=True).hidden_states[-1][0]
        value = torch.sigmoid(hidden @ w.T + b)[:, 0]
        out.append([value[i].item() for i, f in enumerate(flags) if f == 1])
    return out


def test_skywork_matches_release(skywork_dir):
    want = _skywork_release(skywork_dir, QUESTION, ["\n".join(s) for s in CANDIDATES])
    prm = PRM.from_pretrained(skywork_dir)  # detected: Qwen2ForPrmModel
    assert prm.format.name == "skywork"
    _check_both_engines(prm, want)
    _close(prm.score(QUESTION, ["\n".join(STEPS_A)]), want[:1], 1e-4)  # a response string splits on "\n"


def test_skywork_detected_from_value_head_weights(skywork_dir, tmp_path):
    import shutil

    path = tmp_path / "causal_named"
    shutil.copytree(skywork_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]  # a config that names the plain causal LM
    (path / "config.json").write_text(json.dumps(config))
    assert PRM.from_pretrained(path).format.name == "skywork"


def test_skywork_step_with_newline_is_refused(skywork_dir):
    prm = PRM.from_pretrained(skywork_dir)
    with pytest.raises(FormatError, match="step token"):
        prm.score(QUESTION, [["a\nb", "c"]])


# ------------------------------------------------------------------ rlhflow


def _rlhflow_release(path, question, answers):
    """RLHFlow math-rm/prm_evaluate.py (search-and-learn RLHFFlow._score_single): a growing
    conversation per step, tokenizer.apply_chat_template, logits[:, -3] over [+, -]."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    candidate_tokens = [tokenizer.encode("+")[-1], tokenizer.encode("-")[-1]]
    out = []
    for ans in answers:
        conversation, scores = [], []
        ans_list = ans.split("\n\n")
        for k in range(len(ans_list)):
            text = question + " " + ans_list[0] if k == 0 else ans_list[k]
            conversation.append({"content": text, "role": "user"})
            conversation.append({"content": "+", "role": "assistant"})
            input_ids = tokenizer.apply_chat_template(conversation, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(input_ids).logits[:, -3, candidate_tokens]
            scores.append(logits.softmax(dim=-1)[0, 0].item())
        out.append(scores)
    return out


def test_rlhflow_matches_release(rlhflow_dir):
    answers = ["\n\n".join(s) for s in CANDIDATES]
    want = _rlhflow_release(rlhflow_dir, QUESTION, answers)
    prm = PRM.from_pretrained(rlhflow_dir, format="rlhflow")
    _check_both_engines(prm, want)
    _close(prm.score(QUESTION, answers), want, 1e-4)  # answers split on blank lines as the release does
    assert prm.format.default_aggregate == "last"


def test_rlhflow_candidates_share_the_conversation_prefix(rlhflow_dir):
    from mmprm_infer.engines.fast import shared_prefix_length

    prm = PRM.from_pretrained(rlhflow_dir, format="rlhflow")
    encoded = prm.encode(QUESTION, CANDIDATES)
    question_ids = prm.tokenizer.encode(QUESTION, add_special_tokens=False)
    # system header + the user header + the question: all computed once by the fast engine
    assert shared_prefix_length(encoded) >= len(question_ids) + 10


def test_rlhflow_detected_from_its_name(rlhflow_dir, tmp_path):
    import shutil

    path = tmp_path / "named"
    shutil.copytree(rlhflow_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["_name_or_path"] = "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"
    (path / "config.json").write_text(json.dumps(config))
    assert PRM.from_pretrained(path).format.name == "rlhflow"


def test_rlhflow_needs_a_chat_template(shepherd_like):
    with pytest.raises(FormatError, match="chat template"):
        PRM.from_pretrained(shepherd_like, format="rlhflow")


@pytest.fixture(scope="module")
def shepherd_like(tmp_path_factory):
    """A Llama causal LM whose tokenizer has no chat template."""
    path = build_tiny_causal_lm(tmp_path_factory.mktemp("no_template"), arch="llama", bos_token="<s>", seed=17)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not getattr(AutoTokenizer.from_pretrained(path), "chat_template", None)
    return path


# ------------------------------------------------------------------ bad input, same as the other formats


@pytest.fixture(scope="module")
def new_prms(token_cls_dir, skywork_dir, rlhflow_dir):
    return {"token-classification": PRM.from_pretrained(token_cls_dir),
            "skywork": PRM.from_pretrained(skywork_dir),
            "rlhflow": PRM.from_pretrained(rlhflow_dir, format="rlhflow")}


@pytest.mark.parametrize("fmt", ["token-classification", "skywork", "rlhflow"])
@pytest.mark.parametrize("engine", ["reference", None])
def test_bad_input_errors_match_the_other_formats(new_prms, fmt, engine):
    from PIL import Image

    prm = new_prms[fmt]
    check_bad_input_errors(prm, QUESTION, engine)
    with pytest.raises(FormatError, match="text-only"):
        prm.score(QUESTION, [["5"]], image=Image.new("RGB", (32, 32)), engine=engine)


# ------------------------------------------------------------------ the guard


def test_mm_prm_on_a_qwen_math_prm_checkpoint_is_refused_before_loading(qwen_prm_ckpt, no_weights_built):
    with pytest.raises(CheckpointMismatchError) as err:
        PRM.from_pretrained(qwen_prm_ckpt, format="mm-prm")
    msg = str(err.value)
    assert "'mm-prm'" in msg and "InternVLForConditionalGeneration" in msg and "Qwen2ForProcessRewardModel" in msg
    assert "'qwen2.5-math-prm'" in msg  # what the checkpoint is


def test_math_shepherd_on_a_qwen_math_prm_checkpoint_is_refused(qwen_prm_ckpt, no_weights_built):
    with pytest.raises(CheckpointMismatchError,
                       match=r"'math-shepherd' runs on a causal LM.*Qwen2ForProcessRewardModel"):
        PRM.from_pretrained(qwen_prm_ckpt, format="math-shepherd")


@pytest.mark.parametrize("fmt", ["skywork", "token-classification", "qwen2.5-math-prm", "visualprm"])
def test_head_formats_on_a_plain_causal_lm_are_refused(custom_like, fmt, no_weights_built):
    with pytest.raises(FormatError, match=f"'{fmt}'"):
        PRM.from_pretrained(custom_like, format=fmt)


@pytest.fixture(scope="module")
def custom_like(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("plain_lm"), arch="qwen2",
                                extra_tokens=("<step>", "+", "-", "ки"), seed=18)


def test_checkpoint_without_its_lm_head_is_refused(custom_like, tmp_path, no_weights_built):
    import shutil

    path = tmp_path / "headless"
    shutil.copytree(custom_like, path)
    weights = load_file(str(path / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"no weights for lm_head\.weight.*randomly initialised"):
        PRM.from_pretrained(path, format="math-shepherd")


def test_skywork_checkpoint_without_value_head_is_refused(custom_like, no_weights_built):
    # Qwen2ForCausalLM may carry a value head (Skywork's layout); without v_head.* it is refused.
    with pytest.raises(CheckpointMismatchError, match=r"v_head\.summary\.weight"):
        PRM.from_pretrained(custom_like, format="skywork")


def test_cli_refuses_a_mismatched_format_with_one_line(qwen_prm_ckpt, tmp_path, no_weights_built):
    from mmprm_infer.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": "1 + 1?", "candidates": ["2"]}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["score", "--prm", str(qwen_prm_ckpt), "--format", "mm-prm", "-i", str(src), "-o",
              str(tmp_path / "out.jsonl")])
    msg = str(exit_.value.code)
    assert msg.startswith("mmprm score:") and "\n" not in msg
    assert "InternVLForConditionalGeneration" in msg and "Qwen2ForProcessRewardModel" in msg
    assert not (tmp_path / "out.jsonl").exists()


def test_matching_formats_still_load(qwen_prm_ckpt, custom_like):
    assert PRM.from_pretrained(qwen_prm_ckpt).format.name == "qwen2.5-math-prm"
    assert PRM.from_pretrained(custom_like, format="math-shepherd").format.name == "math-shepherd"


def test_every_format_has_a_default_aggregation():
    from mmprm_infer.aggregation import get_aggregation

    for _name, factory in FORMATS.items():
        get_aggregation(factory.default_aggregate)
    assert FORMATS["visualprm"].default_aggregate == "mean"


# ------------------------------------------------------------------ VisualPRM's inference defaults

# InternVL2.5's default system message (template "internvl2_5", OpenGVLab/InternVL
# internvl_chat/internvl/conversation.py), written out here rather than taken from the code under test.
INTERNVL25_DEFAULT_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


@pytest.fixture(scope="module")
def visualprm_dir(tmp_path_factory):
    from mmprm_infer.testing.tiny_internvl import build_tiny_internvl

    path = build_tiny_internvl(tmp_path_factory.mktemp("visualprm_defaults"), seed=19)
    _spread(path, body=8.0, head=2.0)
    return path


def _with_config(src, dst, **entries):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(entries)
    (dst / "config.json").write_text(json.dumps(config, ensure_ascii=False))
    return dst


def _visualprm_release_text(path, system, question, response):
    """InternVLRewardModel.generate_steps_with_soft_score_v2 without an image, with the release's
    inference defaults: response.split('\\n\\n') (no strip, no merge), the model's system message."""
    from transformers import InternVLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    steps = response.split("\n\n")
    query = f"<|im_start|>system\n{system}<|im_end|>\n"
    for k, step in enumerate(steps):
        if k == 0:
            step = f"### Question:\n{question}\n\n### Solution Process:\n{step}"
        query += f"<|im_start|>user\n{step}<|im_end|>\n<|im_start|>assistant\n+<|im_end|>\n"
    ids = tokenizer(query).input_ids
    bos = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    target = tokenizer("<|im_start|>assistant\n+<|im_end|>\n", add_special_tokens=False).input_ids
    positions = [i + len(bos) - 1 for i in range(len(ids)) if ids[i:i + len(target)] == target]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    cols = tokenizer.convert_tokens_to_ids(["+", "-"])
    return logits[positions][:, cols].softmax(-1)[:, 0].tolist()


def test_visualprm_splits_without_merging_or_stripping():
    fmt = FORMATS["visualprm"]()
    pieces = [f"Step {i}." for i in range(1, 15)]
    assert fmt.split_steps("\n\n".join(pieces)) == pieces  # 14 steps: no merge into 12 by default
    assert fmt.split_steps(" First. \n\nSecond.\n") == [" First. ", "Second.\n"]
    assert FORMATS["visualprm"](max_steps=12).split_steps("\n\n".join(pieces)) == [
        "\n\n".join(pieces[i:i + 2]) for i in range(0, 14, 2)]  # merging stays available


def test_visualprm_system_message_from_the_checkpoint_config(visualprm_dir, tmp_path):
    assert PRM.from_pretrained(visualprm_dir, format="visualprm").format.system_prompt == INTERNVL25_DEFAULT_SYSTEM
    converted = _with_config(visualprm_dir, tmp_path / "converted", internvl_system_message="Judge each step.")
    assert PRM.from_pretrained(converted, format="visualprm").format.system_prompt == "Judge each step."
    published = _with_config(visualprm_dir, tmp_path / "published", system_message="Rate the steps.")
    assert PRM.from_pretrained(published, format="visualprm").format.system_prompt == "Rate the steps."
    given = PRM.from_pretrained(converted, format="visualprm", system_prompt="Mine.")
    assert given.format.system_prompt == "Mine."  # the user's option wins


def test_visualprm_defaults_match_release(visualprm_dir, tmp_path):
    path = _with_config(visualprm_dir, tmp_path / "ckpt", internvl_system_message="Judge each step: + or -.")
    pieces = [f"Step {i}: the running total is {3 * i}." for i in range(1, 15)]
    responses = ["\n\n".join(pieces), " " + "\n\n".join(STEPS_A) + "\n"]  # 14 steps; edges kept
    want = [_visualprm_release_text(path, "Judge each step: + or -.", QUESTION, r) for r in responses]
    assert [len(w) for w in want] == [14, 3]
    prm = PRM.from_pretrained(path, format="visualprm")
    _check_both_engines(prm, want, candidates=responses)
    default = _visualprm_release_text(visualprm_dir, INTERNVL25_DEFAULT_SYSTEM, QUESTION, responses[1])
    _close(PRM.from_pretrained(visualprm_dir, format="visualprm").score(QUESTION, responses[1:]), [default], 1e-4)


def test_visualprm_trailing_blank_line_is_an_empty_step(visualprm_dir):
    prm = PRM.from_pretrained(visualprm_dir, format="visualprm")
    with pytest.raises(FormatError, match="candidate 0 has an empty step"):
        prm.score(QUESTION, ["\n\n".join(STEPS_A) + "\n\n"])


def test_each_format_aggregates_as_its_release_by_default(tmp_path):
    """rerank() and `mmprm score` without --aggregate use the format's release default."""
    import json

    from mmprm_infer import PRM, rerank
    from mmprm_infer.cli import main
    from mmprm_infer.rerank import resolve_aggregate
    from mmprm_infer.testing.tiny import build_tiny_qwen_prm

    prm = PRM.from_pretrained(build_tiny_qwen_prm(tmp_path / "q", seed=2))
    assert resolve_aggregate(None, prm) == "min" and resolve_aggregate("mean", prm) == "mean"
    prm.format.default_aggregate = "mean"  # as visualprm's release
    res = rerank("1+1?", ["1+1=2.\n\n\\boxed{2}", "1+1=3.\n\n\\boxed{3}"], prm=prm)
    assert res.aggregate == "mean"
    assert res.scores == [sum(r) / len(r) for r in res.step_rewards]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": "1+1?", "candidates": ["1+1=2.\n\n\\boxed{2}"]}) + "\n")
    assert main(["score", "--prm", str(tmp_path / "q"), "-i", str(src), "-o", str(tmp_path / "o.jsonl"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text())["aggregate"] == "min"
