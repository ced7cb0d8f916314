"""GroupNorm (optionally followed by SiLU) on channels-last activations, as Triton kernels.

PyTorch's CUDA GroupNorm (up to 2.11 at least) converts an NHWC input to NCHW and back, so a channels-last UNet
pays two transposes per norm on top of the ones it saves in the convolutions. These kernels read and write NHWC
directly and fuse the SiLU that follows most norms of a UNet. Backward computes the input's gradient only: the
fast loop freezes the norms' weights (a norm whose weight or bias needs a gradient keeps torch's own path).

Layout: a (B, C, H, W) tensor in ``torch.channels_last`` is (B, H*W, C) in memory, one row of C channels per pixel.
A program works on a tile of whole rows' channel runs: K neighbouring groups (K*C/G contiguous channels, a tile of
CB lanes) over one split of the H*W rows, so its loads are runs of K*C/G elements (a group alone is 10 channels,
20 bytes, on SD1.5's 320-channel blocks, which wasted most of each memory transaction). Statistics are summed per
channel, around the split's first row, then merged into the K groups (Chan et al.); the next kernel merges each
group's splits. Enough splits are taken that a batch of 4 fills an H100's 132 SMs.
Without Triton, or on a device it cannot compile for, ``group_norm_nhwc`` falls back to torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import available, triton

if triton is not None:
    import triton.language as tl

_BLOCK = 2048  # elements of a tile handled per loop iteration of a program (rows x CB lanes)
_PROGRAMS = 512  # aim: at least this many programs per kernel (4 per SM of an H100)
_MAX_SPLITS = 64  # one compiled variant for any number of splits up to this
_KP = 8  # at most this many groups per tile: one compiled variant per tile width
_WIDTHS = (64, 128, 256)  # tile widths (lanes) to choose from: each is a compiled variant of the four kernels
# sizes are runtime arguments; the tile width CB (64, 128 or 256 for SD shapes) is the only compile-time choice
_INTS = ["HW", "CG", "G", "K", "NCB", "SPAN", "S", "SILU"]  # C: specialized (multiple of 16)

if triton is not None:

    @triton.jit
    def _locate(pid, HW, C, CG, G, K, NCB, SPAN, S):
        """Program ``pid`` -> (split, sample, first group, groups in the tile, first and end row, base offset)."""
        s = pid % S
        t = pid // S
        cb = t % NCB
        b = t // NCB
        g0 = cb * K
        kk = tl.minimum(K, G - g0)
        r0 = s * SPAN
        r1 = tl.minimum(r0 + SPAN, HW)
        return s, b, g0, kk, r0, r1, b.to(tl.int64) * HW * C + g0 * CG

    @triton.jit
    def _onehot(CG, kk, CB: tl.constexpr, KP: tl.constexpr):
        """(CB, KP) float matrix: lane c belongs to the tile's group k (lanes past the tile's groups: none)."""
        lanes = tl.arange(0, CB)
        ks = tl.arange(0, KP)
        inside = lanes < kk * CG
        return tl.where(((lanes // CG)[:, None] == ks[None, :]) & inside[:, None], 1.0, 0.0), inside

    @triton.jit
    def _rows(r0, j, r1, inside, ROWS: tl.constexpr, C, CB: tl.constexpr):
        """Mask and offsets (from the tile's base) of rows r0+j .. r0+j+ROWS-1 of the tile."""
        r = r0 + j + tl.arange(0, ROWS)
        m = (r < r1)[:, None] & inside[None, :]
        return m, r.to(tl.int64)[:, None] * C + tl.arange(0, CB)[None, :]

    @triton.jit(do_not_specialize=_INTS)
    def _stats(X, PCNT, PMEAN, PM2, HW, C, CG, G, K, NCB, SPAN, S, CB: tl.constexpr, KP: tl.constexpr,
               ROWS: tl.constexpr):
        """Partial (count, mean, M2) of each of the tile's groups over one split of the rows."""
        pid = tl.program_id(0)
        s, b, g0, kk, r0, r1, base = _locate(pid, HW, C, CG, G, K, NCB, SPAN, S)
        onehot, inside = _onehot(CG, kk, CB, KP)
        lanes = tl.arange(0, CB)
        shift = tl.load(X + base + r0.to(tl.int64) * C + lanes, mask=inside, other=0.0).to(tl.float32)
        acc1 = tl.zeros([ROWS, CB], dtype=tl.float32)
        acc2 = tl.zeros([ROWS, CB], dtype=tl.float32)
        for j in range(0, SPAN, ROWS):
            m, off = _rows(r0, j, r1, inside, ROWS, C, CB)
            x = tl.load(X + base + off, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, x - shift[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        n = (r1 - r0).to(tl.float32)
        s1 = tl.sum(acc1, axis=0)
        s2 = tl.sum(acc2, axis=0)
        mean_c = shift + s1 / n  # per lane (channel)
        m2_c = tl.maximum(s2 - s1 * s1 / n, 0.0)
        width = CG.to(tl.float32)
        mean_g = tl.sum(onehot * mean_c[:, None], axis=0) / width  # (KP,)
        dev = mean_c - tl.sum(onehot * mean_g[None, :], axis=1)
        m2_g = tl.sum(onehot * (m2_c + n * dev * dev)[:, None], axis=0)
        ks = tl.arange(0, KP)
        at = (b * G + g0 + ks) * S + s
        tl.store(PCNT + at, n * width, mask=ks < kk)
        tl.store(PMEAN + at, mean_g, mask=ks < kk)
        tl.store(PM2 + at, m2_g, mask=ks < kk)

    @triton.jit
    def _group_sums(P, b, G, g0, kk, S, KP: tl.constexpr, S_P2: tl.constexpr):
        """(KP, S_P2) partials of the tile's groups (0 outside) and the mask of real entries."""
        ks = tl.arange(0, KP)
        parts = tl.arange(0, S_P2)
        m = (ks < kk)[:, None] & (parts < S)[None, :]
        return tl.load(P + ((b * G + g0 + ks) * S)[:, None] + parts[None, :], mask=m, other=0.0), m

    @triton.jit(do_not_specialize=_INTS)
    def _apply(X, Y, W, B_, PCNT, PMEAN, PM2, MEAN, RSTD, HW, C, CG, G, K, NCB, SPAN, S, eps, SILU,
               CB: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, S_P2: tl.constexpr):
        """Merge each group's partials (Chan et al.) and write y = norm(x) * w + b, then SiLU if SILU."""
        pid = tl.program_id(0)
        s, b, g0, kk, r0, r1, base = _locate(pid, HW, C, CG, G, K, NCB, SPAN, S)
        onehot, inside = _onehot(CG, kk, CB, KP)
        cnt, m = _group_sums(PCNT, b, G, g0, kk, S, KP, S_P2)
        mu, _m = _group_sums(PMEAN, b, G, g0, kk, S, KP, S_P2)
        m2, _m = _group_sums(PM2, b, G, g0, kk, S, KP, S_P2)
        ks = tl.arange(0, KP)
        total = tl.maximum(tl.sum(cnt, axis=1), 1.0)
        mean = tl.sum(cnt * mu, axis=1) / total
        dev = tl.where(m, mu - mean[:, None], 0.0)
        var = (tl.sum(m2, axis=1) + tl.sum(cnt * dev * dev, axis=1)) / total
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + b * G + g0 + ks, mean, mask=ks < kk)  # every split stores the same values
        tl.store(RSTD + b * G + g0 + ks, rstd, mask=ks < kk)
        lanes = tl.arange(0, CB)
        w = tl.load(W + g0 * CG + lanes, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(B_ + g0 * CG + lanes, mask=inside, other=0.0).to(tl.float32)
        scale = tl.sum(onehot * rstd[None, :], axis=1) * w
        shift = bias - tl.sum(onehot * mean[None, :], axis=1) * scale
        for j in range(0, SPAN, ROWS):
            mr, off = _rows(r0, j, r1, inside, ROWS, C, CB)
            x = tl.load(X + base + off, mask=mr, other=0.0).to(tl.float32)
            y = x * scale[None, :] + shift[None, :]
            y = tl.where(SILU != 0, y * tl.sigmoid(y), y)
            tl.store(Y + base + off, y.to(Y.dtype.element_ty), mask=mr)

    @triton.jit
    def _lane_stats(MEAN, RSTD, W, B_, b, G, g0, kk, CG, onehot, inside, CB: tl.constexpr, KP: tl.constexpr):
        """Per lane: the group's mean and rstd, the norm's weight and bias (fp32)."""
        ks = tl.arange(0, KP)
        mean = tl.load(MEAN + b * G + g0 + ks, mask=ks < kk, other=0.0)
        rstd = tl.load(RSTD + b * G + g0 + ks, mask=ks < kk, other=0.0)
        lanes = tl.arange(0, CB)
        w = tl.load(W + g0 * CG + lanes, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(B_ + g0 * CG + lanes, mask=inside, other=0.0).to(tl.float32)
        return tl.sum(onehot * mean[None, :], axis=1), tl.sum(onehot * rstd[None, :], axis=1), w, bias

    @triton.jit
    def _grad_xhat(X, DY, base, off, m, mean, rstd, w, bias, SILU):
        """(d loss / d xhat, xhat) at one block of rows; mean, rstd, w, bias per lane."""
        x = tl.load(X + base + off, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + off, mask=m, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        if SILU != 0:
            z = xhat * w[None, :] + bias[None, :]
            sg = tl.sigmoid(z)
            dy = dy * sg * (1.0 + z * (1.0 - sg))
        return tl.where(m, dy * w[None, :], 0.0), xhat

    @triton.jit(do_not_specialize=_INTS)
    def _bwd_sums(X, DY, W, B_, MEAN, RSTD, P1, P2, HW, C, CG, G, K, NCB, SPAN, S, SILU, CB: tl.constexpr,
                  KP: tl.constexpr, ROWS: tl.constexpr):
        """Partial sums of dxhat and dxhat * xhat of each of the tile's groups over one split."""
        pid = tl.program_id(0)
        s, b, g0, kk, r0, r1, base = _locate(pid, HW, C, CG, G, K, NCB, SPAN, S)
        onehot, inside = _onehot(CG, kk, CB, KP)
        mean, rstd, w, bias = _lane_stats(MEAN, RSTD, W, B_, b, G, g0, kk, CG, onehot, inside, CB, KP)
        acc1 = tl.zeros([ROWS, CB], dtype=tl.float32)
        acc2 = tl.zeros([ROWS, CB], dtype=tl.float32)
        for j in range(0, SPAN, ROWS):
            m, off = _rows(r0, j, r1, inside, ROWS, C, CB)
            dxh, xhat = _grad_xhat(X, DY, base, off, m, mean, rstd, w, bias, SILU)
            acc1 += dxh
            acc2 += dxh * xhat
        ks = tl.arange(0, KP)
        at = (b * G + g0 + ks) * S + s
        tl.store(P1 + at, tl.sum(onehot * tl.sum(acc1, axis=0)[:, None], axis=0), mask=ks < kk)
        tl.store(P2 + at, tl.sum(onehot * tl.sum(acc2, axis=0)[:, None], axis=0), mask=ks < kk)

    @triton.jit(do_not_specialize=_INTS)
    def _bwd_apply(X, DY, DX, W, B_, MEAN, RSTD, P1, P2, HW, C, CG, G, K, NCB, SPAN, S, SILU, CB: tl.constexpr,
                   KP: tl.constexpr, ROWS: tl.constexpr, S_P2: tl.constexpr):
        """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over each group."""
        pid = tl.program_id(0)
        s, b, g0, kk, r0, r1, base = _locate(pid, HW, C, CG, G, K, NCB, SPAN, S)
        onehot, inside = _onehot(CG, kk, CB, KP)
        mean, rstd, w, bias = _lane_stats(MEAN, RSTD, W, B_, b, G, g0, kk, CG, onehot, inside, CB, KP)
        inv_n = 1.0 / (HW.to(tl.float32) * CG.to(tl.float32))
        p1, _m = _group_sums(P1, b, G, g0, kk, S, KP, S_P2)
        p2, _m = _group_sums(P2, b, G, g0, kk, S, KP, S_P2)
        c1 = tl.sum(onehot * (tl.sum(p1, axis=1) * inv_n)[None, :], axis=1)
        c2 = tl.sum(onehot * (tl.sum(p2, axis=1) * inv_n)[None, :], axis=1)
        for j in range(0, SPAN, ROWS):
            m, off = _rows(r0, j, r1, inside, ROWS, C, CB)
            dxh, xhat = _grad_xhat(X, DY, base, off, m, mean, rstd, w, bias, SILU)
            dx = rstd[None, :] * (dxh - c1[None, :] - xhat * c2[None, :])
            tl.store(DX + base + off, dx.to(DX.dtype.element_ty), mask=m)


def _tile(cg: int, groups: int) -> tuple[int, int]:
    """(CB lanes, K groups) of a tile: K <= _KP whole groups of cg channels in one of the _WIDTHS (a wider power
    of two for wider groups), the fewest lanes over all the channels, then the narrowest tile."""
    if cg > max(_WIDTHS):
        return triton.next_power_of_2(cg), 1
    best = None
    for width in _WIDTHS:
        k = min(width // cg, groups, _KP)
        if k == 0:
            continue
        lanes = triton.cdiv(groups, k) * width
        if best is None or lanes < best[0]:
            best = (lanes, width, k)
    return best[1], best[2]


def _plan(batch: int, channels: int, groups: int, hw: int) -> dict:
    """Sizes for one shape: tiles of K groups, and S splits of the H*W rows, SPAN rows each (a multiple of ROWS)."""
    cg = channels // groups
    cb, k = _tile(cg, groups)
    rows = max(1, _BLOCK // cb)
    ncb = triton.cdiv(groups, k)
    most = triton.cdiv(hw, rows)  # every split gets at least one block of rows
    splits = 1
    while splits < min(most, _MAX_SPLITS) and batch * ncb * splits < _PROGRAMS:
        splits *= 2
    splits = min(splits, most, _MAX_SPLITS)
    span = triton.cdiv(triton.cdiv(hw, splits), rows) * rows
    return {"CG": cg, "K": k, "NCB": ncb, "SPAN": span, "S": triton.cdiv(hw, span), "CB": cb, "ROWS": rows}


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups: int, weight, bias, eps: float, silu: bool):
        batch, channels, height, width = x.shape
        hw = height * width
        x = x.contiguous(memory_format=torch.channels_last)
        p = _plan(batch, channels, groups, hw)
        n = batch * p["NCB"] * p["S"]
        f32 = dict(device=x.device, dtype=torch.float32)
        parts = batch * groups * p["S"]
        pcnt, pmean, pm2 = torch.empty(parts, **f32), torch.empty(parts, **f32), torch.empty(parts, **f32)
        mean, rstd = torch.empty(batch * groups, **f32), torch.empty(batch * groups, **f32)
        y = torch.empty_like(x, memory_format=torch.channels_last)
        sizes = (hw, channels, p["CG"], groups, p["K"], p["NCB"], p["SPAN"], p["S"])
        tile = dict(CB=p["CB"], KP=_KP, ROWS=p["ROWS"])
        _stats[(n,)](x, pcnt, pmean, pm2, *sizes, **tile)
        _apply[(n,)](x, y, weight, bias, pcnt, pmean, pm2, mean, rstd, *sizes, eps, int(silu), **tile,
                     S_P2=_MAX_SPLITS)
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
        n = batch * p["NCB"] * p["S"]
        p1 = torch.empty(batch * ctx.groups * p["S"], device=x.device, dtype=torch.float32)
        p2 = torch.empty_like(p1)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        sizes = (height * width, channels, p["CG"], ctx.groups, p["K"], p["NCB"], p["SPAN"], p["S"], int(ctx.silu))
        tile = dict(CB=p["CB"], KP=_KP, ROWS=p["ROWS"])
        _bwd_sums[(n,)](x, dy, weight, bias, mean, rstd, p1, p2, *sizes, **tile)
        _bwd_apply[(n,)](x, dy, dx, weight, bias, mean, rstd, p1, p2, *sizes, **tile, S_P2=_MAX_SPLITS)
        return dx, None, None, None, None, None


def usable(x: torch.Tensor, groups: int, weight, bias) -> bool:
    """Whether ``group_norm_nhwc`` takes the kernel path for these arguments (else it falls back to torch)."""
    frozen = all(t is None or not t.requires_grad for t in (weight, bias))
    return (available(x) and frozen and x.dim() == 4 and x.numel() > 0 and x.shape[1] % groups == 0
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
