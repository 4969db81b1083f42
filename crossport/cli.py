"""Argument types shared by crossport's commands: bad values get argparse's one-line error, exit 2."""

from __future__ import annotations

import argparse

C_INT_MAX = 2**31 - 1  # thread counts and sizes end up in C ints inside every runtime


def integer(low: int, high: int = C_INT_MAX):
    """An argparse ``type``: an integer in [low, high], or an error that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, found {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, found {value}")
        return value

    parse.__name__ = "integer"
    return parse


PORT = integer(0, 65535)  # 0: any free port


def summary_line(doc: str | None) -> str:
    """A module docstring's first line as help text: reST's ``literals`` shown as plain text."""
    return (doc or "").strip().splitlines()[0].replace("``", "") if doc and doc.strip() else ""
