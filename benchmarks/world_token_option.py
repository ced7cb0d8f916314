"""World benchmark of METHOD.md's option "train the identifier's embedding too" beside the default recipe.

For each example concept: residuals alone (the default) and residuals + the identifier's token embedding (one
row, started from the identifier's own embedding, same learning rate), each graded like ``prkit.world.bench``:
base / trained / trained + LAG on the same seeds. The base images are sampled before any training, so the
trained embedding never reaches them. Writes one summary row per (variant, concept, method).

    python benchmarks/world_token_option.py --out /tmp/token.csv [--device cuda] [--model world]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class ResidualsAndToken:
    """Training target: the residuals plus the identifier's embedding row (a handle over both)."""

    needs_text_encoder = True

    def __init__(self, pipe, concept, config, name: str):
        from prkit.targets import TokenTarget, residual_target

        self.res = residual_target(pipe, concept, config, name)
        self.tok = TokenTarget(pipe, concept, config, name, init="token")
        self.name, self.token, self.class_word, self.meta = name, concept.token, concept.class_word, {}

    def parameters(self):
        return itertools.chain(self.res.parameters(), self.tok.parameters())

    def num_parameters(self) -> int:
        return self.res.num_parameters() + self.tok.num_parameters()

    def state_dict(self) -> dict:
        return {**{f"res.{k}": v for k, v in self.res.state_dict().items()},
                **{f"tok.{k}": v for k, v in self.tok.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.res.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("res.")})
        self.tok.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("tok.")})

    def remove(self) -> None:
        self.tok.remove()
        self.res.remove()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="world", help="the model to personalize (default: the shipped world)")
    ap.add_argument("--concepts", nargs="*", default=None)
    args = ap.parse_args(argv)
    from prkit import load_concept, train_residuals
    from prkit.residuals import remove_residuals
    from prkit.sample import generate
    from prkit.targets import TARGETS
    from prkit.world.bench import BenchConfig, grade, load_graded, summarize, write_csv
    from prkit.world.concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS, concept_folder
    from prkit.world.oracle import read

    TARGETS["residuals_token"] = ResidualsAndToken
    pipe, oracle = load_graded(args.model, args.device)
    config = BenchConfig()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out_rows = []
    for name in args.concepts or list(EXAMPLE_CONCEPTS):
        concept = EXAMPLE_CONCEPTS[name]
        prompts = [p.format(token=concept.token, class_word=concept.class_word) for p in BENCH_PROMPTS]
        common = dict(seed=config.seed, num_images=config.images_per_prompt, steps=config.steps,
                      guidance_scale=config.guidance_scale)
        base = generate(pipe, prompts, None, **common)
        base_read = read(base, oracle)
        for variant, target in (("residuals", "residuals"), ("residuals+token", "residuals_token")):
            start = time.perf_counter()
            result = train_residuals(pipe, load_concept(concept_folder(name), resolution=size), config.train,
                                     name="trained", target=target, learning_rate=1e-2, progress=False)
            seconds = time.perf_counter() - start
            handle = result.residuals
            res = handle.res if isinstance(handle, ResidualsAndToken) else handle
            rows = []
            for method, lag in (("residuals", False), ("residuals+lag", True)):
                images = generate(pipe, prompts, res, lag=lag, **common)
                for row in grade(images, base, read(images, oracle), base_read, concept, prompts,
                                 config.images_per_prompt):
                    rows.append({"concept": name, "method": method, **row, "train_seconds": seconds})
            rows += [{"concept": name, "method": "base", **r, "train_seconds": 0.0}
                     for r in grade(base, base, base_read, base_read, concept, prompts, config.images_per_prompt)]
            if isinstance(handle, ResidualsAndToken):
                handle.tok.remove()
            remove_residuals(pipe.unet, "trained")
            for r in summarize(rows):
                out_rows.append({"variant": variant, **r})
                if r["concept"] != "all":
                    print(f"{variant:16s} {name:13s} {r['method']:14s} identity {r['identity']:.0%} "
                          f"scene {r['scene']:.0%} bg {r['background_change']:.4f}", flush=True)
            write_csv(out_rows, args.out)
    for variant in ("residuals", "residuals+token"):
        sel = [r for r in out_rows if r["variant"] == variant and r["concept"] != "all"]
        for method in ("base", "residuals", "residuals+lag"):
            vals = [r["identity"] for r in sel if r["method"] == method]
            print(f"ALL {variant:16s} {method:14s} identity {sum(vals) / max(1, len(vals)):.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
