"""Triton kernels of the fast training path: NHWC GroupNorm (+ SiLU) and GEGLU, each with its backward.

Each module runs its kernels where ``available`` says so and falls back to torch's ops elsewhere, with the same
numbers up to rounding. ``TRITON_INTERPRET=1`` runs the kernels on the CPU (the tests do).
"""

from __future__ import annotations

import importlib
import os
import threading

import torch

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels only
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether Triton kernels can run on ``x``: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def prepare() -> threading.Thread | None:
    """Start paying Triton's once-per-process cost in a background thread; returns it (None without Triton).

    A process's first kernel launch hashes Triton's own sources and its ~400 MB library into the cache key
    (~0.4 s on an H100 host) and imports Triton's Gluon front end (~0.2 s); the hash releases the GIL, so the
    fast loop starts this before it encodes the prompt and the caller's first launch finds the key computed.
    Nothing here changes what is compiled or launched: failures are ignored (the launch does the work then).
    """
    if triton is None:
        return None

    def work():
        try:
            from triton.runtime.cache import triton_key

            triton_key()  # functools.lru_cache: the launch reuses it
            importlib.import_module("triton.experimental.gluon")
        except Exception:  # noqa: BLE001 - an internal moved: the first launch pays as before
            pass

    thread = threading.Thread(target=work, name="prkit-triton-prepare", daemon=True)
    thread.start()
    return thread
