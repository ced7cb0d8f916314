"""Sweep of the world benchmark over the residual recipe (rank, learning rate, steps) and LAG's threshold.

Loads the world pipeline and oracle once, then for each setting personalizes every example concept and grades
base / residuals / residuals + LAG exactly as ``python -m prkit.world.bench`` does; writes one summary row per
(setting, method) to a CSV. On a GPU the whole default sweep takes a few minutes; on a CPU about an hour.

    python benchmarks/world_sweep.py --out /tmp/sweep.csv [--device cuda] [--model world]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (label, rank, learning rate, steps, LAG threshold); the first is the world's default recipe
SETTINGS = [
    ("default", 0.05, 1e-2, 150, "median"),
    ("lag_mean", 0.05, 1e-2, 150, "mean"),
    ("lag_otsu", 0.05, 1e-2, 150, "otsu"),
    ("lag_soft", 0.05, 1e-2, 150, "soft"),
    ("rank8", 8, 1e-2, 150, "median"),
    ("rank16", 16, 1e-2, 150, "median"),
    ("rank32", 32, 1e-2, 150, "median"),
    ("lr1e-3", 0.05, 1e-3, 150, "median"),  # METHOD.md's learning rate
    ("lr3e-3", 0.05, 3e-3, 150, "median"),
    ("lr3e-2", 0.05, 3e-2, 150, "median"),
    ("rank16_lr3e-2", 16, 3e-2, 150, "median"),
    ("steps300", 0.05, 1e-2, 300, "median"),
    # capacity probes (stop 32): is the proj_out position the limit, or the rank and the step budget?
    ("full_rank", 0.999, 3e-3, 150, "median"),
    ("full_rank_600", 0.999, 3e-3, 600, "median"),
    ("rank16_600", 16, 1e-2, 600, "median"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="world")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concepts", nargs="*", default=None, help="example concepts (default: all five)")
    ap.add_argument("--only", nargs="*", default=None, help="labels of SETTINGS to run (default: all)")
    args = ap.parse_args(argv)
    from prkit.lag import LAGConfig
    from prkit.pipeline import load_pipeline
    from prkit.world.bench import BenchConfig, bench_concept, summarize, write_csv
    from prkit.world.oracle import load_oracle

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle(pipe.unet.device)
    base = BenchConfig() if not args.concepts else BenchConfig(concepts=tuple(args.concepts))
    out_rows = []
    for label, rank, lr, steps, threshold in SETTINGS:
        if args.only and label not in args.only:
            continue
        start = time.perf_counter()
        config = replace(base, train=replace(base.train, rank=rank, learning_rate=lr, steps=steps),
                         lag=LAGConfig(threshold=threshold))
        rows = [row for name in config.concepts for row in bench_concept(pipe, name, config, oracle)]
        summary = summarize(rows)
        out_rows += [{"setting": label, "rank": rank, "learning_rate": lr, "steps": steps, "lag_threshold": threshold,
                      **r} for r in summary]
        allr = {r["method"]: r for r in summary if r["concept"] == "all"}
        print(f"{label}: identity base {allr['base']['identity']:.0%} res {allr['residuals']['identity']:.0%} "
              f"lag {allr['residuals+lag']['identity']:.0%}; bg res {allr['residuals']['background_change']:.4f} "
              f"lag {allr['residuals+lag']['background_change']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        write_csv(out_rows, args.out)  # after every setting: an interrupted sweep keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
