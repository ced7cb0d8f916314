"""Reading a ``.safetensors`` file: its header alone, or its header and tensors from one open of it, with clear errors
for a folder given as the file, a missing file, one cut short and one that is no .safetensors file. Knows no prkit
format (``files`` does)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open


def safetensors_header(path, what: str) -> dict:
    """The metadata of the .safetensors file ``path`` (``what`` names it in the errors: a folder given instead of the
    file, a missing file, one safetensors cannot read); ``~`` is expanded."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder; give the .safetensors file inside it{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types
        raise _unreadable(path, what, err) from err


def _unreadable(path: Path, what: str, err: Exception) -> ValueError:
    """The error for a .safetensors file that safetensors refused with ``err``: cut short (saying the bytes its header
    needs), or no readable .safetensors file."""
    with open(path, "rb") as f:
        need = _cut_short(f, size := os.fstat(f.fileno()).st_size)
    if need is not None:
        return ValueError(f"{what} {str(path)!r} is incomplete: it holds {size:,} bytes where its header needs "
                          f"{need:,} (an interrupted copy, download or save leaves such a file); copy, download or "
                          "write it again")
    return ValueError(f"{what} {str(path)!r} is not a readable .safetensors file ({err}); give the .safetensors file "
                      "itself, or write it again")


def _cut_short(f, size: int) -> int | None:
    """The bytes a .safetensors file (``f``, open for reading at its start, of ``size`` bytes) needs by its own
    header (at least) where it holds fewer: it was cut short. None where it holds them, or is no safetensors file at
    all (its first 8 bytes give no plausible header)."""
    head = f.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 0 < length <= 100_000_000:  # safetensors' own limit on the header
        return None
    header = f.read(length)
    if len(header) < length:
        return 8 + length
    try:
        entries = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return 8 + length + end if size < 8 + length + end else None


def read_whole(path: Path, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and the tensors of the .safetensors file ``path``, from one open of it: both are of one version
    of it, also where a save renames another file over it meanwhile (the open file stays the version opened; two
    opens could read one version's header with the next one's tensors). Each tensor is copied from the file's
    mapping: its bytes read whole first were in memory beside the tensors made from them (three times the file's
    size at the peak). Check its header first where it may be large (``safetensors_header``)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError as err:  # removed since its header was read
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from err
    except Exception as err:  # safetensors raises its own error types
        raise _unreadable(path, what, err) from err
