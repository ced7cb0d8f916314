"""GroupNorm (optionally followed by SiLU) on channels-last activations, as Triton kernels.

PyTorch's CUDA GroupNorm (up to 2.11 at least) converts an NHWC input to NCHW and back, so a channels-last UNet
pays two transposes per norm on top of the ones it saves in the convolutions. These kernels read and write NHWC
directly and fuse the SiLU that follows most norms of a UNet. Backward computes the input's gradient only: the
fast loop freezes the norms' weights (a norm whose weight or bias needs a gradient keeps torch's own path).

Layout: a (B, C, H, W) tensor in ``torch.channels_last`` is (B, H*W, C) in memory; group g of sample b is the
(H*W, C/G) column band ``[g*C/G, (g+1)*C/G)``, walked as a flat run of H*W*C/G elements. Each sample's group is
split over S programs (partial statistics, then one merge per program of the second kernel), so a batch of 4 fills
an H100's 132 SMs.
Without Triton, or on a device it cannot compile for, ``group_norm_nhwc`` falls back to torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import available, triton

if triton is not None:
    import triton.language as tl

_BLOCK = 2048  # elements of one group handled per loop iteration of a program
_PROGRAMS = 512  # aim: at least this many programs per kernel (4 per SM of an H100)
_MAX_SPLITS = 64  # one compiled variant for any number of splits up to this
# every size is a runtime argument: one compiled variant per kernel for all shapes, which keeps a machine's first
# run short (Triton compiles each variant once and caches it on disk)
_INTS = ["HW", "C", "CG", "G", "SPAN", "S", "SILU"]

if triton is not None:

    @triton.jit
    def _locate(pid, S, G, HW, C, CG, SPAN):
        """Program ``pid`` -> (sample*G + group, first and end element of its split, base offset of the group)."""
        s = pid % S
        bg = pid // S
        g = bg % G
        b = bg // G
        start = s * SPAN
        stop = tl.minimum(start + SPAN, HW * CG)
        return bg, g, start, stop, b.to(tl.int64) * HW * C + g * CG

    @triton.jit
    def _block(j, stop, CG, C):
        """Elements j of a group's (H*W, C/G) band -> (in the split?, offset from the group's base, channel)."""
        row = j // CG
        col = j - row * CG
        return j < stop, row.to(tl.int64) * C + col, col

    @triton.jit(do_not_specialize=_INTS)
    def _stats(X, PCNT, PMEAN, PM2, HW, C, CG, G, SPAN, S, BLOCK: tl.constexpr):
        """Partial (count, mean, M2) of one group over one split, summed around the split's first value."""
        pid = tl.program_id(0)
        bg, g, start, stop, base = _locate(pid, S, G, HW, C, CG, SPAN)
        _in0, first, _col0 = _block(start, stop, CG, C)
        shift = tl.load(X + base + first).to(tl.float32)
        lanes = tl.arange(0, BLOCK)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for j0 in range(0, SPAN, BLOCK):
            m, off, _col = _block(start + j0 + lanes, stop, CG, C)
            x = tl.load(X + base + off, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, x - shift, 0.0)
            acc1 += d
            acc2 += d * d
        n = (stop - start).to(tl.float32)
        s1 = tl.sum(acc1, axis=0)
        s2 = tl.sum(acc2, axis=0)
        tl.store(PCNT + pid, n)
        tl.store(PMEAN + pid, shift + s1 / n)
        tl.store(PM2 + pid, tl.maximum(s2 - s1 * s1 / n, 0.0))

    @triton.jit(do_not_specialize=_INTS)
    def _apply(X, Y, W, B_, PCNT, PMEAN, PM2, MEAN, RSTD, HW, C, CG, G, SPAN, S, eps, SILU,
               S_P2: tl.constexpr, BLOCK: tl.constexpr):
        """Merge the group's partials (Chan et al.) and write y = norm(x) * w + b, then SiLU if SILU."""
        pid = tl.program_id(0)
        bg, g, start, stop, base = _locate(pid, S, G, HW, C, CG, SPAN)
        parts = tl.arange(0, S_P2)
        pm = parts < S
        cnt = tl.load(PCNT + bg * S + parts, mask=pm, other=0.0)
        mu = tl.load(PMEAN + bg * S + parts, mask=pm, other=0.0)
        m2 = tl.load(PM2 + bg * S + parts, mask=pm, other=0.0)
        total = tl.sum(cnt, axis=0)
        mean = tl.sum(cnt * mu, axis=0) / total
        dev = tl.where(pm, mu - mean, 0.0)
        var = (tl.sum(m2, axis=0) + tl.sum(cnt * dev * dev, axis=0)) / total
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + bg, mean)  # every split stores the same value
        tl.store(RSTD + bg, rstd)
        lanes = tl.arange(0, BLOCK)
        for j0 in range(0, SPAN, BLOCK):
            m, off, col = _block(start + j0 + lanes, stop, CG, C)
            x = tl.load(X + base + off, mask=m, other=0.0).to(tl.float32)
            w = tl.load(W + g * CG + col, mask=m, other=0.0).to(tl.float32)
            bias = tl.load(B_ + g * CG + col, mask=m, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w + bias
            y = tl.where(SILU != 0, y * tl.sigmoid(y), y)
            tl.store(Y + base + off, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _grad_xhat(X, DY, W, B_, base, off, col, g, m, mean, rstd, CG, SILU):
        """(d loss / d xhat, xhat) at one block of elements."""
        x = tl.load(X + base + off, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + off, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + g * CG + col, mask=m, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        if SILU != 0:
            z = xhat * w + tl.load(B_ + g * CG + col, mask=m, other=0.0).to(tl.float32)
            sg = tl.sigmoid(z)
            dy = dy * sg * (1.0 + z * (1.0 - sg))
        return dy * w, xhat

    @triton.jit(do_not_specialize=_INTS)
    def _bwd_sums(X, DY, W, B_, MEAN, RSTD, P1, P2, HW, C, CG, G, SPAN, S, SILU, BLOCK: tl.constexpr):
        """Partial sums of dxhat and dxhat * xhat over one split."""
        pid = tl.program_id(0)
        bg, g, start, stop, base = _locate(pid, S, G, HW, C, CG, SPAN)
        mean = tl.load(MEAN + bg)
        rstd = tl.load(RSTD + bg)
        lanes = tl.arange(0, BLOCK)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for j0 in range(0, SPAN, BLOCK):
            m, off, col = _block(start + j0 + lanes, stop, CG, C)
            dxh, xhat = _grad_xhat(X, DY, W, B_, base, off, col, g, m, mean, rstd, CG, SILU)
            acc1 += dxh
            acc2 += tl.where(m, dxh * xhat, 0.0)
        tl.store(P1 + pid, tl.sum(acc1, axis=0))
        tl.store(P2 + pid, tl.sum(acc2, axis=0))

    @triton.jit(do_not_specialize=_INTS)
    def _bwd_apply(X, DY, DX, W, B_, MEAN, RSTD, P1, P2, HW, C, CG, G, SPAN, S, SILU,
                   S_P2: tl.constexpr, BLOCK: tl.constexpr):
        """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over the group."""
        pid = tl.program_id(0)
        bg, g, start, stop, base = _locate(pid, S, G, HW, C, CG, SPAN)
        parts = tl.arange(0, S_P2)
        pm = parts < S
        inv_n = 1.0 / (HW * CG).to(tl.float32)
        c1 = tl.sum(tl.load(P1 + bg * S + parts, mask=pm, other=0.0), axis=0) * inv_n
        c2 = tl.sum(tl.load(P2 + bg * S + parts, mask=pm, other=0.0), axis=0) * inv_n
        mean = tl.load(MEAN + bg)
        rstd = tl.load(RSTD + bg)
        lanes = tl.arange(0, BLOCK)
        for j0 in range(0, SPAN, BLOCK):
            m, off, col = _block(start + j0 + lanes, stop, CG, C)
            dxh, xhat = _grad_xhat(X, DY, W, B_, base, off, col, g, m, mean, rstd, CG, SILU)
            tl.store(DX + base + off, (rstd * (dxh - c1 - xhat * c2)).to(DX.dtype.element_ty), mask=m)


def _plan(batch: int, channels: int, groups: int, hw: int) -> dict:
    """Sizes for one shape: S splits of each group's H*W*C/G elements, SPAN elements each (a multiple of BLOCK)."""
    cg = channels // groups
    elements = hw * cg
    most = max(1, triton.cdiv(elements, _BLOCK))  # every split gets at least one block
    splits = 1
    while splits < min(most, _MAX_SPLITS) and batch * groups * splits < _PROGRAMS:
        splits *= 2
    splits = min(splits, most, _MAX_SPLITS)
    span = triton.cdiv(triton.cdiv(elements, splits), _BLOCK) * _BLOCK
    return {"CG": cg, "S": triton.cdiv(elements, span), "SPAN": span}


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups: int, weight, bias, eps: float, silu: bool):
        batch, channels, height, width = x.shape
        hw = height * width
        x = x.contiguous(memory_format=torch.channels_last)
        p = _plan(batch, channels, groups, hw)
        n = batch * groups * p["S"]
        f32 = dict(device=x.device, dtype=torch.float32)
        pcnt, pmean, pm2 = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
        mean, rstd = torch.empty(batch * groups, **f32), torch.empty(batch * groups, **f32)
        y = torch.empty_like(x, memory_format=torch.channels_last)
        common = (hw, channels, p["CG"], groups, p["SPAN"], p["S"])
        _stats[(n,)](x, pcnt, pmean, pm2, *common, BLOCK=_BLOCK)
        _apply[(n,)](x, y, weight, bias, pcnt, pmean, pm2, mean, rstd, *common, eps, int(silu), S_P2=_MAX_SPLITS,
                     BLOCK=_BLOCK)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu, ctx.plan = groups, silu, p
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        p = ctx.plan
        batch, channels, height, width = x.shape
        dy = dy.contiguous(memory_format=torch.channels_last)
        n = batch * ctx.groups * p["S"]
        p1 = torch.empty(n, device=x.device, dtype=torch.float32)
        p2 = torch.empty_like(p1)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        common = (height * width, channels, p["CG"], ctx.groups, p["SPAN"], p["S"], int(ctx.silu))
        _bwd_sums[(n,)](x, dy, weight, bias, mean, rstd, p1, p2, *common, BLOCK=_BLOCK)
        _bwd_apply[(n,)](x, dy, dx, weight, bias, mean, rstd, p1, p2, *common, S_P2=_MAX_SPLITS, BLOCK=_BLOCK)
        return dx, None, None, None, None, None


def usable(x: torch.Tensor, groups: int, weight, bias) -> bool:
    """Whether ``group_norm_nhwc`` takes the kernel path for these arguments (else it falls back to torch)."""
    frozen = all(t is None or not t.requires_grad for t in (weight, bias))
    return (available(x) and frozen and x.dim() == 4 and x.shape[1] % groups == 0
            and x.is_contiguous(memory_format=torch.channels_last) and x.dtype in (torch.float16, torch.bfloat16,
                                                                                   torch.float32))


def group_norm_nhwc(x: torch.Tensor, groups: int, weight=None, bias=None, eps: float = 1e-5,
                    silu: bool = False) -> torch.Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)``, then SiLU if ``silu``; NHWC in, NHWC out.

    Takes the Triton kernels where ``usable``; otherwise torch's ops (any layout, any device).
    """
    if not usable(x, groups, weight, bias):
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y) if silu else y
    channels = x.shape[1]
    weight = weight if weight is not None else torch.ones(channels, device=x.device, dtype=x.dtype)
    bias = bias if bias is not None else torch.zeros(channels, device=x.device, dtype=x.dtype)
    # the kernels index weight and bias as dense vectors: a strided view (w[::2]) would be read wrongly
    return _GroupNormNHWC.apply(x, groups, weight.detach().contiguous(), bias.detach().contiguous(), float(eps),
                                bool(silu))
