"""World benchmark: personalize each example concept, sample base / residuals / residuals + LAG, grade with the oracle.

``python -m prkit.world.bench [--concepts a b] [--images-per-prompt 4] [--out benchmarks/world_bench.csv]``.
Identity = the oracle reads the concept's pattern on an object (identity_colors: and both its colours,
stricter: small dots and faces often blur into other colours through the VAE), on the image or, for stripes, on
its mirror image (``CHIRAL_PATTERNS``); prompt accuracy = the
scene is read as prompted; background change = mean |pixel change| vs the base image outside the
concept's region (oracle masks of both images, dilated). No training of the world itself here.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cli_args import _positive_int, _rank, _writable_folder
from ..lag import THRESHOLDS, LAGConfig
from ..train import TrainConfig
from .concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS, WorldConcept, concept_folder
from .vocab import BACKGROUNDS, PLAIN, SCENE_PHRASES

METHODS = ("base", "residuals", "residuals+lag")
WORLD_RANK = 0.05  # the METHOD default; the world's own default if it needs more is set here


@dataclass
class BenchConfig:
    """What the benchmark runs."""

    concepts: tuple[str, ...] = tuple(EXAMPLE_CONCEPTS)
    images_per_prompt: int = 4  # seeds per prompt
    steps: int = 25  # denoising steps
    guidance_scale: float = 7.5
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(rank=WORLD_RANK))  # lr: the model's
    lag: LAGConfig = field(default_factory=LAGConfig)  # the threshold of the residuals+lag rows


def prompt_scene(prompt: str) -> str:
    """The background a benchmark prompt asks for (PLAIN when it names none)."""
    for bg in BACKGROUNDS:
        if bg != PLAIN and any(phrase and phrase in prompt for phrase in SCENE_PHRASES[bg]):
            return bg
    return PLAIN


CHIRAL_PATTERNS = ("stripes",)  # their mirror image is a pattern the world never draws, which the oracle misreads


def mirrored_readings(images: list, concept: WorldConcept, oracle=None) -> list[dict] | None:
    """Oracle readings of the images mirrored left to right, for a concept whose pattern the mirror changes (None
    for the others). The world draws stripes one way only, so the oracle reads those of a mirrored image as another
    pattern; residuals trained with flips (TrainConfig.flip, the METHOD default) draw both ways."""
    from .oracle import read

    if concept.pattern not in CHIRAL_PATTERNS:
        return None
    return read([np.ascontiguousarray(np.asarray(image)[:, ::-1]) for image in images], oracle)


def identity(reading: dict, concept: WorldConcept, mirrored: dict | None = None) -> tuple[bool, bool]:
    """(pattern read, pattern and both colours read) for the best-matching object of one oracle reading, or of
    ``mirrored`` (the reading of the image's mirror, ``mirrored_readings``) where that matches better.
    Colours are (body, pattern) as the concept gives them; stripes and checks, whose order the oracle cannot read
    (``oracle.SYMMETRIC_PATTERNS``), match in either order."""
    from .oracle import SYMMETRIC_PATTERNS

    if mirrored is not None:
        (a, b), (c, d) = identity(reading, concept), identity(mirrored, concept)
        return a or c, b or d
    pattern_ok = full_ok = False
    for obj in reading["objects"]:
        if obj["pattern"] == concept.pattern:
            pattern_ok = True
            colors = (obj["color"], obj["color2"])
            full_ok |= (set(colors) == set(concept.colors) if concept.pattern in SYMMETRIC_PATTERNS
                        else colors == tuple(concept.colors))
    return pattern_ok, full_ok


def _dilate(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """``mask`` (H, W) grown by ``radius`` pixels (a square), stopping at the image's edges (np.roll wrapped a
    region at one edge onto the opposite one)."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = mask.copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def attention_on_object(image, concept_map, oracle=None) -> tuple[float, float]:
    """Mean of ``concept_map`` (H, W, e.g. at the image's size) inside vs outside the object the oracle finds."""
    from PIL import Image

    from .oracle import read

    region = read([image], oracle)[0]["mask"]  # (64, 64) whatever the image's size
    values = np.asarray(concept_map, dtype=np.float32)
    if region.shape != values.shape:  # indexing a 128 px map with it failed ("boolean index did not match")
        region = np.asarray(Image.fromarray(region).resize(values.shape[::-1], Image.NEAREST))
    return float(values[region].mean()), float(values[~region].mean())


