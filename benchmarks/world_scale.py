"""Residual scale at sampling time on the world benchmark: does a stronger (or weaker) residual give the identity?

Each example concept is personalized once with the world's default recipe, then base / residuals / residuals +
LAG are sampled and graded as ``python -m prkit.world.bench`` grades them, with the set's scale (``residuals.scale``,
1.0 = as trained) at each value of ``--scales``. Writes one summary row per (concept, scale, method).

    python benchmarks/world_scale.py --out benchmarks/world_scale.csv [--device cuda] [--scales 0.5 0.75 1 1.25 1.5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from prkit.world.concepts import EXAMPLE_CONCEPTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="world")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5])
    ap.add_argument("--concepts", nargs="+", default=list(EXAMPLE_CONCEPTS), choices=list(EXAMPLE_CONCEPTS))
    args = ap.parse_args(argv)
    from prkit.residuals import remove_residuals
    from prkit.world.bench import BenchConfig, grade_residuals, load_graded, summarize, train_concept, write_csv

    pipe, oracle = load_graded(args.model, args.device)
    config = BenchConfig(concepts=tuple(args.concepts))
    rows = []
    for name in config.concepts:
        start = time.perf_counter()
        residuals = train_concept(pipe, name, config).residuals
        try:
            for scale in args.scales:
                residuals.scale = scale
                rows += [{**r, "scale": scale} for r in grade_residuals(pipe, residuals, name, config, oracle)]
        finally:
            remove_residuals(pipe.unet, residuals.name)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    out = []
    for scale in args.scales:
        out += [{"scale": scale, **r} for r in summarize([r for r in rows if r["scale"] == scale])]
    write_csv(out, args.out)
    for r in out:
        if r["concept"] == "all":
            print(f"scale {r['scale']:g} {r['method']:14s} identity {r['identity']:.0%} (+ colours "
                  f"{r['identity_colors']:.0%}) scene {r['scene']:.0%} bg {r['background_change']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
