"""Command line: MCTS-annotate synthetic problems (``mmprm annotate``).

    mmprm annotate --num-problems 100 --output-dir runs/ann \\
        --k 16 --rollout-budget 200 --max-search-count 20
    mmprm annotate --data q.jsonl --policy-hf DIR --method mc --output-dir runs/mine

Writes one OmegaPRM tree per question under ``OUTPUT_DIR/trees`` (see
``mmprm_infer.train.mcts.annotate``); rerunning the same command after a
kill finishes the remaining questions.  ``--export FILE`` also writes the
labelled training samples (``--export-format``: mm-prm, visualprm,
stepwise), with image paths relative to that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from mmprm_infer.cli.arguments import add_progress, alias
from mmprm_infer.integrations.ray_cluster import RayConnectError
from mmprm_infer.io.data import read_records

__all__ = ["configure", "run", "load_questions", "policy_factory"]

HELP = "MCTS (OmegaPRM) or Monte Carlo step annotation of synthetic problems or your own questions"
DESCRIPTION = ("OmegaPRM (MM-PRM) MCTS step annotation of synthetic multimodal problems with the "
                    "synthetic policy; resumable.")


def configure(p: argparse.ArgumentParser) -> None:
    from mmprm_infer.train.mcts import MCTSConfig  # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light

    # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light
    from mmprm_infer.train.synthetic.policy import ErrorRates

    cfg, rates = MCTSConfig(), ErrorRates()
    g = p.add_argument_group("problems")
    g.add_argument("--num-problems", type=int, default=100, help="number of problems (default 100)")
    g.add_argument("--seed", type=int, default=0, help="problem seed (default 0)")
    g.add_argument("--split", choices=("train", "test"), default="train", help="problem split (disjoint seeds)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--text-only", action="store_true", help="questions carry the picture as text, no images")
    mode.add_argument("--image", dest="text_only", action="store_false", help="questions with images (default)")
    g.add_argument("--output-dir", help="(required) output folder (trees/, images/, run.json)")
    alias(g, "--out-dir", dest="output_dir")
    g.add_argument("--data", default=None, metavar="FILE",
                   help="annotate your own questions instead of synthetic ones: records (JSONL, JSON, Parquet, "
                        "Arrow, or a folder of them) in MM-PRM's input layout (question, correct_answer, optional "
                        "image_path relative to the file, id); needs a policy: --policy-hf, --policy-url or "
                        "--policy-vllm")
    alias(g, "--questions", dest="data")

    s = p.add_argument_group("search (MM-PRM defaults)")
    s.add_argument("--method", choices=("omegaprm", "mc"), default="omegaprm",
                   help="omegaprm: MM-PRM's tree search (default); mc: per-step Monte Carlo estimation as "
                        "Math-Shepherd / VisualPRM400K (--num-solutions solutions, --k completions per step)")
    s.add_argument("--num-solutions", type=int, default=4, help="--method mc: solutions sampled per question")
    s.add_argument("--k", "--num-rollouts", dest="num_rollouts", type=int, default=cfg.num_rollouts,
                   help=f"rollouts per MC estimate (default {cfg.num_rollouts})")
    s.add_argument("--rollout-budget", type=int, default=cfg.rollout_budget, help="rollouts per question")
    s.add_argument("--max-search-count", type=int, default=cfg.max_search_count)
    s.add_argument("--c-puct", type=float, default=cfg.c_puct)
    s.add_argument("--alpha", type=float, default=cfg.alpha)
    s.add_argument("--beta", type=float, default=cfg.beta)
    s.add_argument("--length-scale", type=float, default=cfg.length_scale, help="L in beta^(words / L)")
    s.add_argument("--temperature", type=float, default=cfg.temperature)
    s.add_argument("--top-p", type=float, default=cfg.top_p)
    s.add_argument("--top-k", type=int, default=cfg.top_k)

    e = p.add_argument_group("synthetic policy")
    e.add_argument("--policy-seed", type=int, default=0)
    e.add_argument("--misread-rate", type=float, default=rates.misread, help="per value read")
    e.add_argument("--trap-range", type=float, nargs=2, default=list(rates.trap_range), metavar=("LOW", "HIGH"),
                   help="per-problem probability range of misreading its one hard value")
    e.add_argument("--wrong-line-rate", type=float, default=rates.wrong_line, help="per reading step")
    e.add_argument("--slip-rate", type=float, default=rates.slip, help="arithmetic slip, per calculation")
    e.add_argument("--drop-term-rate", type=float, default=rates.drop_term)
    e.add_argument("--dup-term-rate", type=float, default=rates.dup_term)
    e.add_argument("--skip-op-rate", type=float, default=rates.skip_op)
    e.add_argument("--dup-op-rate", type=float, default=rates.dup_op)
    e.add_argument("--policy-latency", type=float, default=0.0,
                   help="seconds to sleep per policy call (simulates a slow policy)")

    r = p.add_argument_group("policy (default: the synthetic policy above)")
    r.add_argument("--policy-url", default=None,
                   help="rollouts from an OpenAI-compatible server instead (e.g. http://127.0.0.1:8000/v1)")
    r.add_argument("--policy-model", default=None, help="model name at --policy-url, or the model --policy-vllm loads")
    r.add_argument("--policy-hf", default=None, metavar="DIR",
                   help="rollouts from a local transformers checkpoint (causal LM or native InternVL), sampled with "
                        "--policy-seed")
    r.add_argument("--policy-vllm", action="store_true",
                   help="with --ray: a vLLM engine inside each worker loads --policy-model")
    r.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per vLLM policy (--policy-vllm)")
    r.add_argument("--max-new-tokens", type=int, default=1024, help="per rollout, for --policy-url / --policy-vllm")

    o = p.add_argument_group("run")
    o.add_argument("--workers", type=int, default=None,
                   help="questions annotated at once (threads, default 1; with --ray: Ray workers, default: fill "
                        "the cluster)")
    o.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="spread questions over a Ray cluster (needs the 'ray' extra): ADDRESS, or none to join "
                        "$RAY_ADDRESS / a running local cluster, else start one here")
    add_progress(o)
    o.add_argument("--export", default=None, help="also write labelled samples to this file (image paths relative "
                   "to it)")
    o.add_argument("--export-format", choices=("mm-prm", "visualprm", "stepwise"), default="mm-prm")
    o.add_argument("--granularity", choices=("node", "step"), default="node",
                   help="labels per tree node (MM-PRM) or per step")
    o.add_argument("--label-threshold", type=float, default=0.0,
                   help="a step whose MC value is at or below this is a negative (0: no rollout reached the answer)")
    alias(o, "--threshold", dest="label_threshold", type=float)
    o.add_argument("--hard-labels", action="store_true", help="export 1/0 labels (MC > --label-threshold) instead "
                   "of MC")
    o.add_argument("--soft-labels", action="store_true",
                   help="stepwise export: write the MC values (under 'soft_labels') instead of TRL's bool labels "
                        "(MC > --label-threshold), which is the default there")


def load_questions(path: str) -> list[dict]:
    """Question dicts from records (JSONL, JSON, Parquet, Arrow, a folder: the one record reader), image
    paths made relative to each record's file; errors name the file, line and field."""

    questions = []
    for record in read_records(path):
        q = record.data
        missing = [name for name, ok in (("question", "question" in q),
                                         ("correct_answer", bool({"correct_answer", "answer"} & set(q)))) if not ok]
        if missing:
            raise ValueError(f"{record.where}: missing field(s) {', '.join(repr(m) for m in missing)} (each record "
                             "needs 'question' and 'correct_answer' or 'answer')")
        if not isinstance(q["question"], str):
            raise ValueError(f"{record.where}: field 'question' must be a string, got {type(q['question']).__name__}")
        if q.get("image_path") and not Path(q["image_path"]).is_absolute():
            # records read from a file have a path
            q["image_path"] = str(record.path.parent / q["image_path"])  # type: ignore[union-attr]
        questions.append(q)
    return questions


