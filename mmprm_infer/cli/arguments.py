"""argparse value types shared by every command (`mmprm score`, `serve`, `eval`): a bad value is a
usage error naming the flag (`mmprm serve: error: argument --n: must be >= 1, got 0`)."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["DTYPES", "arg_type", "at_least", "positive_int", "non_negative_int"]

DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


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
