"""How much any change of the object moves the world's background, and residuals switched on late.

``python benchmarks/world_bg_floor.py [--concepts striped_ball checked_star] [--out F.csv]`` (CPU: ~8 minutes)

LAG's bar asks the background change (mean |pixel change| outside the object, vs the base image on the same seeds) to
halve. Two measurements put that figure in context, graded exactly as ``python -m prkit.world.bench`` grades (8
prompts x 4 seeds, the shipped oracle):

- the base model alone with the identifier replaced by a word ("a photo of a red ball on the grass" against "a photo
  of a sks ball on the grass"): what changing only the object, through the prompt, does to the background;
- the concept's residuals (with and without LAG) switched on only from denoising step K of 25, the base model alone
  before (a forward pre-hook on the UNet counts the steps; an experiment, not a prkit option).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("red", "blue", "striped", "red and white striped")
STARTS = (0, 4, 8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/world_bg_floor.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="world")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concepts", nargs="*", default=["striped_ball", "checked_star"])
    parser.add_argument("--out", default="benchmarks/world_bg_floor.csv")
    args = parser.parse_args(argv)
    from prkit.residuals import remove_residuals
    from prkit.sample import generate
    from prkit.world.bench import BenchConfig, grade, load_graded, train_concept, write_csv
    from prkit.world.concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS
    from prkit.world.oracle import read

    pipe, oracle = load_graded(args.model, args.device)
    config = BenchConfig()
    common = dict(seed=config.seed, num_images=config.images_per_prompt, steps=config.steps,
                  guidance_scale=config.guidance_scale)
    state = {"start": 0, "step": 0, "residuals": None}

    def count_steps(module, args, kwargs):  # one UNet call per denoising step (CFG's halves are one batch)
        if state["residuals"] is not None:
            (state["residuals"].disable if state["step"] < state["start"] else state["residuals"].enable)()
        state["step"] += 1

    pipe.unet.register_forward_pre_hook(count_steps, with_kwargs=True)
    rows = []

    def add(concept_name, variant, prompts, images, base, base_read):
        graded = grade(images, base, read(images, oracle), base_read, EXAMPLE_CONCEPTS[concept_name], prompts,
                       config.images_per_prompt)
        row = {"concept": concept_name, "variant": variant, "n": len(graded),
               **{k: float(np.nanmean([float(r[k]) for r in graded]))
                  for k in ("identity", "scene", "class", "background_change")}}
        rows.append(row)
        print(f"{concept_name:13} {variant:22} identity {row['identity']:.0%} scene {row['scene']:.0%} "
              f"background change {row['background_change']:.4f}", flush=True)
        write_csv(rows, Path(args.out))

    for name in args.concepts:
        concept = EXAMPLE_CONCEPTS[name]
        prompts = [p.format(token=concept.token, class_word=concept.class_word) for p in BENCH_PROMPTS]
        base = generate(pipe, prompts, None, **common)
        base_read = read(base, oracle)
        for word in WORDS:
            worded = [p.format(token=word, class_word=concept.class_word) for p in BENCH_PROMPTS]
            add(name, f"base, '{word}'", prompts, generate(pipe, worded, None, **common), base, base_read)
        residuals = train_concept(pipe, name, config).residuals
        try:
            for start in STARTS:
                for lag in (False, True):
                    state.update(start=start, step=0, residuals=residuals)
                    images = generate(pipe, prompts, residuals, lag=lag, lag_config=config.lag, **common)
                    state["residuals"] = None
                    add(name, f"{'residuals+lag' if lag else 'residuals'} from {start}", prompts, images, base,
                        base_read)
        finally:
            remove_residuals(pipe.unet, residuals.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
