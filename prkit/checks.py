"""Field checks the configs share (TrainConfig, FastConfig, EvalConfig): a bad value is named with its owner."""

from __future__ import annotations


def check_whole(config, names: tuple[str, ...], low: int, note: str = "") -> None:
    """Each field ``names`` of ``config`` is a whole number >= ``low`` (bools refused); ``note`` follows the bound
    in the message, e.g. " (0: never)". None passes only where ``note`` says so (" or None")."""
    for name in names:
        value = getattr(config, name)
        if value is None and "None" in note:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{type(config).__name__}.{name} must be a whole number >= {low}{note}, got {value!r}")


def check_flag(value, name: str, note: str = "") -> None:
    """``value`` is True or False (a string such as papermill's 'false', which is truthy, or 1 refused); ``name`` is
    the field with its owner (``"TrainConfig.resume"``). None passes only where ``note`` says so (" or None")."""
    if isinstance(value, bool) or (value is None and "None" in note):
        return
    field = name.rsplit(".", 1)[-1]
    raise ValueError(f"{name} must be True or False{note}, got {value!r}"
                     f"{' (papermill: -p ' + field + ' False)' if isinstance(value, str) else ''}")
