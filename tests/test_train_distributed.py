"""Multi-process training: `torchrun` (or `accelerate launch`) runs `mmprm train` data-parallel, each
process a share of every step's micro-batches, gradients summed -- the same model as one process trains.
On CPU with Gloo; also `--report-to tensorboard`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mmprm_infer.cli import main
from mmprm_infer.testing.tiny import build_tiny_causal_lm
from mmprm_infer.train.datasets import StepSample, save_samples

SAMPLES = [StepSample(f"What is {i} + {i}?", [f"{i} + {i} = {2 * i + k % 2}.", f"So the answer is {2 * i + k % 2}."],
                      [float(k % 2 == 0), 0.25 if k % 2 else 1.0], id=f"s{i}-{k}") for i in range(6) for k in range(2)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = build_tiny_causal_lm(root / "base", arch="qwen2", extra_tokens=("<step>",), seed=4)
    save_samples(SAMPLES, root / "data.jsonl", "stepwise", soft_labels=True)
    return root, base


def _args(root, base, out):
    # 2 micro-batches per optimizer step: with 2 processes, one each
    return ["train", "--base", str(base), "--data", str(root / "data.jsonl"), "--format", "custom",
            "--output-dir", str(out), "--max-steps", "3", "--per-device-train-batch-size", "2",
            "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--device", "cpu", "--no-progress"]


def test_two_processes_train_what_one_trains(setup):
    from mmprm_infer import PRM

    root, base = setup
    assert main(_args(root, base, root / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's launcher where it is installed (its --multi_gpu mode spawns the processes on CPUs too),
    # else torch's; both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR for the same code path
    try:
        import accelerate  # noqa: F401

        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    except ImportError:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    cmd = [*launcher, "mmprm_infer.cli", *_args(root, base, root / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((root / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    one = [json.loads(line) for line in (root / "one" / "train_log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (root / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["samples"] for r in two] == [r["samples"] for r in one]
    a = PRM.from_pretrained(root / "one", device="cpu").model.state_dict()
    b = PRM.from_pretrained(root / "two", device="cpu").model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)
    untrained = PRM.from_pretrained(base, format="custom", device="cpu").model.state_dict()
    assert any(not torch.equal(untrained[n], a[n]) for n in untrained if n in a)  # it did train


def test_report_to_tensorboard(setup):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, base = setup
    out = root / "tb"
    assert main([*_args(root, base, out), "--report-to", "tensorboard", "--eval-fraction", "0.25"]) == 0
    (run,) = [p for p in (out / "runs").iterdir()]
    events = EventAccumulator(str(out / "runs" if run.is_file() else run))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "train/lr" in tags and "eval/f1" in tags
    logged = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(logged, rel=1e-5)  # float32 in events
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_report_to_names_what_is_missing(setup, monkeypatch):
    import importlib.util

    root, base = setup
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match="--report-to wandb: the wandb package is not installed"):
        main([*_args(root, base, root / "wb"), "--report-to", "wandb"])
    with pytest.raises(SystemExit):
        main([*_args(root, base, root / "wb"), "--report-to", "mlflow"])
