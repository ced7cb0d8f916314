"""Captioned scene pools of the world recipe: deterministic chunked rendering (``render_pool``) and
the ``data`` stage that saves the diffusion and VAE pools to DIR/data.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np

from .recipe_util import RecipeConfig, _Timer, log
from .render import caption, render, sample_scene
from .vocab import COLOR_NAMES, PATTERNS


def _render_chunk(args: tuple) -> tuple[np.ndarray, list[str]]:
    """Render images [start, start + n) of pool `kind`; deterministic from (seed, kind, chunk index).

    patterns: False (no patterns), True (``sample_scene(patterns=True)``: each object patterned with
    probability 1/2), "all" (as True, then every plain object gets a random pattern and colour2), or a
    float p: each object patterned with probability p, never as one of the example concepts (captions
    name the pattern: "a red and white striped ball").
    """
    seed, kind, index, n, patterns, drop_colors, drop_attributes, drop_attributes_patterned = args
    rng = np.random.default_rng([seed, kind, index])
    images = np.zeros((n, 64, 64, 3), np.uint8)
    captions = []
    for i in range(n):
        if isinstance(patterns, float):
            scene = sample_scene(rng)
            for obj in scene.objects:
                if rng.random() < patterns:
                    _random_pattern(obj, rng)
        else:
            scene = sample_scene(rng, patterns=bool(patterns))
        if patterns == "all":
            for obj in scene.objects:
                if obj.pattern is None:
                    obj.pattern = PATTERNS[rng.integers(len(PATTERNS))]
                    others = [c for c in COLOR_NAMES if c != obj.color]
                    obj.color2 = others[rng.integers(len(others))]
        captions.append(caption(scene, rng, drop_colors=drop_colors, drop_attributes=drop_attributes,
                                drop_attributes_patterned=drop_attributes_patterned))
        images[i] = render(scene, seed=int(rng.integers(2**31)))[0]
    return images, captions


@functools.cache
def _held_out() -> frozenset[tuple]:
    from .concepts import EXAMPLE_CONCEPTS

    return frozenset((c.class_word, c.pattern, frozenset(c.colors)) for c in EXAMPLE_CONCEPTS.values())


def _random_pattern(obj, rng: np.random.Generator) -> None:
    """Give obj a random pattern and second colour that is not one of the example concepts."""
    held_out = _held_out()
    while True:
        obj.pattern = PATTERNS[rng.integers(len(PATTERNS))]
        others = [c for c in COLOR_NAMES if c != obj.color]
        obj.color2 = others[rng.integers(len(others))]
        if (obj.cls, obj.pattern, frozenset((obj.color, obj.color2))) not in held_out:
            return


def render_pool(seed: int, kind: int, n: int, chunk: int, patterns: bool | str, workers: int,
                drop_colors: float = 0.0, drop_attributes: float = 0.0,
                drop_attributes_patterned: float | None = None) -> tuple[np.ndarray, list[str]]:
    """Render a pool of n captioned scenes (chunked so that the result does not depend on workers)."""
    jobs = [(seed, kind, i, min(chunk, n - i * chunk), patterns, drop_colors, drop_attributes, drop_attributes_patterned)
            for i in range(math.ceil(n / chunk))]
    images = np.zeros((n, 64, 64, 3), np.uint8)
    captions: list[str] = []
    if workers > 1 and len(jobs) > 1:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers) as pool:
            results = pool.imap(_render_chunk, jobs, chunksize=1)
            for (imgs, caps), job in zip(results, jobs):
                images[job[2] * chunk:job[2] * chunk + len(imgs)] = imgs
                captions += caps
    else:
        for job in jobs:
            imgs, caps = _render_chunk(job)
            images[job[2] * chunk:job[2] * chunk + len(imgs)] = imgs
            captions += caps
    return images, captions


def stage_data(cfg: RecipeConfig, out: Path) -> dict:
    t = _Timer()
    workers = cfg.workers if cfg.workers is not None else min(16, os.cpu_count() or 1)
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    imgs, caps = render_pool(cfg.seed, 0, cfg.n_images, cfg.chunk, float(cfg.caption_patterns) or False, workers,
                             cfg.caption_drop_colors, cfg.caption_drop_attributes,
                             cfg.caption_drop_attributes_patterned)
    np.save(d / "images.npy", imgs)
    (d / "captions.json").write_text(json.dumps(caps))
    pimgs, _ = render_pool(cfg.seed, 1, cfg.n_pattern_images, cfg.chunk, "all" if cfg.pattern_all else True, workers)
    np.save(d / "pattern_images.npy", pimgs)
    info = {"n_images": len(imgs), "n_pattern_images": len(pimgs), "workers": workers, "seconds": t(),
            "two_object_fraction": float(np.mean([" next to " in c for c in caps])),
            "empty_captions": 0, "example_captions": caps[:5]}
    log.info("data: %d + %d images in %.1fs", len(imgs), len(pimgs), t())
    return info


def _load_images(out: Path, name: str) -> np.ndarray:
    return np.load(out / "data" / name, mmap_mode="r")
