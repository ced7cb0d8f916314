"""Can the world's base model draw each example concept when the prompt describes it in words?

The world benchmark's prompts with "{token} {class_word}" replaced by the concept's description ("red and white
striped ball"), sampled by the base model on the benchmark's seeds and read by the oracle like
``prkit.world.bench``. It tells whether a concept is within what the model and its VAE can draw (the ceiling of
any personalization method) or not.

    python benchmarks/world_described.py [--out benchmarks/world_described.csv] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def described(concept) -> str:
    from prkit.world.render import PATTERN_WORDS

    return f"{concept.colors[0]} and {concept.colors[1]} {PATTERN_WORDS[concept.pattern]} {concept.class_word}"


def main(argv: list[str] | None = None) -> int:
    from prkit import load_pipeline
    from prkit.sample import generate
    from prkit.world import bench
    from prkit.world.concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS
    from prkit.world.oracle import read

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/world_described.csv")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    args = parser.parse_args(argv)
    config = bench.BenchConfig(images_per_prompt=args.images_per_prompt)
    pipe = load_pipeline("world", device=args.device)
    rows = []
    for name, concept in EXAMPLE_CONCEPTS.items():
        prompts = [p.replace("{token} {class_word}", described(concept)) for p in BENCH_PROMPTS]
        images = generate(pipe, prompts, None, seed=config.seed, num_images=config.images_per_prompt,
                          steps=config.steps, guidance_scale=config.guidance_scale)
        readings = read(images)
        for row in bench.grade(images, images, readings, readings, concept, prompts, config.images_per_prompt):
            rows.append({"concept": name, "method": "base, described", **row, "train_seconds": 0.0})
    summary = bench.summarize(rows, ("base, described",))
    bench.write_csv(summary, Path(args.out))
    print(bench.format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
