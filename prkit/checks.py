"""Field checks the configs share (TrainConfig, FastConfig, EvalConfig): a bad value is named with its owner; and
the check that a folder can be written before any work goes into what will be written there."""

from __future__ import annotations

import os
from pathlib import Path


def check_whole(config, names: tuple[str, ...], low: int, note: str = "") -> None:
    """Each field ``names`` of ``config`` is a whole number >= ``low`` (bools refused); ``note`` follows the bound
    in the message, e.g. " (0: never)". None passes only where ``note`` says so (" or None")."""
    for name in names:
        value = getattr(config, name)
        if value is None and "None" in note:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{type(config).__name__}.{name} must be a whole number >= {low}{note}, got {value!r}")


def nearest_existing(path: Path) -> Path:
    """``path`` itself where it exists, else its nearest existing parent (what a new file there would be made in)."""
    while not (path.exists() or path.is_symlink()) and path != path.parent:  # a dangling link: mkdir fails there
        path = path.parent
    return path


def not_a_folder(path: Path) -> str:
    """Why ``path`` (``nearest_existing``'s answer, no folder) cannot hold the file or folder to write, in words."""
    if path.is_symlink() and not path.exists():  # mkdir said "File exists", naming no link
        return f"{str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not exist (a disk not mounted?)"
    return f"{str(path)!r} is a file, not a folder"


def writable_folder(folder: str | os.PathLike, what: str, listed: bool = False) -> None:
    """Fail before any work when ``folder`` (``~`` expanded) cannot be created or written (a file in the way, no
    permission), or, with ``listed``, read (its files are numbered after the ones there); ``what`` names it."""
    folder = Path(folder).expanduser()
    probe = nearest_existing(folder)
    if not probe.is_dir():
        raise ValueError(f"{what}: {not_a_folder(probe)}; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in {str(probe)!r} (permission denied); choose another path")
    if listed and probe == folder and not os.access(probe, os.R_OK):
        raise ValueError(f"{what}: cannot list {str(probe)!r} (no read permission) to number new files after the "
                         "ones there; choose another path")


def check_flag(value, name: str, note: str = "") -> None:
    """``value`` is True or False (a string such as papermill's 'false', which is truthy, or 1 refused); ``name`` is
    the field with its owner (``"TrainConfig.resume"``). None passes only where ``note`` says so (" or None")."""
    if isinstance(value, bool) or (value is None and "None" in note):
        return
    field = name.rsplit(".", 1)[-1]
    raise ValueError(f"{name} must be True or False{note}, got {value!r}"
                     f"{' (papermill: -p ' + field + ' False)' if isinstance(value, str) else ''}")
