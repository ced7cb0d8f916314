"""The command line's argument types: numbers checked by the parser, before any model loads (minutes on SD)."""

from __future__ import annotations

import argparse
import math
import os
import sys


def _whole(minimum: int):
    """An argparse type: a whole number of at least ``minimum`` (the message names the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


_positive_int = _whole(1)


def _finite(text: str) -> float:
    """A finite number (--lora-scale)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.8, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _learning_rate(text: str) -> float:
    """--lr: a finite number > 0, checked before the model loads (minutes on SD)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 such as 1e-3, got {text!r}")
    return value


def _guidance(text: str) -> float:
    """--guidance-scale: a finite number >= 0 (inf paints black images; nan silently turns guidance off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 7.5, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (7.5 is usual; 1 or less: no guidance), "
                                         f"got {text!r}")
    return value


def _rank(text: str) -> float | int:
    """--rank: a fraction of each block's channels (0 < r < 1, e.g. 0.05) or a whole rank (e.g. 16)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if 0 < value < 1:
        return value
    if 1 <= value < 2 ** 31 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) such as 0.05 or a whole rank >= 1 such as 16, "
                                     f"got {text!r}")


def bars_wanted() -> bool:
    """Progress bars only on a terminal (a log file of `prkit train ... 2>&1 > log` got every redraw) and never
    under TQDM_DISABLE=1, which tqdm itself honours only where a bar is not switched on explicitly."""
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")
