"""The files the notebooks hand each other through ``run_dir``, and which notebook writes each.

Owns the check that a file an earlier notebook writes is there, with an error that names that notebook; it reads
and writes nothing itself.
"""

from __future__ import annotations

from pathlib import Path

# file or folder under run_dir -> the notebook that writes it
WRITTEN_BY = {
    "concept": "01_prepare_data",
    "residuals.safetensors": "02_train_residuals",
    "train_stats.json": "02_train_residuals",
}


def run_file(run_dir, name: str) -> Path:
    """``run_dir/name``, a file (or folder) an earlier notebook of the series wrote.

    Args:
        run_dir: the notebooks' run folder.
        name: a key of ``WRITTEN_BY`` (e.g. ``"residuals.safetensors"``).
    Returns:
        the path, which exists.
    Raises:
        FileNotFoundError: it is not there; the message names the notebook to run first in this ``run_dir``.
    """
    if name not in WRITTEN_BY:
        raise ValueError(f"{name!r} is no file the notebooks hand each other; these are: {', '.join(WRITTEN_BY)}")
    path = Path(run_dir) / name
    if not path.exists():
        writer = WRITTEN_BY[name]
        raise FileNotFoundError(f"{str(path)!r} does not exist: run {writer} first with run_dir={str(run_dir)!r} "
                                f"(it writes {name}), or set run_dir to a folder where it ran")
    return path
