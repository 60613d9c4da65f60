"""One CLI vocabulary: new names, old spellings as hidden aliases, defaults in every --help, --version,
a parser that imports no torch, the device printed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mmprm_infer.cli import _COMMANDS, build_parser, main

# command -> (old spelling, new name, the dest both fill), one row per renamed option
RENAMED = [
    ("score", ["-i", "x.jsonl"], ["--data", "x.jsonl"], "data"),
    ("score", ["--input", "x.jsonl"], ["-d", "x.jsonl"], "data"),
    ("score", ["--quiet"], ["--no-progress"], "no_progress"),
    ("score", ["--torch-dtype", "bf16"], ["--dtype", "bf16"], "dtype"),
    ("train", ["--out", "o"], ["--output-dir", "o"], "output_dir"),
    ("train", ["--lr", "0.1"], ["--learning-rate", "0.1"], "learning_rate"),
    ("train", ["--batch-size", "3"], ["--per-device-train-batch-size", "3"], "per_device_train_batch_size"),
    ("train", ["--grad-accum", "2"], ["--gradient-accumulation-steps", "2"], "gradient_accumulation_steps"),
    ("train", ["--eval-every", "5"], ["--eval-steps", "5"], "eval_steps"),
    ("train", ["--epochs", "2"], ["--num-train-epochs", "2"], "num_train_epochs"),
    ("train", ["--resume"], ["--resume-from-checkpoint"], "resume_from_checkpoint"),
    ("train", ["--overwrite"], ["--overwrite-output-dir"], "overwrite_output_dir"),
    ("train", ["--hard-label-threshold", "0.3"], ["--label-threshold", "0.3"], "label_threshold"),
    ("train", ["--lora", "4"], ["--lora-r", "4"], "lora_r"),
    ("train", ["--quiet"], ["--no-progress"], "no_progress"),
    ("annotate", ["--out-dir", "o"], ["--output-dir", "o"], "output_dir"),
    ("annotate", ["--questions", "q.jsonl"], ["--data", "q.jsonl"], "data"),
    ("annotate", ["--threshold", "0.2"], ["--label-threshold", "0.2"], "label_threshold"),
]
REQUIRED = {"score": ["score", "-o", "out.jsonl"], "train": ["train", "--base", "b", "--data", "d"],
            "annotate": ["annotate"]}


@pytest.mark.parametrize("command,old,new,dest", RENAMED)
def test_old_spellings_are_hidden_aliases(command, old, new, dest):
    parser = build_parser(command, only=True)
    base = REQUIRED[command] + (["--output-dir", "o"] if command in ("train", "annotate") and dest != "output_dir"
                                else [])
    assert getattr(parser.parse_args(base + old), dest) == getattr(parser.parse_args(base + new), dest)
    sub = parser._subparsers._group_actions[0].choices[command]
    shown = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", sub.format_help()))
    assert new[0] in shown and old[0] not in shown


def test_eval_bon_takes_the_shared_names():
    parser = build_parser("eval", only=True)
    args = parser.parse_args(["eval", "bon", "--prm", "p", "-i", "c.jsonl", "--aggregations", "min,average"])
    new = parser.parse_args(["eval", "bon", "--prm", "p", "--data", "c.jsonl", "--aggregate", "min,mean"])
    assert args.data == new.data == "c.jsonl" and args.aggregate == new.aggregate == ["min", "mean"]


def test_every_help_shows_its_defaults():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    benchmarks = commands["eval"]._subparsers._group_actions[0].choices
    for name, sub in [*((n, commands[n]) for n in _COMMANDS if n != "eval"), *benchmarks.items()]:
        assert "default" in sub.format_help(), name
    def text(parser):
        return " ".join(parser.format_help().split())

    assert "(default: 8)" in text(commands["rerank"])  # --batch-questions
    assert "--strategy {best_of_n,weighted_vote,majority_vote} how the best candidate is picked (default: best_of_n)" \
        in text(commands["rerank"])
    assert "--num-train-epochs NUM_TRAIN_EPOCHS default: 3.0" in text(commands["train"])
    annotate = text(commands["annotate"])
    assert "--c-puct C_PUCT default: 0.125" in annotate and "--alpha ALPHA default: 0.5" in annotate
    serve = text(commands["serve"])
    for flag, default in (("--n N", "default: 8"), ("--max-queue", "default: 256"), ("--batch-window-ms", "10.0")):
        assert flag in serve and default in serve
    bench = text(benchmarks["processbench"])
    assert "--threshold THRESHOLD" in bench and "(default: 0.5)" in bench


def test_version(capsys):
    from mmprm_infer import __version__

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"mmprm {__version__}"


def test_the_parser_imports_neither_torch_nor_transformers():
    """`mmprm --help` answers without the heavy imports (deterministic: which modules got imported)."""
    code = ("import sys; from mmprm_infer.cli import build_parser; import mmprm_infer; "
            "[build_parser(c, only=True) for c in ('score', 'rerank', 'eval', 'train', 'serve', 'convert-internvl', "
            "'annotate', 'pipeline', 'demo', None)]; mmprm_infer.__version__; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'fastapi', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_format_names_match_the_registry():
    from mmprm_infer.cli.arguments import FORMAT_NAMES
    from mmprm_infer.formats import FORMATS

    assert tuple(sorted(FORMATS)) == FORMAT_NAMES


def test_lazy_package_exports_and_the_rerank_name():
    import mmprm_infer
    import mmprm_infer.rerank as rerank_module  # noqa: F401 - importing the submodule must not rebind the name
    from mmprm_infer import PRM, rerank

    assert callable(rerank) and rerank.__name__ == "rerank" and mmprm_infer.rerank is rerank
    assert PRM.__name__ == "PRM" and "PRM" in dir(mmprm_infer)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmprm_infer.nope  # noqa: B018


def test_device_auto_resolves_and_is_printed(shepherd_dir, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"question": "q?", "candidates": ["a.\\n\\nb."]}\n')
    out = tmp_path / "out.jsonl"
    assert main(["score", "--prm", str(shepherd_dir), "--format", "math-shepherd", "--data", str(data),
                 "--output", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    import torch

    assert f"mmprm score: device {'cuda' if torch.cuda.is_available() else 'cpu'}" in err
    assert f"wrote 1 records to {out}" in err


def test_majority_vote_claims_no_aggregation(tmp_path):
    import json

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"question": "q?", "candidates": ["so \\boxed{2}", "so \\boxed{2}", "so \\boxed{3}"]})
                    + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["rerank", "--strategy", "majority_vote", "--data", str(data), "-o", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["aggregate"] is None and record["scores"] is None and record["best_index"] in (0, 1)
