"""Triton kernels of the fast training path: NHWC GroupNorm (+ SiLU) and GEGLU, each with its backward.

Each module runs its kernels where ``available`` says so and falls back to torch's ops elsewhere, with the same
numbers up to rounding. ``TRITON_INTERPRET=1`` runs the kernels on the CPU (the tests do).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels only
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether Triton kernels can run on ``x``: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
