"""``mmprm convert-internvl SRC DST``: a published InternVL PRM (MM-PRM, VisualPRM) to the transformers-native
layout, loadable with no remote code (``mmprm_infer.models.convert_internvl``)."""

from __future__ import annotations

import argparse
import sys

from mmprm_infer.cli.arguments import FORMAT_NAMES

HELP = ("convert a published InternVL checkpoint (MM-PRM, VisualPRM: InternVLChatModel) to the transformers-native "
        "layout, loadable without remote code")
DESCRIPTION = HELP


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="folder of the published checkpoint (config.json with InternVLChatModel)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: keep the stored dtype)")
    p.add_argument("--format", choices=FORMAT_NAMES, help="PRM format to record (default: detected)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="load the checkpoint's own tokenizer code to convert it / check the converted one")
    p.add_argument("--tokenizer-json", default=None, help="take the vocabulary from this tokenizer.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def run(args: argparse.Namespace) -> int:
    # lazy: it imports torch, PIL, numpy
    from mmprm_infer.models.convert_internvl import ConversionError, convert_internvl

    try:
        convert_internvl(args.src, args.dst, dtype=args.dtype, format=args.format,
                         trust_remote_code=args.trust_remote_code, tokenizer_json=args.tokenizer_json,
                         overwrite=args.overwrite)
    except ConversionError as exc:
        raise SystemExit(f"mmprm convert-internvl: {exc}") from None
    print(f"mmprm convert-internvl: wrote the converted checkpoint to {args.dst}; load it with "
          f"PRM.from_pretrained({args.dst!r})", file=sys.stderr)
    return 0
