"""GEGLU (``h * gelu(gate)`` of the two halves of a projection, exact GELU) as one Triton kernel each way.

diffusers' GEGLU chunks the projection, applies GELU to one half and multiplies: three passes forward, and
backward keeps both halves and GELU's output and writes two gradients that are then concatenated. Here forward
reads the projection once and writes the product; backward recomputes GELU and writes the projection's gradient
in place of the concatenation. Only the projection is kept for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import available, triton

if triton is not None:
    import triton.language as tl

_ROWS, _COLS = 8, 256  # a program's tile: rows of the projection x columns of one half

if triton is not None:
    # C is left to Triton's specialization (multiple of 16: vector loads); the row count varies with every shape

    @triton.jit
    def _tile(R, C, ROWS: tl.constexpr, COLS: tl.constexpr):
        """Mask, offset into the projection (the h half) and offset into the output of this program's tile."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.program_id(1) * COLS + tl.arange(0, COLS)
        m = (r < R)[:, None] & (c < C)[None, :]
        row = r.to(tl.int64)[:, None]
        return m, row * (2 * C) + c[None, :], row * C + c[None, :]

    @triton.jit(do_not_specialize=["R"])
    def _forward(P, OUT, R, C, ROWS: tl.constexpr, COLS: tl.constexpr):
        m, src, dst = _tile(R, C, ROWS, COLS)
        h = tl.load(P + src, mask=m, other=0.0).to(tl.float32)
        gate = tl.load(P + src + C, mask=m, other=0.0).to(tl.float32)
        y = h * gate * 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(OUT + dst, y.to(OUT.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["R"])
    def _backward(P, G, DP, R, C, ROWS: tl.constexpr, COLS: tl.constexpr):
        m, src, dst = _tile(R, C, ROWS, COLS)
        h = tl.load(P + src, mask=m, other=0.0).to(tl.float32)
        gate = tl.load(P + src + C, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + dst, mask=m, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        tl.store(DP + src, (g * gate * cdf).to(DP.dtype.element_ty), mask=m)
        tl.store(DP + src + C, (g * h * (cdf + gate * pdf)).to(DP.dtype.element_ty), mask=m)


def _grid(rows: int, channels: int) -> tuple[int, int]:
    return triton.cdiv(rows, _ROWS), triton.cdiv(channels, _COLS)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj):
        proj = proj.contiguous()
        channels = proj.shape[-1] // 2
        out = torch.empty((*proj.shape[:-1], channels), device=proj.device, dtype=proj.dtype)
        rows = out.numel() // channels if channels else 0
        if rows:
            _forward[_grid(rows, channels)](proj, out, rows, channels, ROWS=_ROWS, COLS=_COLS)
        ctx.save_for_backward(proj)
        return out

    @staticmethod
    def backward(ctx, grad):
        (proj,) = ctx.saved_tensors
        grad = grad.contiguous()
        dproj = torch.empty_like(proj)
        channels = proj.shape[-1] // 2
        rows = grad.numel() // channels if channels else 0
        if rows:
            _backward[_grid(rows, channels)](proj, grad, dproj, rows, channels, ROWS=_ROWS, COLS=_COLS)
        return dproj


def geglu(proj: torch.Tensor) -> torch.Tensor:
    """``h * F.gelu(gate)`` with ``h, gate = proj.chunk(2, dim=-1)``; one kernel where Triton runs, else torch."""
    if available(proj) and proj.dtype in (torch.float16, torch.bfloat16, torch.float32) and proj.shape[-1] % 2 == 0:
        return _GEGLU.apply(proj)
    h, gate = proj.chunk(2, dim=-1)
    return h * F.gelu(gate)
