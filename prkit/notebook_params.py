"""Checks for the notebooks' parameters as papermill hands them over.

Owns the checks a ``parameters`` cell's values need before a notebook uses them (``papermill -p`` gives every value
as a plain string); it computes nothing and reads no files.
"""

from __future__ import annotations


def as_list(value, name: str) -> list:
    """``value`` as a list; a single string is refused, not split into characters or formatted as one item.

    Args:
        value: the parameter's value (a list or tuple).
        name: the parameter's name, for the error message.
    Returns:
        ``list(value)``.
    Raises:
        TypeError: ``value`` is a string (``papermill -p NAME VALUE`` passes one) or not a list or tuple.
    """
    if isinstance(value, (list, tuple)):
        return list(value)
    example = f'''-y '{name}: ["first", "second"]\''''
    what = "the single string" if isinstance(value, (str, bytes)) else f"the {type(value).__name__}"
    raise TypeError(f"parameter {name} must be a list, not {what} {value!r} (papermill's -p passes a string): give "
                    f"a list with {example} (papermill) or -p {name} '[\"first\", \"second\"]' "
                    "(python -m prkit.report)")
