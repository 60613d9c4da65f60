"""The ``mmprm`` command line: one module per command in this package.

Each command module holds ``HELP`` (its line in ``mmprm -h``), ``DESCRIPTION``, ``configure(parser)`` (its
flags) and ``run(args)`` (exit status); heavy imports (torch, transformers, fastapi, ray) wait inside ``run``,
so ``mmprm --help`` answers without loading them.  The modules beside them: ``arguments`` (argparse value
types, the help formatter and the options every command shares: ``--device``, ``--dtype``, ``--no-progress``,
hidden aliases for old spellings).  Reading inputs, writing outputs atomically and progress bars live in
``mmprm_infer.io``: the library's lower layers use them too.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from mmprm_infer import __version__
from mmprm_infer.cli import annotate, convert, demo, evaluate, pipeline, score, serve, train
from mmprm_infer.cli.arguments import Parser
from mmprm_infer.io.progress import quiet_transformers_progress

__all__ = ["build_parser", "main"]

# command name -> its module, in the order `mmprm -h` lists them
_COMMANDS = {"score": score, "rerank": score, "eval": evaluate, "train": train, "annotate": annotate,
             "pipeline": pipeline, "demo": demo, "serve": serve, "convert-internvl": convert}


def build_parser(command: str | None = None, *, only: bool = False) -> Parser:
    """The whole parser tree; with ``only``, just ``command``'s flags are set up (none when it is None):
    ``main`` asks for the one it runs, so ``mmprm --help`` and ``mmprm score ...`` never import another
    command's defaults."""

    parser = Parser(prog="mmprm", description="Process-reward-model scoring and reranking")
    parser.add_argument("--version", action="version", version=f"mmprm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _COMMANDS.items():
        configure = command == name if only else True
        if module is score:
            p = sub.add_parser(name, help=score.HELP[name], description=score.HELP[name])
            if configure:
                score.configure(p, name)
        else:
            p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
            if configure:
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
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in _COMMANDS else None, only=True).parse_args(argv)

    quiet_transformers_progress()  # every command: the library's own bars and stage lines say what happens
    with _termination_as_interrupt() as got:
        try:
            status = args.run(args)
        except KeyboardInterrupt:  # a command that has no cleanup message of its own
            print(f"mmprm {args.command}: interrupted", file=sys.stderr)
            status = 130
    return 128 + got["signal"] if "signal" in got and status == 130 else status
