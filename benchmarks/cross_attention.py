"""SD1.5's cross-attention in training (77 keys, keys and values without gradients): forward + backward per kernel.

    python benchmarks/cross_attention.py --out cross_attention.json          # one GPU, CUDA graphs, bf16
    python benchmarks/cross_attention.py --out x.json --tiny                 # CPU smoke test (eager, fp32)

Times one forward + backward (the query's gradient only, as in a residual run: the prompt is constant) of each
transformer block's cross-attention at batch 4, for torch's SDPA kernels (flash, memory-efficient, cuDNN) and three
materialized variants (scores, softmax and the product as plain batched matrix products: per batch and head, or
with the heads as the batch when keys and values are the same for every image of the batch, as the fast loop's
expanded prompt makes them). Each is captured as a CUDA graph and replayed; errors against an fp32 reference are
recorded. Writes one JSON with ms per call per shape and the total per training step (x the blocks of each shape).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, TOKENS = 4, 77
SD15 = [(8, 8, 160, 1), (16, 8, 160, 5), (32, 8, 80, 5), (64, 8, 40, 5)]  # side, heads, head dim, blocks per step
TINY = [(4, 2, 8, 1), (8, 2, 8, 2)]


def inputs(side: int, heads: int, dim: int, device, dtype):
    """to_q's output (B, N, H*d), the prompt's keys and values (T, H*d), the same expanded to the batch, and a
    gradient for the output; drawn on the CPU (the CUDA generator is left alone while graphs are captured)."""
    gen = torch.Generator().manual_seed(side)
    q = torch.randn(BATCH, side * side, heads * dim, generator=gen).to(device, dtype).requires_grad_(True)
    k1, v1 = (torch.randn(TOKENS, heads * dim, generator=gen).to(device, dtype) for _ in range(2))
    k, v = (t.expand(BATCH, TOKENS, heads * dim).contiguous() for t in (k1, v1))
    grad = torch.randn(BATCH, side * side, heads * dim, generator=gen).to(device, dtype)
    return q, k, v, k1, v1, grad


def sdpa(q, k, v, heads, dim, backend):
    batch, n, _ = q.shape
    split = [t.view(batch, -1, heads, dim).transpose(1, 2) for t in (q, k, v)]
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(*split)
    return out.transpose(1, 2).reshape(batch, n, heads * dim)


def per_head(q, k, v, heads, dim):
    """Scores per image and head: (B*H, N, d) @ (B*H, d, T); the query is copied to that layout."""
    batch, n, _ = q.shape
    qh, kh, vh = (t.view(batch, -1, heads, dim).transpose(1, 2).reshape(batch * heads, -1, dim) for t in (q, k, v))
    scores = torch.baddbmm(qh.new_empty(1, 1, 1), qh, kh.transpose(1, 2), beta=0, alpha=dim ** -0.5)
    out = torch.bmm(scores.softmax(-1), vh)
    return out.view(batch, heads, n, dim).transpose(1, 2).reshape(batch, n, heads * dim)


def shared_heads(q, k1, v1, heads, dim, fused_scale: bool):
    """Keys and values the same for every image: the heads are the batch, (H, B*N, d) read in place."""
    batch, n, _ = q.shape
    qh = q.view(batch * n, heads, dim).transpose(0, 1)
    kh = k1.view(TOKENS, heads, dim).permute(1, 2, 0)
    vh = v1.view(TOKENS, heads, dim).transpose(0, 1)
    if fused_scale:
        scores = torch.baddbmm(qh.new_empty(1, 1, 1), qh, kh, beta=0, alpha=dim ** -0.5)
    else:
        scores = torch.matmul(qh, kh) * dim ** -0.5
    out = torch.bmm(scores.softmax(-1), vh)
    return out.transpose(0, 1).reshape(batch, n, heads * dim)


def timed(fn, q, grad, graphs: bool, reps: int) -> float:
    """ms per forward + backward: replays of a captured graph on CUDA, eager calls on the CPU."""
    if not graphs:
        import time

        start = time.perf_counter()
        for _ in range(reps):
            q.grad = None
            fn().backward(grad)
        return (time.perf_counter() - start) / reps * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            q.grad = None
            fn().backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    q.grad = None
    with torch.cuda.graph(graph, capture_error_mode="relaxed"):
        fn().backward(grad)
    for _ in range(5):
        graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, eager (a smoke test)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION} if cuda else {"math": SDPBackend.MATH}
    shapes = TINY if args.tiny else SD15
    if cuda:  # a throwaway shape first: a process's first captures pay (and fail on) one-time set-up
        q, k, v, k1, v1, grad = inputs(8, 2, 64, device, dtype)
        for backend in kernels.values():
            try:
                timed(lambda b=backend: sdpa(q, k, v, 2, 64, b), q, grad, True, 2)
            except RuntimeError:
                pass
    results, total = {}, {}
    for side, heads, dim, blocks in shapes:
        q, k, v, k1, v1, grad = inputs(side, heads, dim, device, dtype)
        ref_q = q.detach().double().requires_grad_(True)
        ref = sdpa(ref_q, k.double(), v.double(), heads, dim, SDPBackend.MATH)
        ref.backward(grad.double())
        variants = {name: (lambda b=b: sdpa(q, k, v, heads, dim, b)) for name, b in kernels.items()}
        variants.update({"per_head": lambda: per_head(q, k, v, heads, dim),
                         "shared_heads": lambda: shared_heads(q, k1, v1, heads, dim, False),
                         "shared_heads_fused_scale": lambda: shared_heads(q, k1, v1, heads, dim, True)})
        row = {}
        for name, fn in variants.items():
            try:
                q.grad = None
                out = fn()
                out.backward(grad)
                row[name] = {"err_out": float((out.detach().double() - ref.detach()).norm() / ref.detach().norm()),
                             "err_dq": float((q.grad.double() - ref_q.grad).norm() / ref_q.grad.norm()),
                             "ms": timed(fn, q, grad, cuda, 50 if cuda else 2)}
                total[name] = total.get(name, 0.0) + row[name]["ms"] * blocks
            except RuntimeError as err:
                row[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        results[f"{side}x{side}, {heads} heads of {dim}, {blocks} per step"] = row
        print(f"{side}x{side}: " + ", ".join(f"{n} {r['ms']:.4f} ms" if "ms" in r else f"{n} failed"
                                             for n, r in row.items()), flush=True)
    summary = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "dtype": str(dtype), "shapes": results, "ms_per_step": total}
    print("per training step:", ", ".join(f"{n} {t:.3f} ms" for n, t in total.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
