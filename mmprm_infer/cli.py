"""The `mmprm` command line: score and rerank JSONL files, run the demo.

Input records: {"question": str, "candidates": [str | [str, ...]], "image":
optional path or list of paths relative to the JSONL file, "id": optional}.
Output: one JSONL record per input line, in input order.  A bad line is an
error naming its line number; with --on-error skip it becomes an
{"line": N, "error": ...} record instead, so nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator, TextIO

from tqdm.auto import tqdm

from .aggregation import AGGREGATIONS, ALIASES
from .formats import FORMATS
from .prm import PRM, ScoringItem


class RecordError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


def parse_record(raw: str, line: int, base_dir: Path) -> tuple[dict, ScoringItem]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RecordError(line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise RecordError(line, "each line must be a JSON object with 'question' and 'candidates'")
    missing = [k for k in ("question", "candidates") if k not in record]
    if missing:
        raise RecordError(line, f"missing field(s) {missing}; each record needs 'question' and 'candidates'")
    if not isinstance(record["candidates"], list) or not record["candidates"]:
        raise RecordError(line, "'candidates' must be a non-empty list of solutions")
    image = record.get("image", record.get("images"))
    if image is not None:
        paths = image if isinstance(image, list) else [image]
        resolved = [p if Path(p).is_absolute() else str(base_dir / p) for p in paths]
        for p in resolved:
            if not Path(p).is_file():
                raise RecordError(line, f"image file {p} does not exist (paths are relative to the JSONL file)")
        image = resolved if isinstance(image, list) else resolved[0]
    return record, ScoringItem(record["question"], record["candidates"], image)


def iter_lines(handle: TextIO) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(handle, 1):
        if raw.strip():
            yield number, raw


def _result_record(record: dict, line: int, step_rewards, rerank_result, args) -> dict:
    out = {"line": line}
    if "id" in record:
        out["id"] = record["id"]
    if rerank_result is None:
        from .aggregation import aggregate

        out["step_rewards"] = step_rewards
        out["scores"] = [aggregate(r, args.aggregate) for r in step_rewards]
        out["aggregate"] = args.aggregate
    else:
        out.update(rerank_result.to_dict())
    return out


def _process(batch, prm: PRM, args) -> list[dict | RecordError]:
    """Score a batch of parsed records; if it fails, retry one by one so only the bad record fails."""
    from .rerank import rerank_batch

    items = [item for _, _, item in batch]
    try:
        if args.command == "rerank":
            results = rerank_batch(items, prm, args.aggregate, args.strategy, args.engine)
            return [_result_record(rec, ln, None, res, args) for (ln, rec, _), res in zip(batch, results)]
        rewards = prm.score_batch(items, engine=args.engine)
        return [_result_record(rec, ln, r, None, args) for (ln, rec, _), r in zip(batch, rewards)]
    except Exception as exc:
        if len(batch) == 1:
            return [RecordError(batch[0][0], f"{type(exc).__name__}: {exc}")]
        return [out for entry in batch for out in _process([entry], prm, args)]


def run_jsonl(args) -> int:
    options = {"max_tiles": args.max_tiles} if args.max_tiles is not None else {}
    prm = PRM.from_pretrained(args.prm, format=args.format, device=args.device, dtype=args.dtype,
                              engine=args.engine, **options) if args.prm else None
    in_path = Path(args.input)
    if not in_path.is_file():
        raise SystemExit(f"mmprm: input file {in_path} does not exist")
    total = sum(1 for raw in in_path.open(encoding="utf-8") if raw.strip())
    errors = 0
    with in_path.open(encoding="utf-8") as src, open(args.output, "w", encoding="utf-8") as dst, \
            tqdm(total=total, desc=f"mmprm {args.command}", unit="q", disable=args.quiet) as bar:

        def emit(records):
            for rec in records:
                dst.write(json.dumps(rec, ensure_ascii=False) + "\n")
            bar.update(len(records))

        def handle_error(exc: RecordError):
            nonlocal errors
            if args.on_error == "fail":
                raise SystemExit(f"mmprm: {exc} (use --on-error skip to write an error record and go on)")
            errors += 1
            tqdm.write(f"mmprm: skipped {exc}", file=sys.stderr)
            emit([{"line": exc.line, "error": str(exc)}])

        batch: list = []

        def flush():
            # Records are written in input order; a failing one becomes its error record.
            for out in _process(batch, prm, args) if batch else []:
                if isinstance(out, RecordError):
                    handle_error(out)
                else:
                    emit([out])
            batch.clear()

        for line, raw in iter_lines(src):
            try:
                record, item = parse_record(raw, line, in_path.parent)
            except RecordError as exc:
                flush()
                handle_error(exc)
                continue
            batch.append((line, record, item))
            if len(batch) >= args.batch_questions:
                flush()
        flush()
    if errors:
        print(f"mmprm: {errors} record(s) failed; see the 'error' records in {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprm", description="Process-reward-model scoring and reranking")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("score", "step rewards for every candidate"), ("rerank", "pick the best candidate")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--prm", required=name == "score", help="PRM checkpoint directory")
        p.add_argument("--input", "-i", required=True, help="input JSONL")
        p.add_argument("--output", "-o", required=True, help="output JSONL (one record per input line)")
        p.add_argument("--format", choices=sorted(FORMATS), help="PRM format (default: read from the checkpoint)")
        p.add_argument("--engine", default=None, help="scoring engine (default: fast; 'reference' for the oracle)")
        p.add_argument("--aggregate", default="min", choices=sorted([*AGGREGATIONS, *ALIASES]))
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU)")
        p.add_argument("--batch-questions", type=int, default=8, help="questions scored per engine call")
        p.add_argument("--max-tiles", type=int, default=None,
                       help="InternVL formats: dynamic-tiling budget per image (default: the format's)")
        p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                       help="a bad record stops the run (fail) or becomes an error record (skip)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "rerank":
            p.add_argument("--strategy", default="best_of_n", choices=("best_of_n", "weighted_vote", "majority_vote"))
    conv = sub.add_parser("convert-internvl", help="convert a published InternVL checkpoint (MM-PRM, VisualPRM: "
                          "InternVLChatModel) to the transformers-native layout, loadable without remote code")
    conv.add_argument("src", help="folder of the published checkpoint (config.json with InternVLChatModel)")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: keep the stored dtype)")
    conv.add_argument("--format", choices=sorted(FORMATS), help="PRM format to record (default: detected)")
    conv.add_argument("--trust-remote-code", action="store_true",
                      help="load the checkpoint's own tokenizer code to convert it / check the converted one")
    conv.add_argument("--tokenizer-json", default=None, help="take the vocabulary from this tokenizer.json")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    serve = sub.add_parser("serve", help="OpenAI-compatible reranking server in front of a policy server "
                           "(needs the 'serve' extra: fastapi, uvicorn, httpx)")
    serve.add_argument("--policy-url", required=True, help="the policy's OpenAI API root, e.g. http://127.0.0.1:8000/v1")
    serve.add_argument("--policy-model", default=None, help="model name to ask the policy for (default: its first)")
    serve.add_argument("--api-key", default=None, help="Bearer token for the policy (or $MMPRM_POLICY_API_KEY)")
    serve.add_argument("--prm", required=True, help="PRM checkpoint directory")
    serve.add_argument("--format", choices=sorted(FORMATS), help="PRM format (default: read from the checkpoint)")
    serve.add_argument("--engine", default=None, help="scoring engine (default: fast)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU)")
    serve.add_argument("--max-tiles", type=int, default=None, help="InternVL formats: tiles per image")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--n", type=int, default=8, help="samples drawn from the policy per request")
    serve.add_argument("--aggregate", default="min", choices=sorted([*AGGREGATIONS, *ALIASES]))
    serve.add_argument("--strategy", default="best_of_n", choices=("best_of_n", "weighted_vote", "majority_vote"))
    serve.add_argument("--max-queue", type=int, default=256, help="requests admitted at once; more get HTTP 503")
    serve.add_argument("--batch-window-ms", type=float, default=10.0,
                       help="how long the scorer waits to batch concurrent requests into one PRM pass")
    serve.add_argument("--upstream-timeout", type=float, default=60.0, help="seconds per policy request attempt")
    serve.add_argument("--retries", type=int, default=2, help="retries toward the policy (errors, 429, 5xx, timeouts)")
    serve.add_argument("--image-root", default=None, help="only read local image paths under this folder")
    serve.add_argument("--ignore-images", action="store_true", help="text-only PRM: score image requests on text")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads for the PRM (default: torch's; leave cores to a policy on the same box)")
    serve.add_argument("--log-level", default="info")
    demo = sub.add_parser("demo", help="the built-in default job: the demo-preset pipeline (MCTS annotation -> train a "
                          "tiny multimodal PRM -> Best-of-N evaluation), then a reranking example")
    demo.add_argument("--workdir", default="runs/demo")
    # annotate / pipeline take their own options (see `mmprm annotate -h`, `mmprm pipeline -h`)
    sub.add_parser("annotate", help="MCTS (OmegaPRM) step annotation of synthetic multimodal problems", add_help=False)
    sub.add_parser("pipeline", help="annotate -> label -> train a small PRM -> evaluate (--preset demo | full)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "annotate":
        from .train.annotate import annotate_main

        return annotate_main(argv[1:])
    if argv and argv[0] == "pipeline":
        from .train.pipeline import pipeline_main

        return pipeline_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in ("score", "rerank"):
        if args.command == "rerank" and args.prm is None and args.strategy != "majority_vote":
            raise SystemExit("mmprm rerank: --prm is required unless --strategy majority_vote")
        return run_jsonl(args)
    if args.command == "convert-internvl":
        from .models.convert_internvl import ConversionError, convert_internvl

        try:
            convert_internvl(args.src, args.dst, dtype=args.dtype, format=args.format,
                             trust_remote_code=args.trust_remote_code, tokenizer_json=args.tokenizer_json,
                             overwrite=args.overwrite)
        except ConversionError as exc:
            raise SystemExit(f"mmprm convert-internvl: {exc}") from None
        return 0
    if args.command == "serve":
        from .integrations.server import serve_main

        return serve_main(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.workdir)
    return 2


if __name__ == "__main__":
    sys.exit(main())
