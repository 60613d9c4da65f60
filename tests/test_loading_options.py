"""Loading as transformers users expect: dtype / torch_dtype ("auto" too), device_map where the engine
takes it, attn_implementation, trust_remote_code refused by name, hub ids from the local Hugging Face cache
(never downloaded), device defaulting to CUDA when there is one."""

from __future__ import annotations

import shutil

import pytest
import torch

from mmprm_infer import PRM
from mmprm_infer.loading import CheckpointNotFound, LoadOptions, resolve_checkpoint

Q = "What is 2 + 3?"
CANDIDATES = ["2 + 3 = 5.\n\nThe answer is 5.", ["2 + 3 = 6.", "The answer is 6."]]


def _flat(rewards):
    return [r for candidate in rewards for r in candidate]


def test_torch_dtype_is_dtype(qwen_prm_dir):
    prm = PRM.from_pretrained(qwen_prm_dir, torch_dtype=torch.bfloat16, device="cpu")
    assert next(prm.model.parameters()).dtype == torch.bfloat16
    assert next(PRM.from_pretrained(qwen_prm_dir, dtype="bf16", device="cpu").model.parameters()).dtype == \
        torch.bfloat16
    with pytest.raises(ValueError, match="disagree"):
        PRM.from_pretrained(qwen_prm_dir, dtype="float32", torch_dtype="bfloat16")


def test_dtype_auto_takes_the_checkpoints(qwen_prm_dir, tmp_path):
    prm = PRM.from_pretrained(qwen_prm_dir, dtype="float32", device="cpu")
    prm.model.to(torch.bfloat16)
    prm.save_pretrained(tmp_path / "bf16")
    assert next(PRM.from_pretrained(tmp_path / "bf16", dtype="auto").model.parameters()).dtype == torch.bfloat16
    assert next(PRM.from_pretrained(tmp_path / "bf16").model.parameters()).dtype == \
        (torch.bfloat16 if torch.cuda.is_available() else torch.float32)  # None: by device, as before


def test_device_defaults_to_cuda_when_there_is_one(qwen_prm_dir):
    prm = PRM.from_pretrained(qwen_prm_dir)
    assert prm.adapter.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert LoadOptions(device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_map_one_device_for_every_engine(qwen_prm_dir):
    want = PRM.from_pretrained(qwen_prm_dir, device="cpu").score(Q, CANDIDATES)
    for device_map in ("cpu", {"": "cpu"}, torch.device("cpu")):
        prm = PRM.from_pretrained(qwen_prm_dir, device_map=device_map)
        assert prm.adapter.device.type == "cpu"
        assert _flat(prm.score(Q, CANDIDATES)) == pytest.approx(_flat(want), abs=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        LoadOptions(device="cpu", device_map="cuda:1")


def test_a_spread_device_map_only_where_the_engine_takes_it(qwen_prm_dir):
    with pytest.raises(ValueError, match=r"device_map='auto'.*engine 'fast' cannot run.*engine='reference'"):
        PRM.from_pretrained(qwen_prm_dir, device_map="auto")
    pytest.importorskip("accelerate")  # transformers needs it for device_map="auto"
    prm = PRM.from_pretrained(qwen_prm_dir, device_map="auto", engine="reference", dtype="float32")
    want = PRM.from_pretrained(qwen_prm_dir, device="cpu", dtype="float32").score(Q, CANDIDATES, engine="reference")
    assert _flat(prm.score(Q, CANDIDATES)) == pytest.approx(_flat(want), abs=1e-5)


def test_attn_implementation_reaches_transformers(qwen_prm_dir):
    eager = PRM.from_pretrained(qwen_prm_dir, device="cpu", attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"
    sdpa = PRM.from_pretrained(qwen_prm_dir, device="cpu", attn_implementation="sdpa")
    assert sdpa.model.config._attn_implementation == "sdpa"
    for engine in ("reference", "fast"):
        assert _flat(eager.score(Q, CANDIDATES, engine=engine)) == pytest.approx(
            _flat(sdpa.score(Q, CANDIDATES, engine=engine)), abs=1e-5)


def test_remote_code_and_downloads_are_refused_by_name(qwen_prm_dir):
    with pytest.raises(ValueError, match="trust_remote_code=True is refused: .*never a checkpoint's Python code"):
        PRM.from_pretrained(qwen_prm_dir, trust_remote_code=True)
    PRM.from_pretrained(qwen_prm_dir, trust_remote_code=False, device="cpu")  # the default, said out loud: fine
    with pytest.raises(ValueError, match="never downloads"):
        PRM.from_pretrained(qwen_prm_dir, local_files_only=False)
    with pytest.raises(ValueError, match="PRM.from_pretrained takes device, dtype"):
        PRM.from_pretrained(qwen_prm_dir, low_cpu_mem_usage=True)


def _hub_cache(root, repo_id: str, checkpoint) -> str:
    """huggingface_hub's cache layout: models--org--name/refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_hub_ids_come_from_the_local_cache(qwen_prm_dir, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    commit = _hub_cache(cache, "someone/tiny-prm", qwen_prm_dir)
    prm = PRM.from_pretrained("someone/tiny-prm", cache_dir=cache, device="cpu")
    assert _flat(prm.score(Q, CANDIDATES)) == pytest.approx(
        _flat(PRM.from_pretrained(qwen_prm_dir, device="cpu").score(Q, CANDIDATES)), abs=1e-6)
    assert resolve_checkpoint("someone/tiny-prm", cache_dir=cache, revision=commit).name == commit
    # the default cache is huggingface_hub's (HF_HOME / HF_HUB_CACHE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_checkpoint("someone/tiny-prm") == cache / "models--someone--tiny-prm" / "snapshots" / commit
    with pytest.raises(CheckpointNotFound, match=r"someone/other is not a folder here.*not in the local Hugging "
                                                 r"Face cache.*never downloads.*hf download someone/other"):
        PRM.from_pretrained("someone/other")
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        PRM.from_pretrained(str(tmp_path / "missing"))


def test_the_cli_takes_hub_ids(qwen_prm_dir, tmp_path, monkeypatch):
    import json

    import huggingface_hub

    from mmprm_infer.cli import main

    cache = tmp_path / "hub"
    _hub_cache(cache, "someone/tiny-prm", qwen_prm_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"question": Q, "candidates": CANDIDATES}) + "\n")
    assert main(["score", "--prm", "someone/tiny-prm", "--data", str(data), "-o", str(tmp_path / "o.jsonl"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "o.jsonl").read_text())["step_rewards"]) == 2
    with pytest.raises(SystemExit, match="mmprm score: --prm someone/none is not a folder here"):
        main(["score", "--prm", "someone/none", "--data", str(data), "-o", str(tmp_path / "o2.jsonl")])
