"""The ``mmprm`` command line: one module per command in this package.

Each command module holds ``HELP`` (its line in ``mmprm -h``), ``DESCRIPTION``, ``configure(parser)`` (its
flags) and ``run(args)`` (exit status); heavy imports (torch, transformers, fastapi, ray) wait inside ``run``.
The modules beside them: ``arguments`` (argparse value types every command shares).  Reading inputs, writing
outputs atomically and progress bars live in ``mmprm_infer.io``: the library's lower layers use them too.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from mmprm_infer.cli import annotate, convert, demo, evaluate, pipeline, score, serve, train

__all__ = ["build_parser", "main"]

# command name -> its module, in the order `mmprm -h` lists them
_COMMANDS = {"score": score, "rerank": score, "eval": evaluate, "train": train, "annotate": annotate,
             "pipeline": pipeline, "demo": demo, "serve": serve, "convert-internvl": convert}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprm", description="Process-reward-model scoring and reranking")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _COMMANDS.items():
        if module is score:
            p = sub.add_parser(name, help=score.HELP[name], description=score.HELP[name])
            score.configure(p, name)
        else:
            p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
            module.configure(p)
        p.set_defaults(run=module.run)
    return parser


@contextlib.contextmanager
def _termination_as_interrupt():
    """SIGTERM and SIGHUP (``timeout``, a closed terminal) end a command as Ctrl-C does: the same cleanup
    (no temp file left, nothing half-written, "interrupted" said), where the default would kill the process
    on the spot.  Which signal came is in the yielded dict."""
    got: dict = {}
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def interrupt(signum, frame):
        got["signal"] = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield got
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    with _termination_as_interrupt() as got:
        try:
            status = args.run(args)
        except KeyboardInterrupt:  # a command that has no cleanup message of its own
            print(f"mmprm {args.command}: interrupted", file=sys.stderr)
            status = 130
    return 128 + got["signal"] if "signal" in got and status == 130 else status
