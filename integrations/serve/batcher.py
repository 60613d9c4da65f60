"""The server's PRM scorer: one task batches concurrent requests into one engine call.

Jobs wait in an asyncio queue; the scorer takes one, waits up to the batch
window for more (never past ``max_batch_candidates`` candidates unless one
job alone is larger: a job that does not fit opens the next batch), and
scores them in a worker thread (``PRM.score_readable``: a candidate the PRM
cannot read is ranked last, not failed).  A shared call that fails is retried job by
job, so one request's bad input fails only that request.  A job whose
client went away (its future cancelled) is skipped; on shutdown every job
not answered yet gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from mmprm_infer.integrations.serve.errors import APIError
from mmprm_infer.prm import PRM, ScoringItem, batch_then_each
from mmprm_infer.rerank import RerankResult, rank_scored

__all__ = ["PRMBatcher"]


@dataclass
class _Job:
    items: list[ScoringItem]
    aggregate: str
    strategy: str
    future: asyncio.Future
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(len(it.candidates) for it in self.items)


class PRMBatcher:
    """One scorer task: collects jobs for a short window, scores them in one engine call, answers each job."""

    def __init__(self, prm: PRM, engine: str | None = None, window_s: float = 0.01, max_batch_candidates: int = 512):
        self.prm = prm
        self.engine = engine
        self.window_s = window_s
        self.max_batch_candidates = max_batch_candidates
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._held: _Job | None = None  # took from the queue, did not fit the last batch: opens the next
        self._current: list[_Job] = []  # being scored now
        self.batches = 0  # scoring calls made (for tests and /health)
        self.batched_jobs = 0
        self.busy_s = 0.0  # time spent scoring

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mmprm-prm-scorer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Everyone still waiting hears why, rather than hanging until the connection drops.
        pending = [*self._current, *([self._held] if self._held else [])]
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(APIError(503, "the server is shutting down; retry shortly",
                                                  type="server_error"))

    async def rank(self, items: list[ScoringItem], aggregate: str, strategy: str) -> list[RerankResult]:
        job = _Job(items, aggregate, strategy, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _collect(self) -> list[_Job]:
        jobs = [self._held] if self._held is not None else [await self.queue.get()]
        self._held = None
        size = jobs[0].size
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch_candidates:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if size + job.size > self.max_batch_candidates:
                self._held = job
                break
            jobs.append(job)
            size += job.size
        return jobs

    async def _run(self) -> None:
        while True:
            jobs = [j for j in await self._collect() if not j.future.done()]  # done: the client went away
            if not jobs:
                continue
            self._current = jobs
            # one job's input may break the shared call: then they are scored one by one, each failure to its job
            results = await asyncio.to_thread(batch_then_each, self._score_jobs, jobs, lambda _, exc: exc)
            self._current = []
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _score_jobs(self, jobs: list[_Job]) -> list[list[RerankResult]]:
        """All jobs' items in one engine call; rankings handed back per job, in its own item order."""
        items = [it for job in jobs for it in job.items]
        t0 = time.perf_counter()
        rewards, errors = self.prm.score_readable(items, self.engine)
        self.busy_s += time.perf_counter() - t0
        self.batches += 1
        self.batched_jobs += len(jobs)
        out, start = [], 0
        for job in jobs:
            end = start + len(job.items)
            out.append(rank_scored(job.items, rewards[start:end], errors[start:end], job.aggregate, job.strategy))
            start = end
        return out