def background_change(image: np.ndarray, base: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute change in [0, 1] units over the pixels outside ``mask`` (H, W)."""
    keep = ~mask
    if not keep.any():
        return float("nan")
    diff = np.abs(image.astype(np.float32) - base.astype(np.float32)).mean(-1) / 255.0
    return float(diff[keep].mean())


def grade(images: list, base_images: list, readings: list[dict], base_readings: list[dict],
          concept: WorldConcept, prompts: list[str], per_prompt: int, mirrored: list[dict] | None = None) -> list[dict]:
    """One row per image: identity (with and without colours), scene/class correctness and background change vs the
    base. ``mirrored``: the readings of the mirrored images (``mirrored_readings``), also graded for identity."""
    rows = []
    for i, (image, reading) in enumerate(zip(images, readings)):
        prompt = prompts[i // per_prompt]
        region = _dilate(reading["mask"] | base_readings[i]["mask"])
        pattern_ok, full_ok = identity(reading, concept, mirrored[i] if mirrored is not None else None)
        rows.append({
            "prompt": prompt, "seed": i % per_prompt, "identity": pattern_ok, "identity_colors": full_ok,
            "scene": reading["background"] == prompt_scene(prompt),
            "class": any(o["cls"] == concept.class_word for o in reading["objects"]),
            "background_change": background_change(np.asarray(image), np.asarray(base_images[i]), region),
        })
    return rows


def load_graded(model: str = "world", device: str = "auto"):
    """(pipeline with its progress bars off, the oracle on the pipeline's device): what a world benchmark starts from."""
    from ..pipeline import load_pipeline
    from .oracle import load_oracle

    pipe = load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_oracle(pipe.unet.device)


def train_concept(pipe, name: str, config: BenchConfig, progress: bool = False):
    """Personalize ``pipe`` on the shipped concept ``name`` with the benchmark's recipe; returns the TrainResult."""
    from .. import load_concept, train_residuals

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = load_concept(concept_folder(name), resolution=size)
    return train_residuals(pipe, data, config.train, name=name, progress=progress)


def grade_residuals(pipe, residuals, concept_name: str, config: BenchConfig, oracle=None,
                    prompts: list[str] | None = None, seconds: float | None = None) -> list[dict]:
    """Sample base / residuals / residuals + LAG on the same seeds and grade every image with the oracle.
    ``seconds``: the training time to report (else the set's ``meta['seconds']``, which a loaded file lacks)."""
    from ..sample import generate
    from .oracle import read

    concept = EXAMPLE_CONCEPTS[concept_name]
    prompts = [p.format(token=residuals.token, class_word=residuals.class_word) for p in (prompts or BENCH_PROMPTS)]
    common = dict(seed=config.seed, num_images=config.images_per_prompt, steps=config.steps,
                  guidance_scale=config.guidance_scale)
    images = {
        "base": generate(pipe, prompts, None, **common),
        "residuals": generate(pipe, prompts, residuals, lag=False, **common),
        "residuals+lag": generate(pipe, prompts, residuals, lag=True, lag_config=config.lag, **common),
    }
    readings = {m: read(imgs, oracle) for m, imgs in images.items()}
    mirrored = {m: mirrored_readings(imgs, concept, oracle) for m, imgs in images.items()}
    seconds = float(residuals.meta.get("seconds", float("nan")) if seconds is None else seconds)
    rows = []
    for method in METHODS:
        for row in grade(images[method], images["base"], readings[method], readings["base"], concept, prompts,
                         config.images_per_prompt, mirrored[method]):
            rows.append({"concept": concept_name, "method": method, **row, "train_seconds": seconds,
                         "parameters": residuals.num_parameters() if method != "base" else 0})
    return rows


def bench_concept(pipe, name: str, config: BenchConfig, oracle=None, progress: bool = False) -> list[dict]:
    """Train the concept's residuals, then grade the three methods; the residuals are removed afterwards."""
    from ..residuals import remove_residuals

    result = train_concept(pipe, name, config, progress)
    result.residuals.meta["seconds"] = result.seconds
    try:
        return grade_residuals(pipe, result.residuals, name, config, oracle)
    finally:
        remove_residuals(pipe.unet, result.residuals.name)


def summarize(rows: list[dict], methods: tuple[str, ...] = METHODS) -> list[dict]:
    """Mean of each measure per (concept, method), plus an 'all' concept row per method (in ``methods`` order)."""
    keys = sorted({(r["concept"], r["method"]) for r in rows}, key=lambda k: (k[0], methods.index(k[1])))
    keys += [("all", m) for m in methods if any(r["method"] == m for r in rows)]
    out = []
    for concept, method in keys:
        sel = [r for r in rows if r["method"] == method and (concept == "all" or r["concept"] == concept)]
        out.append({"concept": concept, "method": method, "n": len(sel),
                    **{k: float(np.nanmean([float(r[k]) for r in sel]))
                       for k in ("identity", "identity_colors", "scene", "class", "background_change",
                                 "train_seconds")}})
    return out


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` (dicts with the first row's keys) as CSV, in one rename (an interrupt keeps the old file)."""
    from ..atomic import atomic_path

    path = Path(path)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(summary: list[dict]) -> str:
    """A markdown table of the summary."""
    head = ("| concept | method | identity | identity + colours | scene | bg change | train s |\n"
            "|---|---|---|---|---|---|---|")
    lines = [f"| {r['concept']} | {r['method']} | {r['identity']:.0%} | {r['identity_colors']:.0%} | {r['scene']:.0%} | "
             f"{r['background_change']:.4f} | {r['train_seconds']:.1f} |" for r in summary]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prkit.world.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="world", help="the embedded world (default) or a world pipeline folder")
    parser.add_argument("--concepts", nargs="+", default=list(EXAMPLE_CONCEPTS), choices=list(EXAMPLE_CONCEPTS),
                        metavar="NAME", help=f"example concepts (default: all of {', '.join(EXAMPLE_CONCEPTS)})")
    parser.add_argument("--images-per-prompt", type=_positive_int, default=4, help="seeds per prompt (default 4)")
    parser.add_argument("--steps", type=_positive_int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--train-steps", type=_positive_int, default=150,
                        help="personalization steps per concept (default 150)")
    parser.add_argument("--rank", type=_rank, default=WORLD_RANK,
                        help="fraction of each block's channels (0 < r < 1) or a whole rank (e.g. 16)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default: the model folder's (prkit_defaults.json; the world: 1e-2), else 1e-3")
    parser.add_argument("--lag-threshold", default="median", choices=THRESHOLDS, help="LAG's cut (METHOD: median)")
    parser.add_argument("--lag-value", type=float, default=None,
                        help=f"the cut of --lag-threshold fixed, on the min-max normalized map (default "
                             f"{LAGConfig.value}); only with fixed")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu, ...")
    parser.add_argument("--out", default="benchmarks/world_bench.csv",
                        help="the summary CSV (default: %(default)s); the per-image rows go beside it as "
                             "NAME_rows.csv")
    parser.add_argument("--overwrite", action="store_true", help="replace --out and its rows file if they exist")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    rows_out = out.with_name(out.stem + "_rows.csv")
    if args.lag_value is not None and args.lag_threshold != "fixed":  # the other thresholds ignore it
        parser.error(f"--lag-value {args.lag_value:g} is the cut of --lag-threshold fixed; {args.lag_threshold} "
                     "does not use it: add --lag-threshold fixed, or leave --lag-value out")
    lag_value = LAGConfig.value if args.lag_value is None else args.lag_value
    try:  # before the model loads and every concept trains: nothing is lost at the end
        try:
            train = TrainConfig(steps=args.train_steps, rank=args.rank, learning_rate=args.learning_rate)
        except ValueError as err:
            raise ValueError(f"--learning-rate: {err}") from None
        try:
            lag = LAGConfig(threshold=args.lag_threshold, value=lag_value)
        except ValueError as err:
            raise ValueError(f"--lag-value: {err}") from None
        if out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a folder; give a CSV file name, e.g. {str(out / 'bench.csv')!r}")
        for path in (out, rows_out):
            if path.exists() and not args.overwrite:
                raise ValueError(f"--out: {str(path)!r} exists; pass --overwrite to replace it, or choose another name")
        _writable_folder(out.parent, "--out")
    except ValueError as err:
        parser.error(str(err))
    from ..pipeline import load_pipeline
    from .oracle import load_oracle

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    # a concept named twice runs once, in the order first named (as prkit eval's methods): it trained and was graded
    # twice, its rows counted twice in the summary
    config = BenchConfig(concepts=tuple(dict.fromkeys(args.concepts)), images_per_prompt=args.images_per_prompt,
                         steps=args.steps, train=train, lag=lag)
    oracle = load_oracle(pipe.unet.device)
    rows = []
    start = time.perf_counter()
    for name in config.concepts:
        rows += bench_concept(pipe, name, config, oracle, progress=True)
        write_csv(rows, rows_out)  # after each concept: an interruption keeps them
    summary = summarize(rows)
    write_csv(summary, out)
    print(format_table(summary))
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
