"""argparse types the ``luanette`` commands share (numbers with a lower bound)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def at_least(kind: type, minimum: float, *, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` (int, float) of at least ``minimum`` (above it when
    ``strict``)."""
    noun = "whole number" if kind is int else "number"
    bound = f"greater than {minimum:g}" if strict else f"{minimum:g} or more"

    def check(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {noun}: {text!r}") from None
        if not (value > minimum if strict else value >= minimum):
            raise argparse.ArgumentTypeError(f"must be {bound}: {text!r}")
        return value

    return check


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` greater than 0."""
    return at_least(kind, 0, strict=True)


count = at_least(int, 0)
"""An argparse type: a whole number, 0 or more."""

non_negative = at_least(float, 0)
"""An argparse type: a number of seconds, 0 or more."""
