"""Ablations on the embedded world: rank, target layers, training steps and LAG threshold, graded by the oracle.

Each variant is trained by the one loop and scored on identity (the concept's pattern
read back) and prompt accuracy (the scene read back). Used by notebook 05; CPU-sized by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..lag import LAGConfig
from ..train import TrainConfig
from .bench import identity, mirrored_readings, prompt_scene, write_csv
from .concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS, concept_folder


@dataclass
class AblationConfig:
    """The sweeps; the first entry of ``ranks`` and ``steps`` are the reference settings of the rank and target
    sweeps, ``step_counts`` the steps sweep's."""

    concept: str = "striped_ball"
    steps: int = 60
    ranks: tuple = (0.05, 0.25)
    targets: tuple = ("residuals", "attn_kv", "attn_out")
    step_counts: tuple = (30, 60)
    thresholds: tuple = ("median", "mean", "otsu", "soft")
    prompts: tuple = tuple(BENCH_PROMPTS[:4])
    images_per_prompt: int = 2
    sample_steps: int = 20
    seed: int = 0
    learning_rate: float = 1e-3  # one rate for every variant, so that targets and ranks compare like for like

    def __post_init__(self):
        """Every sweep is checked before the first variant trains (a bad last entry failed minutes in)."""
        from ..lag import THRESHOLDS
        from ..residuals import rank_for
        from ..targets import TARGETS

        if self.concept not in EXAMPLE_CONCEPTS:
            raise ValueError(f"AblationConfig.concept {self.concept!r} is not an example concept; use one of "
                             f"{', '.join(EXAMPLE_CONCEPTS)}")
        for name in ("ranks", "targets", "step_counts", "thresholds", "prompts"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or (
                    not value and name in ("ranks", "prompts")):
                raise ValueError(f"AblationConfig.{name} must be a non-empty list, got {value!r} (papermill: "
                                 f"-y '{name}: [a, b]', not -p {name} ...)")
            setattr(self, name, tuple(value))
        for i, rank in enumerate(self.ranks):
            try:
                rank_for(64, rank)
            except ValueError as err:
                raise ValueError(f"AblationConfig.ranks[{i}]: {err}") from None
        for name, known in (("targets", TARGETS), ("thresholds", THRESHOLDS)):
            unknown = [v for v in getattr(self, name) if not callable(v) and v not in known]
            if unknown:
                raise ValueError(f"AblationConfig.{name}: {unknown} unknown; use some of {', '.join(known)}")
        counts = (("steps", [self.steps]), ("step_counts", self.step_counts),  # the last two: generate refused
                  ("images_per_prompt", [self.images_per_prompt]), ("sample_steps", [self.sample_steps]))  # them late
        for name, values in counts:
            for i, steps in enumerate(values):
                if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                    where = f"{name}[{i}]" if name == "step_counts" else name
                    raise ValueError(f"AblationConfig.{where} must be a whole number >= 1, got {steps!r}")
        TrainConfig(seed=self.seed, learning_rate=self.learning_rate)  # names a bad seed or rate


def score(pipe, handle, config: AblationConfig, lag: bool = False, lag_config: LAGConfig | None = None,
          oracle=None) -> dict:
    """Identity and prompt accuracy of ``handle`` (residuals, or a peft adapter already active on the UNet)."""
    from ..residuals import Residuals
    from ..sample import generate
    from .oracle import read

    concept = EXAMPLE_CONCEPTS[config.concept]
    prompts = [p.format(token=concept.token, class_word=concept.class_word) for p in config.prompts]
    residuals = handle if isinstance(handle, Residuals) else None
    images = generate(pipe, prompts, residuals, lag=lag and residuals is not None, lag_config=lag_config,
                      seed=config.seed, num_images=config.images_per_prompt, steps=config.sample_steps)
    readings = read(images, oracle)
    mirrored = mirrored_readings(images, concept, oracle) or [None] * len(readings)
    scenes = [prompt_scene(p) for p in prompts for _ in range(config.images_per_prompt)]
    return {"identity": float(np.mean([identity(r, concept, m)[0] for r, m in zip(readings, mirrored)])),
            "prompt": float(np.mean([r["background"] == s for r, s in zip(readings, scenes)]))}


def run_ablations(pipe, config: AblationConfig, oracle=None, progress: bool = False) -> list[dict]:
    """Train and score every variant; one row per (sweep, value)."""
    from ..data import load_concept
    from ..residuals import Residuals, remove_residuals
    from ..train import train_residuals

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = load_concept(concept_folder(config.concept), resolution=size)
    rank0, steps0 = config.ranks[0], config.steps
    variants = [("rank", r, "residuals", r, steps0) for r in config.ranks]
    variants += [("target", t, t, rank0, steps0) for t in config.targets]
    variants += [("steps", s, "residuals", rank0, s) for s in config.step_counts]
    rows, cache = [], {}
    for sweep, value, target, rank, steps in variants:
        key = (target, rank, steps)
        if key not in cache:
            start = time.perf_counter()
            result = train_residuals(pipe, data, TrainConfig(steps=steps, rank=rank, target=target, seed=config.seed,
                                                                learning_rate=config.learning_rate),
                                     name=f"ablation_{len(cache)}", progress=progress)
            cache[key] = {**score(pipe, result.residuals, config, oracle=oracle),
                          "parameters": result.residuals.num_parameters(), "seconds": time.perf_counter() - start}
            if sweep == "rank" and rank == rank0:
                for method in config.thresholds:  # LAG thresholds on the reference residuals
                    rows.append({"sweep": "threshold", "value": method, "parameters": cache[key]["parameters"],
                                 **score(pipe, result.residuals, config, True, LAGConfig(threshold=method), oracle)})
            handle = result.residuals
            remove_residuals(pipe.unet, handle.name) if isinstance(handle, Residuals) else handle.remove()
        rows.append({"sweep": sweep, "value": value, **{k: cache[key][k] for k in ("identity", "prompt", "parameters")}})
    return rows


def write_rows(rows: list[dict], path) -> Path:
    """CSV of the ablation rows (all rows share the same columns)."""
    columns = ["sweep", "value", "identity", "prompt", "parameters"]
    return write_csv([{c: r.get(c, "") for c in columns} for r in rows], Path(path))