def policy_factory(args, rates):
    """A picklable callable that builds the policy (in this process, or in each Ray worker)."""
    # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light
    from mmprm_infer.integrations import ray_annotate as factories

    # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light
    from mmprm_infer.train.synthetic.policy import synthetic_policy_factory

    if args.policy_vllm:
        if args.ray is None or not args.policy_model:
            raise SystemExit("mmprm annotate: --policy-vllm needs --ray and --policy-model")
        # tensor parallel > 1: vLLM places its own shards on the cluster through Ray
        extra = {"distributed_executor_backend": "ray"} if args.tensor_parallel_size > 1 else {}
        return factories.vllm_policy_factory(args.policy_model, args.tensor_parallel_size, llm_kwargs=extra,
                                             max_new_tokens=args.max_new_tokens)
    if args.policy_hf:
        if not (Path(args.policy_hf) / "config.json").is_file():
            raise SystemExit(f"mmprm annotate: --policy-hf {args.policy_hf} is not a checkpoint folder")
        return factories.hf_policy_factory(args.policy_hf, args.policy_seed, max_new_tokens=args.max_new_tokens)
    if args.policy_url:
        if not args.policy_model:
            raise SystemExit("mmprm annotate: --policy-url needs --policy-model")
        return factories.openai_policy_factory(args.policy_url, args.policy_model, max_new_tokens=args.max_new_tokens)
    if args.data:
        raise SystemExit("mmprm annotate: --data needs a policy that can answer its questions: --policy-hf, "
                         "--policy-url or --policy-vllm")
    return synthetic_policy_factory(args.num_problems, args.split, args.seed, rates, args.policy_seed,
                                              args.policy_latency)


