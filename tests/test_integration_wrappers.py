"""VLLMPolicy and RerankingLLM logic against a stand-in ``vllm`` (no vLLM needed; the real one is in
test_integration_vllm.py): prompt routing, seeds, images to the PRM, unscorable samples."""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import spread_models as S
import torch
from PIL import Image

from mmprm_infer import PRM
from mmprm_infer.policy import Policy, PolicyPrompt


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: list | None = None

    def clone(self):
        return copy.deepcopy(self)


@dataclass
class FakeCompletion:
    index: int
    text: str
    finish_reason: str = "stop"
    stop_reason: object = None


class FakeRequestOutput:
    def __init__(self, prompt, outputs):
        self.prompt = prompt
        self.outputs = outputs


class FakeTokenizer:
    chat_template = "chatml"

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=False, continue_final_message=False):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in msgs)
        if continue_final_message:
            text = text[: -len(f"</{msgs[-1]['role']}>")]
        return text + ("<assistant>" if add_generation_prompt else "")

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class FakeLLM:
    """Answers sample j of a prompt with `texts(prompt, j)`; records every call."""

    def __init__(self, texts):
        self.texts = texts
        self.calls = []

    def get_tokenizer(self):
        return FakeTokenizer()

    def _outputs(self, prompts, params):
        params = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for p, sp in zip(prompts, params):
            comps = []
            for j in range(sp.n):
                text, finish, stop = self.texts(p, j, sp)
                comps.append(FakeCompletion(j, text, finish, stop))
            outs.append(FakeRequestOutput(p, comps[::-1]))  # unordered on purpose
        return outs

    def generate(self, prompts, params, use_tqdm=False, **kwargs):
        self.calls.append(("generate", prompts, params, kwargs))
        return self._outputs(prompts, params)

    def chat(self, messages, params, use_tqdm=False, add_generation_prompt=True, continue_final_message=False):
        self.calls.append(("chat", messages, params, {"add_generation_prompt": add_generation_prompt,
                                                       "continue_final_message": continue_final_message}))
        return self._outputs(messages, params)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def _steps_text(prompt, j, sp):
    if sp.stop:  # one step per sample: finished when the sample wrote the answer
        if j % 2:
            return f"so \\boxed{{{j}}}", "stop", None
        return f"step {j} of {sp.seed}", "stop", "\n\n"
    return f"first {j}\n\nsecond {j}\n\nso \\boxed{{{j}}}", "stop", None


def test_vllm_policy_with_a_stand_in(fake_vllm):
    from mmprm_infer.integrations.vllm_policy import VLLMPolicy

    llm = FakeLLM(_steps_text)
    policy = VLLMPolicy(llm, system_prompt="sys", seed=10, max_new_tokens=32, top_k=0)
    assert isinstance(policy, Policy)
    prompts = [PolicyPrompt("q1"), PolicyPrompt("q1"), PolicyPrompt("q2", partial_steps=["a", "b"])]
    texts = policy.generate(prompts, n=3)
    assert texts[0] == [f"first {j}\n\nsecond {j}\n\nso \\boxed{{{j}}}" for j in range(3)]  # in index order
    kind, sent, params, _ = llm.calls[-1]
    assert kind == "generate" and len(sent) == 3
    assert sent[0] == "<system>sys</system><user>q1</user><assistant>"
    assert sent[2] == "<system>sys</system><user>q2</user><assistant>a\n\nb\n\n"
    assert [p.n for p in params] == [3, 3, 3] and params[0].max_tokens == 32 and params[0].stop is None
    assert len({p.seed for p in params}) == 3  # equal prompts still sample differently
    first_seeds = [p.seed for p in params]
    policy.generate(prompts, n=1)
    assert [p.seed for p in llm.calls[-1][2]] != first_seeds  # call k uses seed + k
    rows = policy.generate_steps([PolicyPrompt("q")], 4)
    assert llm.calls[-1][2][0].stop == ["\n\n"]
    seed = llm.calls[-1][2][0].seed
    assert [(s.steps, s.finished) for s in rows[0]][:2] == [([f"step 0 of {seed}"], False), (["so \\boxed{1}"], True)]
    full = policy.generate_steps([PolicyPrompt("q")], 2, to_end=True)[0]
    assert full[0].steps == ["first 0", "second 0", "so \\boxed{0}"] and full[0].finished
    one_step = VLLMPolicy(llm, stop_at_step=True).generate([PolicyPrompt("q")], 2)
    assert llm.calls[-1][2][0].stop == ["\n\n"] and len(one_step[0]) == 2
    with pytest.raises(TypeError, match="unknown sampling option"):
        policy.generate(prompts, n=1, beam_width=3)


