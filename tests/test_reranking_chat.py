"""RerankingLLM.chat: messages in, one LLM.chat call, the question and images the PRM sees taken from
the messages.  A stand-in for vllm.LLM records the call (the real one runs in tests/test_integration_vllm.py)."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pytest
from PIL import Image

from mmprm_infer.integrations.vllm_reranking import RerankingLLM

TEXTS = ["2 + 3 = 5.\n\nSo \\boxed{5}.", "2 + 3 = 6.\n\nSo \\boxed{6}.", "We add.\n\n2 + 3 = 5.\n\nSo \\boxed{5}."]


class Params:
    def __init__(self, n=1):
        self.n = n

    def clone(self):
        return Params(self.n)


class FakeLLM:
    def __init__(self):
        self.calls = []

    def chat(self, conversations, params, **kwargs):
        self.calls.append((conversations, params, kwargs))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t, index=i) for i, t in enumerate(TEXTS[:p.n])])
                for _, p in zip(conversations, params)]


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_reranks_conversations_in_one_call(shepherd_dir):
    from mmprm_infer import PRM

    prm = PRM.from_pretrained(shepherd_dir, format="math-shepherd", device="cpu")
    llm = FakeLLM()
    reranker = RerankingLLM(llm, prm, n=3)
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "user", "content": [{"type": "text", "text": "Add:"}, {"type": "text", "text": "2 + 3"}]}],
    ]
    outs = reranker.chat(conversations, Params(), chat_template_kwargs={"enable_thinking": False})
    assert len(llm.calls) == 1
    sent, params, kwargs = llm.calls[0]
    assert sent == conversations and [p.n for p in params] == [3, 3]
    assert kwargs["chat_template_kwargs"] == {"enable_thinking": False} and kwargs["add_generation_prompt"] is True
    assert [o.question for o in outs] == ["What is 2 + 3?", "Add:\n2 + 3"]
    for out in outs:
        assert len(out.outputs) == 3
        scores = [c.score for c in out.outputs]
        assert scores == sorted(scores, reverse=True)
        want = prm.score(out.question, [c.text for c in out.outputs])
        assert all(c.step_rewards == pytest.approx(w, abs=1e-6) for c, w in zip(out.outputs, want))
    # one conversation (a list of messages) works too, and the caller's n keeps the top n
    outs = reranker.chat([{"role": "user", "content": "What is 2 + 3?"}], Params(n=2))
    assert len(outs) == 1 and len(outs[0].outputs) == 2 and len(outs[0].rerank.ranking) == 3


def test_chat_images_reach_the_prm(image_sensitive_mm_prm):
    prm = image_sensitive_mm_prm
    red, blue = Image.new("RGB", (28, 28), "red"), Image.new("RGB", (28, 28), "blue")
    reranker = RerankingLLM(FakeLLM(), prm, n=2)
    question = "What colour is it?"
    pil = [{"role": "user", "content": [{"type": "image_pil", "image_pil": red}, {"type": "text", "text": question}]}]
    url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(blue)}},
                                        {"type": "text", "text": question}]}]
    out_red, out_blue = reranker.chat([pil, url], Params())
    for out, image in ((out_red, red), (out_blue, blue)):
        by_index = {c.index: c.step_rewards for c in out.outputs}
        want = prm.score(question, TEXTS[:2], image=image)
        assert all(by_index[i] == pytest.approx(w, abs=1e-5) for i, w in enumerate(want))
    assert out_red.rerank.step_rewards != out_blue.rerank.step_rewards  # the image moved the rewards


def test_chat_refuses_what_it_cannot_read(shepherd_dir):
    from mmprm_infer import PRM

    reranker = RerankingLLM(FakeLLM(), PRM.from_pretrained(shepherd_dir, format="math-shepherd", device="cpu"), n=2)
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                           {"type": "text", "text": "q"}]}]
    with pytest.raises(ValueError, match=r"conversation 0 message 0 part 0: .*not https:// URLs .*never downloads"):
        reranker.chat(remote, Params())
    with pytest.raises(ValueError, match="conversation 0: no question text for the PRM"):
        reranker.chat([{"role": "system", "content": "hi"}], Params())
    with pytest.raises(TypeError, match="conversation 0 must be a list of message dicts"):
        reranker.chat(["just a string"], Params())
