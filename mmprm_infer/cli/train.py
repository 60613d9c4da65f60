"""`mmprm train`: a PRM from your checkpoint and your step-labelled data.

    mmprm train --base DIR --data a.jsonl[,b.parquet] --format mm-prm --output-dir runs/my-prm

Flags take the names Hugging Face Trainer / TRL users know (--output-dir,
--per-device-train-batch-size, --gradient-accumulation-steps, --learning-rate,
--num-train-epochs, --eval-steps, --save-steps, --resume-from-checkpoint,
--report-to); the older spellings (--out, --batch-size, --grad-accum, --lr,
--epochs, --eval-every, --resume) still work.  Several processes (``torchrun
--nproc-per-node N -m mmprm_infer.cli train ...`` or ``accelerate launch``) train
data-parallel: each takes a share of every optimizer step's micro-batches and the
gradients are summed, so the run equals the one-process run.

The base is a causal LM, an InternVL (native or converted), or an existing
PRM; a step tag the base's tokenizer lacks is added (embeddings resized) and
recorded in the output's train_config.json.  Data (JSONL, JSON, Parquet,
Arrow, Hugging Face shards, ``datasets.save_to_disk`` folders: the one record
reader, ``mmprm_infer.io.data``) in layouts detected per file (MM-PRM
conversations, MM-PRM traverse, VisualPRM400K ``steps_with_score``, TRL
stepwise, this library's own exports); image paths are relative to the data
file.  The output loads with ``PRM.from_pretrained(OUT)`` and nothing else.
``--save-steps K`` keeps a resume point every K steps; after a kill, the same
command with ``--resume-from-checkpoint`` continues from it (optimizer,
scheduler and data position included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from mmprm_infer.cli.arguments import (
    FORMAT_NAMES,
    add_device,
    add_dtype,
    add_progress,
    alias,
    announce_device,
    positive_int,
    resolve_device,
)
from mmprm_infer.io.data import data_files
from mmprm_infer.io.files import existing_files

__all__ = ["configure", "run", "load_training_data", "load_base"]

HELP = "train a PRM from your checkpoint and step-labelled data"
DESCRIPTION = "Train a PRM on step-labelled data"


def _report_to(value: str) -> list[str]:
    from mmprm_infer.train.reporting import REPORT_TO  # lazy: only `mmprm train` runs it; `mmprm -h` stays light

    names = [v.strip() for v in value.split(",") if v.strip()]
    if names in (["none"], ["jsonl"]):
        return []
    if names == ["all"]:
        return list(REPORT_TO)
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(REPORT_TO)}, all, "
                                         "none (the JSONL logs are always written)")
    return names


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="checkpoint: a causal LM, an InternVL, or a PRM (a folder, or a hub "
                   "id in the local Hugging Face cache)")
    p.add_argument("--data", required=True, help="training data, comma-separated files or folders (JSONL, JSON, "
                   "Parquet, Arrow; Hugging Face shards; datasets.save_to_disk; a folder's 'train' split); "
                   "layouts are detected per file")
    p.add_argument("--data-format", default=None, choices=("mm-prm", "mm-prm-traverse", "visualprm", "stepwise"),
                   help="force the data layout (default: detected from each file's first record)")
    p.add_argument("--format", default=None, choices=FORMAT_NAMES,
                   help="PRM format to train (default: the base's recorded format; needed for a plain LM)")
    p.add_argument("--output-dir", help="(required) output folder (the trained PRM, logs, resume point)")
    alias(p, "--out", dest="output_dir")
    p.add_argument("--resume-from-checkpoint", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue the run a kill interrupted: from OUTPUT_DIR's resume point, or from PATH (a "
                        "checkpoint-last folder)")
    alias(p, "--resume", dest="resume_from_checkpoint", action="store_const", const=True)
    p.add_argument("--overwrite-output-dir", action="store_true", help="train into a non-empty --output-dir from "
                   "scratch")
    alias(p, "--overwrite", dest="overwrite_output_dir", action="store_true")
    g = p.add_argument_group("schedule (defaults: MM-PRM's run)")
    g.add_argument("--num-train-epochs", type=float, default=3.0)
    alias(g, "--epochs", dest="num_train_epochs", type=float)
    g.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides the epochs)")
    g.add_argument("--learning-rate", type=float, default=None,
                   help="peak learning rate (default: by model size, small for full fine-tuning as MM-PRM)")
    alias(g, "--lr", dest="learning_rate", type=float)
    g.add_argument("--per-device-train-batch-size", type=positive_int, default=4, help="samples per micro-batch")
    alias(g, "--batch-size", dest="per_device_train_batch_size", type=positive_int)
    g.add_argument("--batch-tokens", type=positive_int, default=None,
                   help="micro-batches by token budget instead of the batch size: as many samples as fit "
                        "(padding counted; a longer sample goes alone)")
    g.add_argument("--gradient-accumulation-steps", type=positive_int, default=1,
                   help="micro-batches per optimizer step (over all processes)")
    alias(g, "--grad-accum", dest="gradient_accumulation_steps", type=positive_int)
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--seed", type=int, default=0)
    labels = g.add_mutually_exclusive_group()
    labels.add_argument("--soft-labels", dest="label_mode", action="store_const", const="soft", default="soft",
                        help="targets are the MC values (default, as MM-PRM)")
    labels.add_argument("--hard-labels", dest="label_mode", action="store_const", const="hard",
                        help="targets are 1 when the label >= --label-threshold, else 0")
    g.add_argument("--label-threshold", type=float, default=0.5, help="with --hard-labels: a step's target is 1 "
                   "when its MC value is at or above this")
    alias(g, "--hard-label-threshold", dest="label_threshold", type=float)
    m = p.add_argument_group("model")
    m.add_argument("--lora-r", type=positive_int, default=None, metavar="R",
                   help="train LoRA adapters of rank R (needs peft), merged into the weights at the end")
    alias(m, "--lora", dest="lora_r", type=positive_int)
    m.add_argument("--lora-alpha", type=positive_int, default=None, help="LoRA alpha (default: 2 x R)")
    m.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay float32)")
    add_dtype(m, "float32", help="weights as loaded")
    add_device(m)
    vision = m.add_mutually_exclusive_group()
    vision.add_argument("--freeze-vision", dest="freeze_vision", action="store_true", default=True,
                        help="keep the vision tower frozen (default, as MM-PRM)")
    vision.add_argument("--train-vision", dest="freeze_vision", action="store_false")
    m.add_argument("--gradient-checkpointing", action="store_true")
    e = p.add_argument_group("evaluation, saving, logging")
    e.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of the samples for step-error F1 (0: none)")
    e.add_argument("--eval-steps", type=positive_int, default=None, help="optimizer steps between evaluations "
                   "(default: at the end only)")
    alias(e, "--eval-every", dest="eval_steps", type=positive_int)
    e.add_argument("--save-steps", type=positive_int, default=None,
                   help="keep a resume point every this many steps (OUTPUT_DIR/checkpoint-last)")
    e.add_argument("--report-to", type=_report_to, default=[], metavar="{tensorboard,wandb,all,none}",
                   help="also log to these, comma-separated (tensorboard: OUTPUT_DIR/runs; wandb where installed); "
                        "train_log.jsonl and eval_log.jsonl are always written")
    add_progress(e)


def _resolve_images(sample, base_dir: Path):
    sample.image_paths = existing_files(sample.image_paths, base_dir, lambda _, full: ValueError(
        f"image {full} of sample {sample.id or sample.question[:40]!r} not found (image paths are relative to "
        "the data file)"))
    return sample


def load_training_data(paths: Sequence[str], data_format: str | None = None) -> list:
    """Samples from each path (a file, or a folder: its ``train`` split, or its only one), through the one
    record reader; image paths resolved against each record's file.  Every sample is checked as the trainer
    will read it (labels in [0, 1], text where text belongs): bad data fails here, naming its file, before
    anything is written to --output-dir."""
    from mmprm_infer.train.collate import as_example  # lazy: only `mmprm train` runs it; `mmprm -h` stays light
    from mmprm_infer.train.datasets import load_samples  # lazy: only `mmprm train` runs it; `mmprm -h` stays light

    samples = []
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"data {path} does not exist")
        files = [Path(path)]
        if Path(path).is_dir():
            splits = data_files(path)
            if "train" not in splits and len(splits) > 1:
                raise ValueError(f"data {path} holds the splits {', '.join(sorted(splits))} and none is named "
                                 "'train'; give the split's file (or folder) itself")
            files = splits.get("train") or next(iter(splits.values()))
        for f in files:
            loaded = load_samples(f, data_format)
            for i, sample in enumerate(loaded):
                try:
                    as_example(sample, i)
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"{f}: {exc}") from None
            samples += [_resolve_images(s, f.parent) for s in loaded]
    if not samples:
        raise ValueError(f"no samples in {', '.join(paths)}")
    return samples


def load_base(base: str, format: str | None, dtype: str, device: str, seed: int = 0):
    """The base as a PRM of ``format``; a step tag its tokenizer lacks is added (embeddings resized,
    the new rows drawn from ``seed``, so a run and its resume start alike).  Returns (prm, added tokens)."""
    import torch  # torch: heavy, loaded where used

    from mmprm_infer.formats import get_format  # lazy: it imports PIL
    from mmprm_infer.loading import load_checkpoint  # lazy: it imports torch, transformers, PIL
    from mmprm_infer.prm import PRM  # lazy: it imports torch, transformers, PIL

    model, tokenizer, name, options = load_checkpoint(base, format, dtype, device, {}, tokens_may_be_missing=True)
    if name is None:
        raise ValueError(f"--base {base} records no PRM format and none was given: pass --format")
    tag = getattr(get_format(name, **options), "step_tag", None)
    added = []
    if tag and tag not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [tag]})
        with torch.random.fork_rng(devices=[]):  # transformers draws the new rows from the global RNG
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer))
        added.append(tag)
    return PRM(model, tokenizer, name, **options), added


def _split(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return samples, []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(fraction * len(samples)))])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


ADDED_TOKENS = "mmprm_added_tokens.json"  # not added_tokens.json: transformers reads that name


def _record_added_tokens(out: Path, added: list[str], resumed: bool) -> list[str]:
    """The tokens added to the base's tokenizer, kept in OUT from the first start (a resumed run
    loads a checkpoint that has them already)."""
    path = out / ADDED_TOKENS
    if resumed and path.is_file():
        return json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(added))
    return added


def _check_out(args, base: str) -> None:
    out, base_dir = Path(args.output_dir), Path(base)
    if out.is_file():
        raise ValueError(f"--output-dir {out} is a file; give a folder")
    a, b = base_dir.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        how = "is" if a == b else "lies inside" if a in b.parents else "contains"
        raise ValueError(f"--output-dir {out} {how} --base {base_dir}; training writes its checkpoints there (and "
                         "--overwrite-output-dir replaces them), which would destroy the base: choose an "
                         "--output-dir outside the base and not around it")
    busy = out.is_dir() and any(out.iterdir())
    if args.resume_from_checkpoint:
        # lazy: only `mmprm train` runs it; `mmprm -h` stays light
        from mmprm_infer.train.resume import find_resume_point

        where = out if args.resume_from_checkpoint is True else Path(args.resume_from_checkpoint)
        if find_resume_point(where) is None:
            raise ValueError(f"--resume-from-checkpoint: {where} holds no resume point (train with --save-steps to "
                             "keep one)")
    elif busy and not args.overwrite_output_dir:
        raise ValueError(f"--output-dir {out} is not empty; pass --resume-from-checkpoint to continue a run there, "
                         "or --overwrite-output-dir")


def _check_report_to(names: list[str]) -> None:
    needs = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
    for name in names:
        module, install = needs[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--report-to {name}: the {module} package is not installed ({install})")


def _clean_failed(out: Path, fresh: bool) -> None:
    """After a failed run into an --out that was empty: remove what it wrote, unless a resume point was kept,
    so the fixed command can run again without --overwrite."""
    from mmprm_infer.train.resume import find_resume_point  # lazy: only `mmprm train` runs it; `mmprm -h` stays light

    if not fresh or not out.is_dir() or find_resume_point(out) is not None:
        return
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    from mmprm_infer.loading import CheckpointNotFound, resolve_checkpoint  # lazy: it imports torch, transformers, PIL
    from mmprm_infer.train.distributed import Distributed  # lazy: only `mmprm train` runs it; `mmprm -h` stays light

    # lazy: only `mmprm train` runs it; `mmprm -h` stays light
    from mmprm_infer.train.resume import find_resume_point, load_resume_point

    # lazy: only `mmprm train` runs it; `mmprm -h` stays light
    from mmprm_infer.train.trainer import LoraSettings, TrainConfig, train_prm

    if args.output_dir is None:
        raise SystemExit("mmprm train: --output-dir is required (the folder for the trained PRM and its logs)")
    dist = Distributed.from_environment()
    out = Path(args.output_dir)
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    try:
        try:
            base = str(resolve_checkpoint(args.base))
        except CheckpointNotFound as exc:
            raise ValueError(f"--base {exc}") from None
        if dist.is_main:
            _check_out(args, base)
        _check_report_to(args.report_to)
        samples = load_training_data([p for p in args.data.split(",") if p], args.data_format)
        train, held = _split(samples, args.eval_fraction, args.seed)
        lora = None
        if args.lora_r:
            lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha or 2 * args.lora_r)
        config = TrainConfig(
            output_dir=args.output_dir, epochs=args.num_train_epochs, max_steps=args.max_steps,
            batch_size=args.per_device_train_batch_size, batch_tokens=args.batch_tokens,
            grad_accum_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
            weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, label_mode=args.label_mode,
            hard_label_threshold=args.label_threshold, bf16=args.bf16, freeze_vision=args.freeze_vision,
            gradient_checkpointing=args.gradient_checkpointing, lora=lora, seed=args.seed,
            eval_every=args.eval_steps, save_steps=args.save_steps, keep_step_checkpoints=False,
            progress=not args.no_progress and dist.is_main, report_to=tuple(args.report_to))
        resume_dir = None
        if args.resume_from_checkpoint:
            resume_dir = args.output_dir if args.resume_from_checkpoint is True else args.resume_from_checkpoint
        point = find_resume_point(resume_dir) if resume_dir else None
        device = dist.device(resolve_device(args.device))
        if dist.is_main:
            announce_device("mmprm train", device + (f" x {dist.world_size} processes" if dist.world_size > 1 else ""),
                            args.dtype)
        prm, added = load_base(str(point or base), args.format, args.dtype, device, args.seed)
        resume = load_resume_point(point) if point else None
        if dist.is_main:
            added = _record_added_tokens(Path(args.output_dir), added, resumed=point is not None)
    except (ValueError, TypeError, OSError) as exc:
        dist.close()
        if dist.is_main:
            _clean_failed(out, fresh)
        raise SystemExit(f"mmprm train: {exc}") from None
    try:
        result = train_prm(prm, train, config, held or None, resume=resume, distributed=dist)
    except KeyboardInterrupt:
        kept = find_resume_point(out) is not None
        if dist.is_main:
            _clean_failed(out, fresh)
        hint = (" rerun with --resume-from-checkpoint to continue" if kept
                else " no resume point was kept (use --save-steps)")
        print(f"mmprm train: interrupted;{hint}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as exc:
        kept = find_resume_point(out) is not None
        if dist.is_main:
            _clean_failed(out, fresh)
        raise SystemExit(f"mmprm train: {exc}" + ("; the last resume point is kept (--resume-from-checkpoint)"
                                                  if kept else "")) from None
    finally:
        dist.close()
    if not dist.is_main:
        return 0
    summary = {"output_dir": args.output_dir, "base": args.base, "format": prm.format.name, "added_tokens": added,
               "train_samples": len(train), "eval_samples": len(held), "steps": result.steps,
               "processes": dist.world_size, "learning_rate": result.learning_rate,
               "final_loss": result.losses[-1] if result.losses else None,
               "eval": result.eval_history[-1] if result.eval_history else None}
    try:
        (Path(args.output_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    except OSError as exc:
        raise SystemExit(f"mmprm train: the PRM is saved in {args.output_dir}, but its summary could not be written: "
                         f"{exc.strerror or exc}") from None
    print(json.dumps(summary, default=str))
    logs = ", ".join(["train_log.jsonl", *(["eval_log.jsonl"] if held else []),
                      *(["runs/ (tensorboard)"] if "tensorboard" in args.report_to else [])])
    print(f"mmprm train: wrote the PRM, train_summary.json and {logs} to {args.output_dir}; load it with "
          f"PRM.from_pretrained({args.output_dir!r})", file=sys.stderr)
    return 0