def test_vllm_policy_images_go_through_chat(fake_vllm):
    from mmprm_infer.integrations.vllm_policy import VLLMPolicy

    llm = FakeLLM(_steps_text)
    policy = VLLMPolicy(llm, system_prompt=None)
    image = Image.new("RGB", (4, 4), (9, 9, 9))
    prompts = [PolicyPrompt("text only"), PolicyPrompt("fresh", images=[image]),
               PolicyPrompt("cont", images=[image], partial_steps=["s1"])]
    texts = policy.generate(prompts, n=2)
    assert [len(t) for t in texts] == [2, 2, 2]
    kinds = [(c[0], c[3].get("continue_final_message")) for c in llm.calls]
    assert kinds == [("generate", None), ("chat", False), ("chat", True)]
    fresh = llm.calls[1][1][0]
    assert fresh[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    cont = llm.calls[2][1][0]
    assert cont[-1] == {"role": "assistant", "content": "s1\n\n"}


# --------------------------------------------------------------------------
# RerankingLLM
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shepherd(shepherd_dir):
    """Rewards spread over (0, 1) (spread_models): the comparison with the reference engine can fail."""
    return S.spread_prm(PRM.from_pretrained(shepherd_dir, format="math-shepherd", dtype=torch.float32))


def _answers(prompt, j, sp):
    if j == 0:
        return "", "length", None  # nothing to score
    if j == 1:
        return "area " * 3000, "length", None  # longer than the PRM's context
    return f"we compute {j} times {j}\n\nso the answer is \\boxed{{{j * j}}}", "stop", None


def test_reranking_llm_with_a_stand_in(fake_vllm, shepherd):
    from mmprm_infer.integrations.vllm_reranking import RerankingLLM

    llm = FakeLLM(_answers)
    wrapper = RerankingLLM(llm, shepherd, n=5, aggregate="last")
    outs = wrapper.generate(["What is 3 * 3?", {"prompt": "<template>Q</template>", "question": "What is Q?"}],
                            FakeSamplingParams(max_tokens=20, temperature=0.5))
    assert len(llm.calls) == 1
    kind, sent, params, _ = llm.calls[0]
    assert sent[1] == {"prompt": "<template>Q</template>"}  # "question" never reaches vLLM
    assert [p.n for p in params] == [5, 5] and params[0].temperature == 0.5
    for out, question in zip(outs, ["What is 3 * 3?", "What is Q?"]):
        assert out.question == question
        assert len(out.outputs) == 5
        assert {c.index for c in out.outputs[-2:]} == {0, 1}  # unscorable last
        assert all(c.score == float("-inf") and c.prm_error for c in out.outputs[-2:])
        scored = out.outputs[:3]
        assert [c.score for c in scored] == sorted((c.score for c in scored), reverse=True)
        ref = shepherd.score(question, [c.text for c in scored], engine="reference")
        S.assert_matches([c.step_rewards for c in scored], ref)
        for c, r in zip(scored, ref):
            assert c.score == pytest.approx(r[-1], abs=S.FP32_TOL)
        assert out.rerank.ranking == [c.index for c in out.outputs] and set(out.prm_errors) == {0, 1}
    # questions=..., return_n and the caller's n
    outs = wrapper.generate(["p1"], FakeSamplingParams(n=2), questions=["What is 1?"])
    assert len(outs[0].outputs) == 2 and outs[0].question == "What is 1?" and llm.calls[-1][2][0].n == 5
    outs = wrapper.generate(["p1"], FakeSamplingParams(n=8))
    assert len(outs[0].outputs) == 8 and llm.calls[-1][2][0].n == 8
    with pytest.raises(ValueError, match="questions"):
        wrapper.generate(["a", "b"], FakeSamplingParams(), questions=["only one"])
    with pytest.raises(ValueError, match="question text"):
        wrapper.generate([{"prompt_embeds": object()}], FakeSamplingParams())
    with pytest.raises(ValueError, match="needs a PRM"):
        RerankingLLM(llm, None)
    # token prompts: the question is the decoded prompt
    outs = wrapper.generate([{"prompt_token_ids": [1, 2, 3]}], FakeSamplingParams())
    assert outs[0].question == "1 2 3"


def test_reranking_llm_images_reach_the_prm(fake_vllm, image_sensitive_mm_prm):
    """multi_modal_data's image is the PRM's image: scores equal mm-prm's own with that image."""
    from mmprm_infer.integrations.vllm_reranking import RerankingLLM

    mm = image_sensitive_mm_prm
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")) for _ in range(2)]
    llm = FakeLLM(lambda p, j, sp: (f"the base is {j + 2}\n\nthe area is {j * 3}", "stop", None))
    wrapper = RerankingLLM(llm, mm, n=3)
    prompts = [{"prompt": "<image> area?", "multi_modal_data": {"image": im}, "question": "What is the area?"}
               for im in images]
    outs = wrapper.generate(prompts, FakeSamplingParams())
    assert llm.calls[0][1][0]["multi_modal_data"]["image"] is images[0]
    per_image = []
    for out, image in zip(outs, images):
        texts = [c.text for c in out.outputs]
        ref = mm.score("What is the area?", texts, image=image, engine="reference")
        for c, r in zip(out.outputs, ref):
            torch.testing.assert_close(torch.tensor(c.step_rewards), torch.tensor(r), rtol=0, atol=S.FP32_TOL)
        per_image.append(sorted(tuple(c.step_rewards) for c in out.outputs))
    assert per_image[0] != per_image[1]
