"""The command line's argument types and checks: numbers checked by the parser, paths and per-file lists checked
before any model loads (minutes on SD)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

from .checks import writable_folder as _writable_folder  # noqa: F401 - cli and world.bench import it from here


def _whole(minimum: int, maximum: int | None = None, multiple: int = 1):
    """An argparse type: a whole number of at least ``minimum``, at most ``maximum``, a multiple of ``multiple``
    (the message names the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        if value % multiple:
            near = max(multiple, round(value / multiple) * multiple)
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple} (the pipelines' rule), got {value}; "
                                             f"e.g. {near}")
        return value
    return parse


_positive_int = _whole(1)
_seed = _whole(0, 2 ** 64 - 1)  # what torch's generators take (a larger one failed after the model had loaded)
_side = _whole(8, 16384, 8)  # an image side: diffusers' pipelines want multiples of 8 (said before the model loads)
_crop_side = _whole(1, 16384)  # train --resolution: its crops are made before the model loads (a typo's 51200 px
# ones met the OOM killer without a word); the multiple the model's VAE wants is checked once it has loaded


MAX_IMAGES = 10000  # per call: prkit sample makes all of a call's images (every prompt's) in one batch


def _image_count(text: str) -> int:
    """--num-images: 1 to MAX_IMAGES images per prompt (10**9 passed, loaded the model and then asked the pipeline
    for one batch of a billion images)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of images per prompt such as 4, got {text!r}") \
            from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 image per prompt, got {value}; e.g. 4")
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_IMAGES} images per prompt (one batch), got {value}; "
                                         "for more, run the command again with another --seed (its images are "
                                         "numbered after those already in --out)")
    return value


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


def _check_output_file(path: Path, overwrite: bool) -> None:
    """--out of train/export: a new *.safetensors file ("newdir/" arrives as "newdir": refused for its suffix)."""
    if path.suffix.lower() != ".safetensors" and not path.is_dir():
        raise ValueError(f"--out {str(path)!r}: the file is written as safetensors; name it *.safetensors, e.g. "
                         f"{str(path.with_suffix('.safetensors'))!r}")
    if path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a folder; give a file name, e.g. {str(path / 'concept.safetensors')!r}")
    if path.exists() and not overwrite:
        raise ValueError(f"--out {str(path)!r} exists; pass --overwrite to replace it, or choose another name")
    _writable_folder(path.parent, "--out")


def _per_file(values: list[float], files: list[str], flag: str, files_flag: str) -> list[float]:
    """One value per file: none given is 1.0 each, one is used for all, else exactly one per file."""
    if not values:
        return [1.0] * len(files)
    if not files:
        raise ValueError(f"{flag} without {files_flag}: there is nothing to weigh")
    if len(values) == 1:
        return values * len(files)
    if len(values) != len(files):
        raise ValueError(f"{flag} has {len(values)} values for {len(files)} {files_flag} files; give one, or one "
                         "per file in the same order")
    return values


def _check_loras(paths: list[str], scales: list[float]) -> list[float]:
    """``prkit sample --lora``'s files, checked before the model loads; returns one scale per file."""
    if scales and len(scales) != len(paths):
        raise ValueError(f"--lora-scale gives {len(scales)} value(s) for {len(paths)} --lora file(s); give one per "
                         "file, in the same order")
    if paths and importlib.util.find_spec("peft") is None:
        raise ValueError("--lora needs peft (diffusers loads LoRAs through it): pip install 'prkit[peft]'")
    from .files import FORMAT, safetensors_header

    for path in paths:  # (already expanded: ~ and relative paths, by _sample)
        if safetensors_header(path, "--lora").get("format") == FORMAT:
            raise ValueError(f"--lora {path!r} is a prkit residual file; pass it with --residuals (LAG then keeps it "
                             "to its concept)")
    return list(scales) if scales else [1.0] * len(paths)
