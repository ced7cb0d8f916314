"""World benchmark with reference images in scenes instead of on the plain background.

``python benchmarks/world_scene_refs.py [--model world] [--out F.csv]`` (CPU: about 8 minutes)

The shipped reference folders show each concept on the plain background, and the residuals' identity then swings
with the prompt's scene. Is that the references' plain background? Here each concept gets five references rendered
on grass, beach, wooden floor, pink fabric and snow (night sky and cobblestone street held out), trained with the
benchmark's recipe and graded exactly as ``python -m prkit.world.bench`` grades (8 prompts x 4 seeds); the held-out
scenes are also reported alone. Writes one row per image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

REF_SCENES = ("grass", "beach", "wooden floor", "pink fabric", "snow")
HELD_OUT = ("night sky", "cobblestone")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/world_scene_refs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="world")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/world_scene_refs_rows.csv")
    args = parser.parse_args(argv)
    from prkit import load_concept, train_residuals
    from prkit.residuals import remove_residuals
    from prkit.world.bench import BenchConfig, grade_residuals, load_graded, summarize, write_csv
    from prkit.world.concepts import EXAMPLE_CONCEPTS, render_concept

    pipe, oracle = load_graded(args.model, args.device)
    config = BenchConfig()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, concept in EXAMPLE_CONCEPTS.items():
            folder = Path(tmp) / name
            folder.mkdir()
            for i, scene in enumerate(REF_SCENES):
                render_concept(concept, 1, seed=100 + i, background=scene)[0].save(folder / f"{i:02d}.png")
            (folder / "concept.json").write_text(json.dumps({"token": concept.token, "class_word": concept.class_word}))
            residuals = train_residuals(pipe, load_concept(folder, resolution=size), config.train, name=name).residuals
            graded = grade_residuals(pipe, residuals, name, config, oracle)
            remove_residuals(pipe.unet, name)
            rows += [{"concept": name, **row} for row in graded]
            for method in ("base", "residuals", "residuals+lag"):
                sel = [r for r in graded if r["method"] == method]
                held = [r for r in sel if any(s in r["prompt"] for s in HELD_OUT)]
                print(f"{name:13} {method:14} identity {np.mean([r['identity'] for r in sel]):.0%}, held-out scenes "
                      f"{np.mean([r['identity'] for r in held]):.0%}; scene {np.mean([r['scene'] for r in sel]):.0%}",
                      flush=True)
    write_csv(rows, Path(args.out))
    for row in summarize(rows):
        if row["concept"] == "all":
            print(f"all {row['method']:14} identity {row['identity']:.0%} scene {row['scene']:.0%} "
                  f"bg change {row['background_change']:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
