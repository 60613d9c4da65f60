"""`mmprm train`: a PRM from your checkpoint and your step-labelled data.

    mmprm train --base DIR --data a.jsonl[,b.jsonl] --format mm-prm --out runs/my-prm

The base is a causal LM, an InternVL (native or converted), or an existing
PRM; a step tag the base's tokenizer lacks is added (embeddings resized) and
recorded in the output's train_config.json.  Data layouts are detected per
file (MM-PRM conversations, MM-PRM traverse, VisualPRM400K
``steps_with_score``, TRL stepwise, this library's own exports); image paths
are relative to the data file.  The output loads with
``PRM.from_pretrained(OUT)`` and nothing else.  ``--save-steps K`` keeps a
resume point every K steps; after a kill, the same command with ``--resume``
continues from it (optimizer, scheduler and data position included).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Sequence

from mmprm_infer.cli.arguments import DTYPES, positive_int

__all__ = ["configure", "run", "load_training_data", "load_base"]

HELP = "train a PRM from your checkpoint and step-labelled data"
DESCRIPTION = "Train a PRM on step-labelled data"


def configure(p: argparse.ArgumentParser) -> None:
    from mmprm_infer.formats import FORMATS

    p.add_argument("--base", required=True, help="checkpoint folder: a causal LM, an InternVL, or a PRM")
    p.add_argument("--data", required=True, help="training file(s), comma-separated (JSONL, or JSON for MM-PRM's "
                   "traverse layout); layouts are detected per file")
    p.add_argument("--data-format", default=None, choices=("mm-prm", "mm-prm-traverse", "visualprm", "stepwise"),
                   help="force the data layout (default: detected from each file's first record)")
    p.add_argument("--format", default=None, choices=sorted(FORMATS),
                   help="PRM format to train (default: the base's recorded format; needed for a plain LM)")
    p.add_argument("--out", required=True, help="output folder (the trained PRM, logs, resume point)")
    p.add_argument("--resume", action="store_true", help="continue the run a kill interrupted in --out")
    p.add_argument("--overwrite", action="store_true", help="train into a non-empty --out from scratch")
    g = p.add_argument_group("schedule (defaults: MM-PRM's run)")
    g.add_argument("--epochs", type=float, default=3.0)
    g.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: by model size, small for full fine-tuning as MM-PRM)")
    g.add_argument("--batch-size", type=positive_int, default=4, help="samples per micro-batch")
    g.add_argument("--batch-tokens", type=positive_int, default=None,
                   help="micro-batches by token budget instead of --batch-size: as many samples as fit (padding "
                        "counted; a longer sample goes alone)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--seed", type=int, default=0)
    labels = g.add_mutually_exclusive_group()
    labels.add_argument("--soft-labels", dest="label_mode", action="store_const", const="soft", default="soft",
                        help="targets are the MC values (default, as MM-PRM)")
    labels.add_argument("--hard-labels", dest="label_mode", action="store_const", const="hard",
                        help="targets are 1 when the label >= --hard-label-threshold, else 0")
    g.add_argument("--hard-label-threshold", type=float, default=0.5)
    m = p.add_argument_group("model")
    m.add_argument("--lora", type=positive_int, default=None, metavar="R", help="LoRA of rank R (needs peft)")
    m.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay float32)")
    m.add_argument("--dtype", default="float32", choices=DTYPES, help="weights as loaded (default float32)")
    m.add_argument("--device", default="cpu")
    vision = m.add_mutually_exclusive_group()
    vision.add_argument("--freeze-vision", dest="freeze_vision", action="store_true", default=True,
                        help="keep the vision tower frozen (default, as MM-PRM)")
    vision.add_argument("--train-vision", dest="freeze_vision", action="store_false")
    m.add_argument("--gradient-checkpointing", action="store_true")
    e = p.add_argument_group("evaluation and saving")
    e.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of the samples for step-error F1 (default 0: none)")
    e.add_argument("--eval-every", type=positive_int, default=None, help="optimizer steps between evaluations")
    e.add_argument("--save-steps", type=positive_int, default=None,
                   help="keep a resume point every this many steps (OUT/checkpoint-last)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def _resolve_images(sample, base_dir: Path):
    from mmprm_infer.io.files import existing_files

    sample.image_paths = existing_files(sample.image_paths, base_dir, lambda _, full: ValueError(
        f"image {full} of sample {sample.id or sample.question[:40]!r} not found (image paths are relative to "
        "the data file)"))
    return sample


def load_training_data(paths: Sequence[str], data_format: str | None = None) -> list:
    """Every sample of the files, checked as the trainer will read it (labels in [0, 1], text where text
    belongs): bad data fails here, naming its file, before anything is written to --out."""
    from mmprm_infer.train.collate import as_example
    from mmprm_infer.train.datasets import load_samples

    samples = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"data file {path} does not exist")
        loaded = load_samples(path, data_format)
        for i, sample in enumerate(loaded):
            try:
                as_example(sample, i)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}: {exc}") from None
        samples += [_resolve_images(s, Path(path).parent) for s in loaded]
    if not samples:
        raise ValueError(f"no samples in {', '.join(paths)}")
    return samples


def load_base(base: str, format: str | None, dtype: str, device: str, seed: int = 0):
    """The base as a PRM of ``format``; a step tag its tokenizer lacks is added (embeddings resized,
    the new rows drawn from ``seed``, so a run and its resume start alike).  Returns (prm, added tokens)."""
    import torch

    from mmprm_infer.formats import get_format
    from mmprm_infer.loading import load_checkpoint
    from mmprm_infer.prm import PRM

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


def _check_out(args) -> None:
    out, base = Path(args.out), Path(args.base)
    if out.is_file():
        raise ValueError(f"--out {out} is a file; give a folder")
    a, b = base.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        how = "is" if a == b else "lies inside" if a in b.parents else "contains"
        raise ValueError(f"--out {out} {how} --base {base}; training writes its checkpoints there (and --overwrite "
                         "replaces them), which would destroy the base: choose an --out folder outside the base "
                         "and not around it")
    busy = out.is_dir() and any(out.iterdir())
    if args.resume:
        from mmprm_infer.train.resume import find_resume_point

        if find_resume_point(out) is None:
            raise ValueError(f"--resume: {out} holds no resume point (train with --save-steps to keep one)")
    elif busy and not args.overwrite:
        raise ValueError(f"--out {out} is not empty; pass --resume to continue a run there, or --overwrite")


def _clean_failed(out: Path, fresh: bool) -> None:
    """After a failed run into an --out that was empty: remove what it wrote, unless a resume point was kept,
    so the fixed command can run again without --overwrite."""
    from mmprm_infer.train.resume import find_resume_point

    if not fresh or not out.is_dir() or find_resume_point(out) is not None:
        return
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    from mmprm_infer.io.progress import quiet_transformers_progress
    from mmprm_infer.train.resume import find_resume_point, load_resume_point
    from mmprm_infer.train.trainer import LoraSettings, TrainConfig, train_prm

    quiet_transformers_progress()
    out = Path(args.out)
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    try:
        if not (Path(args.base) / "config.json").is_file():
            raise ValueError(f"--base {args.base} is not a checkpoint folder (no config.json in it)")
        _check_out(args)
        samples = load_training_data([p for p in args.data.split(",") if p], args.data_format)
        train, held = _split(samples, args.eval_fraction, args.seed)
        config = TrainConfig(
            output_dir=args.out, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
            batch_tokens=args.batch_tokens,
            grad_accum_steps=args.grad_accum, learning_rate=args.lr, weight_decay=args.weight_decay,
            warmup_ratio=args.warmup_ratio, label_mode=args.label_mode, hard_label_threshold=args.hard_label_threshold,
            bf16=args.bf16, freeze_vision=args.freeze_vision, gradient_checkpointing=args.gradient_checkpointing,
            lora=LoraSettings(r=args.lora, alpha=2 * args.lora) if args.lora else None, seed=args.seed,
            eval_every=args.eval_every, save_steps=args.save_steps, keep_step_checkpoints=False,
            progress=not args.quiet)
        point = find_resume_point(args.out) if args.resume else None
        prm, added = load_base(str(point or args.base), args.format, args.dtype, args.device, args.seed)
        resume = load_resume_point(point) if point else None
        added = _record_added_tokens(Path(args.out), added, resumed=point is not None)
    except (ValueError, TypeError, OSError) as exc:
        _clean_failed(out, fresh)
        raise SystemExit(f"mmprm train: {exc}") from None
    try:
        result = train_prm(prm, train, config, held or None, resume=resume)
    except KeyboardInterrupt:
        kept = find_resume_point(out) is not None
        _clean_failed(out, fresh)
        hint = " rerun with --resume to continue" if kept else " no resume point was kept (use --save-steps)"
        print(f"mmprm train: interrupted;{hint}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as exc:
        kept = find_resume_point(out) is not None
        _clean_failed(out, fresh)
        raise SystemExit(f"mmprm train: {exc}" + ("; the last resume point is kept (--resume)" if kept else "")) \
            from None
    summary = {"out": args.out, "base": args.base, "format": prm.format.name, "added_tokens": added,
               "train_samples": len(train), "eval_samples": len(held), "steps": result.steps,
               "learning_rate": result.learning_rate,
               "final_loss": result.losses[-1] if result.losses else None,
               "eval": result.eval_history[-1] if result.eval_history else None}
    try:
        (Path(args.out) / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    except OSError as exc:
        raise SystemExit(f"mmprm train: the PRM is saved in {args.out}, but its summary could not be written: "
                         f"{exc.strerror or exc}") from None
    print(json.dumps(summary, default=str))
    print(f"mmprm train: done; load it with PRM.from_pretrained({args.out!r})", file=sys.stderr)
    return 0
