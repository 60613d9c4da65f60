"""The benchmark harness runs end to end (--quick: tiny dims, no vLLM) and reports every engine column.

Runs ``python -m bench.run`` as a user would, from the repo root, so the
CLI, model building, input fitting, timing, memory, floor, JSON and plot are
all exercised.  Timings at these sizes mean nothing; only the shape of the
output and the fast/reference agreement are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmprm_infer.engines import linear_paths

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("reference", "fast", "vllm", "vllm_plugin", "floor")
LABELS = {"vllm_plugin": "vllm+plugin"}  # as the table prints them


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--workload", "all", "--sweep", "--no-vllm",
           "--repeats", "1", "--warmup", "0", "--out", str(out), "--cache-dir", str(out.parent / "cache")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, out


def test_every_engine_column_is_reported(quick_run):
    results, stdout, _ = quick_run
    assert [w["name"] for w in results["workloads"]] == ["W1", "W2", "W3"]
    for w in results["workloads"]:
        rate = w["matmul_rate"]
        assert rate["flop_per_s"] > 0
        # the floor is at the fastest GEMM path measured, oneDNN included where torch has it
        assert rate["flop_per_s"] == max(r["flop_per_s"] for r in rate["paths"].values())
        assert ("oneDNN prepacked (torch.utils.mkldnn)" in rate["paths"]) == torch.backends.mkldnn.is_available()
        assert ("oneDNN packed linear (fast engine)" in rate["paths"]) == linear_paths.onednn_available()
        for p in w["points"]:
            engines = p["engines"]
            assert set(ENGINES) <= set(engines), (p["title"], sorted(engines))
            for name in ("reference", "fast", "floor"):
                assert engines[name]["status"] == "ok", (p["title"], name, engines[name])
                assert engines[name]["seconds"] > 0
            for name in ("reference", "fast"):
                assert len(engines[name]["times"]) == 1
                assert engines[name]["threads"].startswith(f"torch {torch.get_num_threads()} threads")
                assert engines[name]["peak_rss_mb"] >= 0
            # vLLM (both columns) is skipped, and says so -- in the JSON and on stdout
            for name in ("vllm", "vllm_plugin"):
                assert engines[name]["status"] == "skipped"
                assert "--no-vllm" in engines[name]["reason"]
            assert engines["fast"]["speedup_vs_reference"] > 0
            assert engines["fast"]["ratio_to_floor"] > 0
            assert p["fast_over_reference_peak_rss"] is not None
    assert "vLLM column skipped: --no-vllm given" in stdout
    for name in ENGINES:
        assert f"   {LABELS.get(name, name)}" in stdout


def test_fast_agrees_with_reference(quick_run):
    results, _, _ = quick_run
    for w in results["workloads"]:
        for p in w["points"]:
            assert p["engines"]["reference"]["max_abs_diff_vs_reference"] == 0.0
            assert p["engines"]["fast"]["max_abs_diff_vs_reference"] < 1e-4, p["title"]
            # the weights are redrawn so rewards vary: agreement is not the trivial 0.5 == 0.5
            assert p["reward_spread"]["max"] - p["reward_spread"]["min"] > 0.02, p["reward_spread"]


def test_token_counts_hit_the_targets(quick_run):
    results, _, _ = quick_run
    w1, w2, w3 = results["workloads"]
    for p in w1["points"] + w3["points"]:
        t, spec = p["tokens"], p["workload"]
        assert len(t["suffix_lengths"]) == spec["n_candidates"]
        assert t["markers"] == [spec["steps"]] * spec["n_candidates"]
        if spec["n_candidates"] > 1:  # one candidate alone shares its whole first step with "the prefix"
            assert t["shared_prefix"] == spec["prompt_tokens"]
            assert t["suffix_lengths"] == [spec["suffix_tokens"]] * spec["n_candidates"]
        assert t["unique_tokens"] == t["shared_prefix"] + sum(t["suffix_lengths"])
    (p,) = w2["points"]
    assert p["tokens"]["image_tokens"] == 7 * 64  # 6 tiles + thumbnail, 224 px tiles in --quick
    assert p["tokens"]["question_tokens"] == p["workload"]["prompt_tokens"]
    assert p["flops"]["vision"] > 0
    assert {q["axis"] for q in w1["points"]} == {"base", "N", "P"}
    assert {q["axis"] for q in w3["points"]} == {"base", "N", "P"}  # --sweep covers every text workload


def test_plot_written(quick_run):
    _, stdout, out = quick_run
    png = out.with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 1000, stdout[-2000:]


def test_bf16_run_is_judged_against_the_fp32_reference(tmp_path):
    out = tmp_path / "bf16.json"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--no-vllm", "--dtype", "bfloat16", "--repeats", "1",
           "--warmup", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["meta"]["dtype"] == "bfloat16"
    point = results["workloads"][0]["points"][0]
    for name in ("reference", "fast"):
        e = point["engines"][name]
        # bf16 rewards differ from fp32 (so the comparison is real) but stay close on this tiny model
        assert 0 < e["max_abs_diff_vs_fp32_reference"] < 0.05, e
        assert isinstance(e["ranking_same_as_fp32"], bool) and isinstance(e["best_of_n_same_as_fp32"], bool)
    assert "vs the fp32 reference" in proc.stdout
    # Which bf16 GEMM paths exist depends on the CPU: ask it instead of assuming one.  torch's F.linear is always
    # timed; oneDNN's packed linear where this CPU packs bf16 (avx512_bf16, AMX); never the fp32-only prepacked path.
    paths = set(results["workloads"][0]["matmul_rate"]["paths"])
    assert "torch F.linear" in paths
    assert ("oneDNN packed linear (fast engine)" in paths) == linear_paths.onednn_available(torch.bfloat16)
    assert "oneDNN prepacked (torch.utils.mkldnn)" not in paths


def test_readme_lists_the_harness_targets():
    from bench.report import targets_markdown

    assert targets_markdown() in (REPO / "bench" / "README.md").read_text()
