"""How far LAG can cut the background change on the world: the median mask against an ideal mask.

For each example concept (default recipe), every benchmark prompt is sampled on the same seeds by the base model,
the residuals, residuals + LAG (median cut, the default) and residuals + LAG with an *ideal* mask: at every block
and step the residual applies exactly on the object's dilated region as the oracle reads it in the base image of
that seed (pooled to the block's resolution). If even the ideal mask leaves a large background change, the change
comes from the object itself (it steers the sampler's trajectory everywhere), not from a loose mask. Also reports
how much of the image the median masks cover. Writes one row per (concept, method) and prints the table.

    python benchmarks/world_lag_ideal.py --out /tmp/lag_ideal.csv [--device cpu] [--images-per-prompt 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("base", "residuals", "residuals+lag", "residuals+ideal_mask")


def ideal_threshold(regions: np.ndarray):
    """A LAG threshold returning, for maps (rows, N), the regions (K, H, W) pooled to the block's h x w (any
    object pixel in a cell counts); rows cycle over the K images (CFG's halves get the same mask)."""
    full = torch.from_numpy(regions).float()[:, None]  # (K, 1, H, W)

    def cut(maps: torch.Tensor) -> torch.Tensor:
        side = int(round(maps.shape[1] ** 0.5))
        pooled = (F.adaptive_max_pool2d(full, side) > 0).float().reshape(full.shape[0], -1)  # (K, N)
        return pooled.repeat(maps.shape[0] // pooled.shape[0], 1).to(maps)
    return cut


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concepts", nargs="*", default=None)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    args = ap.parse_args(argv)
    from prkit.attention import AttentionStore
    from prkit.lag import LAGConfig
    from prkit.pipeline import load_pipeline
    from prkit.residuals import remove_residuals
    from prkit.sample import generate
    from prkit.world.bench import BenchConfig, _dilate, grade, summarize, train_concept, write_csv
    from prkit.world.concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS
    from prkit.world.oracle import load_oracle, read

    pipe = load_pipeline("world", device=args.device)
    pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle(pipe.unet.device)
    config = BenchConfig(images_per_prompt=args.images_per_prompt)
    k = config.images_per_prompt
    rows, coverage = [], {}
    start = time.perf_counter()
    for name in args.concepts or list(EXAMPLE_CONCEPTS):
        residuals = train_concept(pipe, name, config).residuals
        common = dict(seed=config.seed, num_images=k, steps=config.steps, guidance_scale=config.guidance_scale)
        images = {m: [] for m in METHODS}
        cover = []
        for template in BENCH_PROMPTS:
            prompt = template.format(token=residuals.token, class_word=residuals.class_word)
            base = generate(pipe, prompt, None, **common)
            regions = np.stack([_dilate(r["mask"]) for r in read(base, oracle)])
            store = AttentionStore(tokens=[])
            images["base"] += base
            images["residuals"] += generate(pipe, prompt, residuals, lag=False, **common)
            images["residuals+lag"] += generate(pipe, prompt, residuals, lag=True, store=store, **common)
            images["residuals+ideal_mask"] += generate(pipe, prompt, residuals, lag=True, **common,
                                                       lag_config=LAGConfig(threshold=ideal_threshold(regions)))
            cover += [float(m.mean()) for m in store.masks.values()]
            coverage.setdefault(name, []).append(float(regions.mean()))
        prompts = [t.format(token=residuals.token, class_word=residuals.class_word) for t in BENCH_PROMPTS]
        readings = {m: read(imgs, oracle) for m, imgs in images.items()}
        for method in METHODS:
            for row in grade(images[method], images["base"], readings[method], readings["base"],
                             EXAMPLE_CONCEPTS[name], prompts, k):
                rows.append({"concept": name, "method": method, **row, "train_seconds": 0.0})
        print(f"{name}: median masks cover {np.mean(cover):.0%} of the block positions; the dilated objects "
              f"{np.mean(coverage[name]):.0%} of the image ({time.perf_counter() - start:.0f} s)", flush=True)
        remove_residuals(pipe.unet, residuals.name)
    write_csv(rows, args.out.with_name(args.out.stem + "_rows.csv"))
    summary = summarize(rows, METHODS)
    write_csv(summary, args.out)
    for r in summary:
        if r["concept"] == "all":
            print(f"{r['method']:22s} identity {r['identity']:.0%}  scene {r['scene']:.0%}  "
                  f"bg change {r['background_change']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