def _run(args, problems, factory, config):
    from mmprm_infer.train.mcts import annotate  # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light

    if args.ray is not None:
        # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light
        from mmprm_infer.integrations.ray_annotate import ray_annotate

        # a vLLM worker holds its GPU; with tensor parallelism vLLM's own Ray workers hold them instead
        worker_gpus = 1 if args.policy_vllm and args.tensor_parallel_size == 1 else 0
        return ray_annotate(problems, factory, args.output_dir, config, text_only=args.text_only,
                            progress=not args.no_progress, address=args.ray, workers=args.workers,
                            worker_gpus=worker_gpus)
    return annotate(problems, factory(), args.output_dir, config, text_only=args.text_only,
                    progress=not args.no_progress, workers=args.workers or 1)


def run(args: argparse.Namespace) -> int:
    from mmprm_infer.train.datasets import save_samples  # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light

    # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light
    from mmprm_infer.train.labels import LabelConfig, label_stats, trees_to_samples
    from mmprm_infer.train.mc_annotation import MCConfig  # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light

    # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light
    from mmprm_infer.train.mcts import MCTSConfig, load_trees

    # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light
    from mmprm_infer.train.synthetic.policy import ErrorRates

    # lazy: only `mmprm annotate` runs it; `mmprm -h` stays light
    from mmprm_infer.train.synthetic.task import annotation_items, make_problems

    if args.output_dir is None:
        raise SystemExit("mmprm annotate: --output-dir is required (the folder for the trees)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config: MCConfig | MCTSConfig
    try:
        if args.method == "mc":
            config = MCConfig(num_solutions=args.num_solutions, num_continuations=args.num_rollouts,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens)
        else:
            config = MCTSConfig(num_rollouts=args.num_rollouts, c_puct=args.c_puct, alpha=args.alpha, beta=args.beta,
                                length_scale=args.length_scale, rollout_budget=args.rollout_budget,
                                max_search_count=args.max_search_count, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens)
        rates = ErrorRates(misread=args.misread_rate, trap_range=tuple(args.trap_range),
                           wrong_line=args.wrong_line_rate, slip=args.slip_rate, drop_term=args.drop_term_rate,
                           dup_term=args.dup_term_rate, skip_op=args.skip_op_rate, dup_op=args.dup_op_rate)
        problems = (load_questions(args.data) if args.data
                    else annotation_items(make_problems(args.num_problems, args.split, args.seed), args.text_only))
    except (ValueError, OSError) as e:
        print(f"mmprm annotate: {e}", file=sys.stderr)
        return 2
    factory = policy_factory(args, rates)
    try:
        stats = _run(args, problems, factory, config)
    except KeyboardInterrupt:
        print(f"mmprm annotate: interrupted; finished questions are kept under {args.output_dir}, "
              "rerun the same command to annotate the rest", file=sys.stderr)
        return 130
    except RayConnectError as e:
        print(f"mmprm annotate: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the output folder cannot be created or written (read-only, full disk)
        print(f"mmprm annotate: cannot write under {args.output_dir}: {e}; finished questions are kept, "
              "fix the folder (or free space) and rerun the same command to resume", file=sys.stderr)
        return 1
    synthetic = not (args.policy_hf or args.policy_url or args.policy_vllm)
    summary = {
        "questions": stats.questions, "skipped": stats.skipped, "annotated": stats.annotated,
        "failed": stats.failed, "rollouts": stats.rollouts, "seconds": round(stats.seconds, 3),
        "rollouts_per_s": round(stats.rollouts_per_s, 1), "output_dir": args.output_dir,
        **({"policy_rates": dataclasses.asdict(rates)} if synthetic else {}),
    }
    trees = load_trees(args.output_dir)
    empty = [t.get("id") for t in trees if t.get("method") == "mc" and not t.get("solutions")]
    if empty:
        print(f"mmprm annotate: warning: the policy wrote no solution with steps for {len(empty)} question(s) "
              f"({', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''}): they give no samples; check "
              "the policy's output (--max-new-tokens, its chat template)", file=sys.stderr)
    status = 1 if stats.failed else 0
    if args.export:
        samples = trees_to_samples(trees, LabelConfig(
            granularity=args.granularity, threshold=args.label_threshold, hard_labels=args.hard_labels))
        save_samples(samples, args.export, args.export_format, soft_labels=args.soft_labels, images_from_cwd=True)
        summary.update(label_stats(samples, args.label_threshold))
        summary["export"] = args.export
        if not samples:
            print(f"mmprm annotate: no labelled samples came out of {len(trees)} annotated question(s); {args.export} "
                  "is empty", file=sys.stderr)
            status = 1
    print(json.dumps(summary))
    print(f"mmprm annotate: trees under {args.output_dir}/trees"
          + (f", {summary.get('samples', 0)} samples in {args.export}" if args.export else ""), file=sys.stderr)
    return status

