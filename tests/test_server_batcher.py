"""The server's PRM scorer on its own paths: the job-by-job fallback, clients that went away,
shutdown, the batch cap.  Jobs are queued before the scorer starts, so every batch is known in advance."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
import torch

pytest.importorskip("fastapi", reason="the server tests need the 'serve' extra (fastapi, uvicorn, httpx)")
httpx = pytest.importorskip("httpx")

from server_fakes import FakePolicy, ServerThread, chat, reranker, sample_text, wait_until  # noqa: E402

from mmprm_infer import PRM, ScoringItem  # noqa: E402
from mmprm_infer.integrations.serve import APIError, PRMBatcher  # noqa: E402

TOO_LONG = "so we compute x + y and " * 600  # past the tiny PRM's 2048-token context


@pytest.fixture(scope="module")
def prm(shepherd_dir):
    return PRM.from_pretrained(shepherd_dir, format="math-shepherd", dtype=torch.float32)


def _item(tag: str, n: int, question: str | None = None) -> ScoringItem:
    return ScoringItem(question or f"{tag}: what?", [sample_text(tag, j) for j in range(n)], None)


def _recording(batcher: PRMBatcher) -> list[list[str]]:
    """The questions of every engine call the batcher makes, one list per call."""
    calls, score = [], batcher._score_jobs

    def recorded(jobs):
        calls.append([it.question for job in jobs for it in job.items])
        return score(jobs)

    batcher._score_jobs = recorded
    return calls


async def _queued(batcher: PRMBatcher, *items_per_job) -> list[asyncio.Task]:
    tasks = [asyncio.ensure_future(batcher.rank(items, "min", "best_of_n")) for items in items_per_job]
    while batcher.queue.qsize() < len(tasks):
        await asyncio.sleep(0)
    return tasks


def test_failed_batch_is_scored_request_by_request(prm):
    good, bad = _item("request 1", 3), _item("request 2", 2, question=TOO_LONG)

    async def run():
        batcher = PRMBatcher(prm, window_s=0)
        calls = _recording(batcher)
        ok, broken = await _queued(batcher, [good], [bad])
        batcher.start()
        ranking = (await ok)[0]
        with pytest.raises(ValueError, match="the question is"):
            await broken
        await batcher.stop()
        return calls, ranking

    calls, ranking = asyncio.run(run())
    assert calls == [[good.question, TOO_LONG], [good.question], [TOO_LONG]]  # together, then each alone
    for got, ref in zip(ranking.step_rewards, prm.score(good.question, good.candidates)):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=0, atol=1e-5)


def test_jobs_of_clients_that_went_away_are_not_scored(prm):
    async def run():
        batcher = PRMBatcher(prm, window_s=0)
        calls = _recording(batcher)
        first, gone, last = await _queued(batcher, [_item("request 3", 2)], [_item("request 4", 2)],
                                          [_item("request 5", 2)])
        gone.cancel()
        batcher.start()
        await first
        await last
        await batcher.stop()
        return calls, gone

    calls, gone = asyncio.run(run())
    assert gone.cancelled() and calls == [["request 3: what?", "request 5: what?"]]


def test_shutdown_answers_every_waiting_job_with_503(prm):
    entered, release = threading.Event(), threading.Event()

    async def run():
        batcher = PRMBatcher(prm, window_s=0)
        score = batcher._score_jobs

        def held(jobs):  # the first batch stays in the engine until the test lets it go
            entered.set()
            release.wait(60)
            return score(jobs)

        batcher._score_jobs = held
        (scoring,) = await _queued(batcher, [_item("request 6", 2)])
        batcher.start()
        while not entered.is_set():
            await asyncio.sleep(0.005)
        queued = await _queued(batcher, [_item("request 7", 2)], [_item("request 8", 2)])
        await batcher.stop()
        outcomes = []
        for task in [scoring, *queued]:
            with pytest.raises(APIError) as exc:
                await asyncio.wait_for(task, 60)  # the limit only turns a hang into a failure
            outcomes.append(exc.value.status)
        release.set()  # before asyncio.run's exit, which waits for the engine thread
        return outcomes

    try:
        outcomes = asyncio.run(run())
    finally:
        release.set()
    assert outcomes == [503, 503, 503]  # the one being scored too, not only the queued ones


def test_batches_stay_within_max_batch_candidates(prm):
    sizes = [3, 2, 1, 5]  # a job that does not fit opens the next batch; one larger than the cap goes alone

    async def run():
        batcher = PRMBatcher(prm, window_s=0, max_batch_candidates=4)
        calls = _recording(batcher)
        tasks = await _queued(batcher, *[[_item(f"request {10 + k}", n)] for k, n in enumerate(sizes)])
        batcher.start()
        await asyncio.gather(*tasks)
        await batcher.stop()
        return calls

    calls = asyncio.run(run())
    assert calls == [["request 10: what?"], ["request 11: what?", "request 12: what?"], ["request 13: what?"]]


def test_a_client_that_leaves_cancels_its_request(prm):
    policy = FakePolicy()
    policy.gate.clear()  # the policy holds the request until the client has gone
    with ServerThread(policy.app) as upstream, reranker(prm, upstream.url + "/v1", policy_model="fake-policy") as srv:
        async def leave():
            async with httpx.AsyncClient(timeout=60) as client:
                task = asyncio.ensure_future(client.post(srv.url + "/v1/chat/completions", json=chat("request 30: q")))
                while policy.calls < 1:
                    await asyncio.sleep(0.005)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        try:
            asyncio.run(leave())
            wait_until(lambda: httpx.get(srv.url + "/health").json()["in_flight"] == 0,
                       "the server to drop the request of the client that left")
        finally:
            policy.gate.set()
        health = httpx.get(srv.url + "/health").json()
        assert health["scoring_batches"] == 0 and health["scored_requests"] == 0
