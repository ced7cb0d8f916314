"""What a residual set may be, checked before any layer changes: its rank rule and init (``ResidualConfig``,
``rank_for``), its scale (``finite_scale``), its name (``check_set_name``) and its words (``check_word``).
``residuals`` re-exports them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class ResidualConfig:
    """How residuals are shaped."""

    rank: float | int | dict[str, int] = 0.05  # fraction of channels (float < 1), fixed int, or block -> rank
    # the random factor's init, the only one: kaiming-uniform, as nn.Linear's and peft's lora_A; the other factor
    # starts at zero (the output is unchanged until trained)
    init: str = "kaiming"
    seed: int | None = None  # seeds the random factor (None: torch's global generator)

    def __post_init__(self):
        self.rank = plain_rank(self.rank)
        if self.init != "kaiming":
            raise ValueError(f"ResidualConfig.init: {self.init!r} is not an init prkit has; 'kaiming' (kaiming-uniform "
                             "for the random factor, zeros for the other) is the one")


def plain_rank(rank):
    """A rank given as a numpy or torch number (``np.int64(16)``, ``np.float32(0.05)``) as Python's int or float, so
    that it is checked, recorded in JSON and compared as one (each value of a per-block dict too); anything else as
    it is (``rank_for`` refuses what is no rank)."""
    if isinstance(rank, dict):
        return {block: plain_rank(value) for block, value in rank.items()}
    if not hasattr(rank, "item") or getattr(rank, "ndim", 0) != 0:  # Python's numbers; arrays (refused later)
        return rank
    value = rank.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else rank


def rank_for(channels: int, rank: float | int) -> int:
    """Resolve a rank rule to an integer rank for a layer of ``channels`` channels."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not 0 < rank < math.inf:  # NaN too
        raise ValueError(f"rank must be a positive fraction (e.g. 0.05) or an int, got {rank!r}")
    if isinstance(rank, float) and rank < 1:
        return max(1, int(round(rank * channels)))
    if isinstance(rank, float):  # 1.0 reads as "all the channels" as easily as "rank 1": neither is guessed
        raise ValueError(f"rank {rank!r} is neither a fraction of the channels below 1 (e.g. 0.05) nor a whole rank, "
                         f"which is an int (e.g. 16; {int(rank) if rank == int(rank) else 'none'} here)")
    return min(rank, channels)  # a rank above a layer's channels is its full rank (the file records each)


def finite_scale(value, owner: str, text: bool = False) -> float:
    """``value`` as a residual set's scale; NaN or infinity (NaN images) raises a ValueError naming ``owner``. A bool
    (``scale=True`` read as 1.0, False silently turned the set off) or a string (float() read ``'2'``) raises a
    TypeError; numpy and torch numbers pass. ``text``: ``value`` is a file header's text, read as a number."""
    if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) in (torch.bool, np.bool_):
        raise TypeError(f"{owner}: scale must be a number (1.0: as trained, 0: off), got {value!r}; to switch a set "
                        "on or off use enable() and disable()")
    if isinstance(value, (str, bytes)) and not text:
        raise TypeError(f"{owner}: scale must be a number (1.0: as trained, 0: off), got the text {value!r}; convert "
                        "it first (float(...))")
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{owner}: scale must be a finite number (1.0: as trained, 0: off), got {value!r}")
    return number


def check_word(value, owner: str, key: str) -> None:
    """Refuse a concept word (``key``: token or class_word) that is no text, naming ``owner``: LAG looks for it in
    prompts and a residual file's header records it (safetensors refused anything else at the save, after the
    training)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{owner}: {key} must be a word (a str, e.g. 'sks' or 'dog') or None, got {value!r}")


def usable_set_name(name) -> bool:
    """Whether ``name`` can name a residual set: it keys a module dict on every layer, so a non-empty string without
    dots that is no attribute of one ('items', 'keys', ...)."""
    return isinstance(name, str) and bool(name) and "." not in name and not hasattr(nn.ModuleDict(), name)


def check_set_name(name) -> None:
    """Refuse a name ``usable_set_name`` refuses, naming the argument and a usable form (torch's own KeyError for
    'my.concept' or 'items', part-way through adding a set, said neither)."""
    if not usable_set_name(name):
        raise ValueError(f"residual set name {name!r} cannot be used: give a non-empty string without dots that is "
                         "no method name of a module dict ('items', 'keys', ...), e.g. 'my_concept'")
