"""argparse value types shared by every command (`mmprm score`, `serve`, `eval`): a bad value is a
usage error naming the flag (`mmprm serve: error: argument --n: must be >= 1, got 0`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["DTYPES", "FORMAT_NAMES", "arg_type", "at_least", "positive_int", "non_negative_int", "HelpFormatter",
           "Parser", "alias", "add_progress", "add_device", "add_dtype", "resolve_device", "announce_device"]

DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")

# the registered PRM formats (mmprm_infer.formats.FORMATS), named here so that building the parser imports no
# torch: `mmprm --help` answers at once.  tests/test_cli_vocabulary.py checks the two agree.
FORMAT_NAMES = ("custom", "math-shepherd", "mm-prm", "qwen2.5-math-prm", "rlhflow", "skywork",
                "token-classification", "visualprm", "vl-prm")


def arg_type(check: Callable[[str], object], name: str):
    """Wrap a ValueError-raising check as an argparse type whose error message is the check's."""
    def parse(value: str):
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = name
    return parse


def at_least(low: float, kind: type = int):
    """An argparse type: a ``kind`` number >= ``low``."""
    def check(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"expected {'a whole number' if kind is int else 'a number'}, got {value!r}") from None
        if number < low:
            raise ValueError(f"must be >= {low:g}, got {value}")
        return number
    return arg_type(check, kind.__name__)


positive_int = at_least(1)
non_negative_int = at_least(0)


# --------------------------------------------------------------------------
# one vocabulary for every command
# --------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (argparse's ArgumentDefaultsHelpFormatter, less the noise:
    not for flags, None, or help that already states its default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default is argparse.SUPPRESS or default == []
                or not action.option_strings or isinstance(action, argparse._StoreConstAction)):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """The parser of every command and subcommand (``add_subparsers`` makes its children of the same class):
    defaults shown by ``HelpFormatter``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        for action in self._actions:  # argparse shows no help line, so no default, for an option without help
            if (action.help is None and action.option_strings and action.nargs != 0
                    and action.default is not None and action.default is not argparse.SUPPRESS):
                action.help = "default: %(default)s"
        return super().format_help()


def alias(parser, *names: str, dest: str, **kwargs) -> None:
    """Old spellings of an option, accepted and kept out of ``--help`` (``argparse.SUPPRESS``)."""
    parser.add_argument(*names, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def add_progress(parser) -> None:
    """``--no-progress`` (old spelling: ``--quiet``)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    alias(parser, "--quiet", dest="no_progress", action="store_true")


DEVICE_HELP = "cpu, cuda or cuda:N; auto: cuda when torch sees a GPU, else cpu"


def add_device(parser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help=DEVICE_HELP)


def add_dtype(parser, default: str | None = None, help: str = "weights' dtype; default: float32 on CPU, "
              "bfloat16 on CUDA; auto: the checkpoint's") -> None:
    parser.add_argument("--dtype", default=default, choices=(*DTYPES, "auto"), help=help)
    alias(parser, "--torch-dtype", dest="dtype", choices=(*DTYPES, "auto"))


def resolve_device(device: str | None) -> str:
    """``auto`` (or None) as cuda where torch sees a GPU, else cpu; anything else as given."""
    if device in (None, "auto"):
        import torch  # torch: heavy, loaded where used

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def announce_device(prog: str, device: str, dtype: str | None = None) -> None:
    """One line on stderr saying where the model runs (a GPU user must not run on the CPU unknowingly)."""

    what = device
    if device.startswith("cuda"):
        import torch  # torch: heavy, loaded where used

        index = torch.device(device).index or 0
        what = f"{device} ({torch.cuda.get_device_name(index)})"
    print(f"{prog}: device {what}" + (f", dtype {dtype}" if dtype else ""), file=sys.stderr)
