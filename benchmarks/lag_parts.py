"""Where LAG's per-step cost goes, SD1.5 shapes, batch 1 with CFG, UNet forward as a CUDA graph (one GPU).

Times the UNet forward plain and with LAG variants that each drop one part (alternating rounds, medians), then
lists the CUDA kernels an eager LAG forward adds over a plain one (torch.profiler). Runs with bool row masks
(``LAYOUT_MASKS = False``, the path before ``layout_mask``) so that the mask multiply can be dropped on its own.
Variants replace prkit internals for the measurement only; none is a usable LAG.

    python3 benchmarks/lag_parts.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench as B  # noqa: E402
import prkit.lag as lagmod  # noqa: E402
import prkit.residual_layer as residuals_mod  # noqa: E402
from prkit.attention import CaptureState, capture_attention  # noqa: E402
from prkit.graphs import graphed_unet  # noqa: E402
from prkit.lag import LAGConfig, lag_sampling  # noqa: E402
from prkit.residuals import only_residuals  # noqa: E402

MODES = ("plain", "lag", "lag_mean", "lag_trivial_maps", "lag_no_multiply", "capture_only")


def _trivial_maps(self, block, layer, query, key, scale):
    """Stand-in for the concept-map SDPA: a map of the right shape from one cheap reduction."""
    batch = query.shape[0]
    doubled = self.is_cfg() and batch % 2 == 0
    rows = query[batch // 2:] if doubled else query
    self.sums[block] = rows[..., :self.concept_weights.shape[-1]].sum(1, dtype=torch.float32)
    self.counts[block], self.doubled[block] = rows.shape[1], doubled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    bench = B.Bench(argparse.Namespace(tiny=not torch.cuda.is_available(), out="/tmp/lag_parts", budget=600))
    pipe, _ = B.build(bench, "sd15")
    res, params = B._residuals(pipe, "parts", randomize=1e-2)
    for p in params:
        p.requires_grad_(False)
    unet = pipe.unet
    latents, t, emb = B.cfg_unet_inputs(bench, pipe, 1)
    original = CaptureState._record_fused, residuals_mod._mask_rows
    lagmod.LAYOUT_MASKS = False

    def mode_context(mode):
        CaptureState._record_fused, residuals_mod._mask_rows = original
        if mode == "plain":
            return contextlib.nullcontext()
        if mode == "capture_only":
            return capture_attention(unet)
        if mode == "lag_trivial_maps":
            CaptureState._record_fused = _trivial_maps
        if mode == "lag_no_multiply":
            residuals_mod._mask_rows = lambda middle, mask, is_conv: middle
        config = LAGConfig(threshold="mean" if mode == "lag_mean" else "median")
        return lag_sampling(unet, res, [B.PROMPT], tokenizer=pipe.tokenizer, cfg=True, config=config)

    def forward():
        return unet(latents, t, encoder_hidden_states=emb, return_dict=False)[0]

    times = {mode: [] for mode in MODES}
    try:
        for _ in range(args.rounds):
            for mode in MODES:
                with torch.inference_mode(), only_residuals(unet, [res.name]), mode_context(mode), graphed_unet(unet):
                    for _ in range(3):
                        forward()
                    seconds, _ = bench.timed(lambda: [forward() for _ in range(50)])
                times[mode].append(seconds / 50 * 1e3)
        median = {mode: float(np.median(v)) for mode, v in times.items()}
        print(json.dumps({mode: {"ms": round(ms, 4), "overhead_pct": round(100 * (ms / median["plain"] - 1), 2)}
                          for mode, ms in median.items()}))
        if bench.cuda:
            _kernel_diff(unet, forward, mode_context)
    finally:
        CaptureState._record_fused, residuals_mod._mask_rows = original
        lagmod.LAYOUT_MASKS = True
    return 0


def _kernel_diff(unet, forward, mode_context) -> None:
    from torch.profiler import ProfilerActivity, profile

    def kernels(mode):
        with torch.inference_mode(), only_residuals(unet, ["parts"]), mode_context(mode):
            forward()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    forward()
                torch.cuda.synchronize()
        return {e.key: (e.self_device_time_total / 5, e.count / 5) for e in prof.key_averages()
                if e.self_device_time_total > 0}

    plain, lag = kernels("plain"), kernels("lag")
    rows = sorted(((lag.get(k, (0, 0))[0] - plain.get(k, (0, 0))[0], lag.get(k, (0, 0))[1] - plain.get(k, (0, 0))[1],
                    k[:110]) for k in set(plain) | set(lag)), reverse=True)
    print(f"eager kernels, us per forward: plain {sum(v[0] for v in plain.values()):.1f}, "
          f"lag {sum(v[0] for v in lag.values()):.1f}")
    for extra, calls, name in rows:
        if abs(extra) > 3 or calls:
            print(f"{extra:+9.1f} us {calls:+5.1f} calls  {name}")


if __name__ == "__main__":
    sys.exit(main())
