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

_BLOCK = 1024

if triton is not None:

    @triton.jit(do_not_specialize=["N", "C"])
    def _forward(P, OUT, N, C, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        row = i // C
        src = i + row * C  # row * 2C + col
        h = tl.load(P + src, mask=m, other=0.0).to(tl.float32)
        gate = tl.load(P + src + C, mask=m, other=0.0).to(tl.float32)
        y = h * gate * 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(OUT + i, y.to(OUT.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["N", "C"])
    def _backward(P, G, DP, N, C, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        row = i // C
        src = i + row * C
        h = tl.load(P + src, mask=m, other=0.0).to(tl.float32)
        gate = tl.load(P + src + C, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + i, mask=m, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        tl.store(DP + src, (g * gate * cdf).to(DP.dtype.element_ty), mask=m)
        tl.store(DP + src + C, (g * h * (cdf + gate * pdf)).to(DP.dtype.element_ty), mask=m)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj):
        proj = proj.contiguous()
        channels = proj.shape[-1] // 2
        out = torch.empty((*proj.shape[:-1], channels), device=proj.device, dtype=proj.dtype)
        n = out.numel()
        _forward[(triton.cdiv(n, _BLOCK),)](proj, out, n, channels, BLOCK=_BLOCK)
        ctx.save_for_backward(proj)
        return out

    @staticmethod
    def backward(ctx, grad):
        (proj,) = ctx.saved_tensors
        grad = grad.contiguous()
        dproj = torch.empty_like(proj)
        n = grad.numel()
        _backward[(triton.cdiv(n, _BLOCK),)](proj, grad, dproj, n, proj.shape[-1] // 2, BLOCK=_BLOCK)
        return dproj


def geglu(proj: torch.Tensor) -> torch.Tensor:
    """``h * F.gelu(gate)`` with ``h, gate = proj.chunk(2, dim=-1)``; one kernel where Triton runs, else torch."""
    if available(proj) and proj.dtype in (torch.float16, torch.bfloat16, torch.float32) and proj.shape[-1] % 2 == 0:
        return _GEGLU.apply(proj)
    h, gate = proj.chunk(2, dim=-1)
    return h * F.gelu(gate)
