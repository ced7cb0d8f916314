"""Evaluation harness: train every method on every subject with its recipe, sample, score, tabulate.

Owns the protocols (the world's benchmark, the DreamBooth and CustomConcept101 layouts), the (method, subject)
jobs and their split across processes (torchrun / accelerate launch: each rank writes its part, rank 0 merges),
the results CSV (one row per method, subject, prompt and seed; each finished pair written atomically and
skipped on re-runs) and the summary (mean, 95% interval). Metrics, training and sampling live elsewhere.

    prkit eval --protocol world --methods residuals lora textual_inversion --out runs/eval
    torchrun --nproc_per_node 2 -m prkit.evaluate --protocol dreambooth --data dreambooth/dataset --model DIR
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

PROTOCOLS = ("world", "dreambooth", "customconcept101")
METHODS = ("base", "residuals", "lora", "custom_diffusion", "textual_inversion", "dreambooth", "attn_kv", "attn_out")
DEFAULT_METHODS = ("residuals", "lora", "custom_diffusion", "textual_inversion", "dreambooth")
METRICS = ("identity", "identity_colors", "scene", "class", "background_change",  # the world's oracle
           "clip_i", "clip_t_dreambooth", "clip_t_clipscore", "dino")
COLUMNS = ["protocol", "target", "method", "subject", "prompt_index", "prompt", "seed", *METRICS,
           "parameters", "train_seconds", "train_steps"]
KEY = ("target", "method", "subject", "prompt_index", "seed")  # one row per key
LABELS = {"identity": "identity", "identity_colors": "identity + colours", "scene": "prompt (scene)", "class": "class",
          "background_change": "bg change", "clip_i": "CLIP-I", "clip_t_dreambooth": "CLIP-T raw cos (DreamBooth)",
          "clip_t_clipscore": "CLIP-T 2.5*max(cos,0) (CLIPScore)", "dino": "DINO"}
RESULTS, SUMMARY = "results.csv", "summary.csv"


@dataclass
class EvalConfig:
    """What an evaluation runs; every training recipe is the method's published one (``targets.RECIPES``)."""

    protocol: str = "world"  # world | dreambooth | customconcept101
    data: str | None = None  # dataset root for dreambooth / customconcept101
    model: str = "world"  # base pipeline: "world", a diffusers folder or a hub id
    methods: tuple[str, ...] = DEFAULT_METHODS  # "residuals" is sampled with and without LAG; "base" trains nothing
    subjects: tuple[str, ...] = ()  # empty: all of the protocol's subjects
    max_prompts: int | None = None  # only the first N prompts of each subject (smoke runs)
    images_per_prompt: int = 4  # seeds 0..N-1 of one generator per prompt
    sample_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0  # training and sampling seed
    token: str = "sks"  # identifier for dreambooth / customconcept101 (world concepts bring their own)
    train: dict = field(default_factory=dict)  # method -> recipe overrides, e.g. {"textual_inversion": {"steps": 500}}
    clip: str | None = "auto"  # hub id, folder or "world"; auto: "world" on the world, CLIP ViT-B/32 elsewhere
    dino: str | None = "auto"  # auto: DINO ViT-S/16; None: off
    download_backbones: bool = False  # fetch CLIP/DINO hub ids missing from the local cache (default: no network)
    out: str = "runs/eval"
    device: str = "auto"  # with several ranks, "auto" is cuda:LOCAL_RANK
    dtype: str | None = None  # pipeline dtype (None: bf16/fp16 on GPUs, fp32 elsewhere)
    save_images: bool = False  # PNGs under out/images/<method>/<subject>/
    ci_over: str = "image"  # 95% interval over images or over per-subject means ("subject")


@dataclass
class Subject:
    """One concept of a protocol: its words, its evaluation prompts (formatted) and how to load its images."""

    name: str
    token: str
    class_word: str
    prompts: list[str]
    load: Callable  # resolution -> prkit.data.Concept
    world: object = None  # the WorldConcept (world protocol)


# ----------------------------------------------------------------------------------------------- protocols

def load_customconcept101(root: str | Path, token: str = "sks") -> list[Subject]:
    """Subjects of a CustomConcept101 folder.

    Assumed layout (that of the customconcept101 folder of adobe-research/custom-diffusion): ``root/dataset.json``,
    a list of {"instance_data_dir", "class_prompt", "prompt_filename"} with paths relative to ``root``; each
    prompt file has one prompt per line with ``{}`` where the concept goes ("{} swimming in a pool."). ``{}``
    becomes "<token> <class_prompt>" (our identifier instead of their "<new1>"). Without dataset.json: one
    folder per concept holding its images, a ``prompts.txt`` and a ``concept.json`` with "class_word".
    The subject's name is its image folder's name.
    """
    from .data import ConceptDataError, load_concept

    root = Path(root)
    spec = root / "dataset.json"
    entries = []
    if spec.is_file():
        for item in json.loads(spec.read_text()):
            entries.append((root / item["instance_data_dir"], item["class_prompt"], root / item["prompt_filename"]))
    elif root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "prompts.txt").is_file()):
            meta = folder / "concept.json"
            if not meta.is_file():
                raise ConceptDataError(f"'{meta}' is missing: it must give the concept's class_word")
            entries.append((folder, json.loads(meta.read_text())["class_word"], folder / "prompts.txt"))
    if not entries:
        raise ConceptDataError(f"no CustomConcept101 concepts under '{root}': expected dataset.json or concept "
                               "folders each with prompts.txt and concept.json")
    subjects = []
    for folder, class_word, prompt_file in entries:
        if not prompt_file.is_file():
            raise ConceptDataError(f"prompt file '{prompt_file}' of concept '{folder.name}' is missing")
        lines = [ln.strip() for ln in prompt_file.read_text().splitlines() if ln.strip()]
        prompts = [ln.replace("{}", f"{token} {class_word}") for ln in lines]

        def load(resolution: int, folder=folder, class_word=class_word):
            return load_concept(folder, token, class_word, resolution)
        subjects.append(Subject(folder.name, token, class_word, prompts, load))
    return subjects


def load_subjects(config: EvalConfig) -> list[Subject]:
    """The protocol's subjects (only ``config.subjects`` when given), prompts cut to ``config.max_prompts``."""
    from .data import load_concept

    if config.protocol == "world":
        from .world.concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS, concept_folder

        subjects = []
        for name, c in EXAMPLE_CONCEPTS.items():
            prompts = [p.format(token=c.token, class_word=c.class_word) for p in BENCH_PROMPTS]

            def load(resolution: int, name=name):
                return load_concept(concept_folder(name), resolution=resolution)
            subjects.append(Subject(name, c.token, c.class_word, prompts, load, world=c))
    elif config.protocol == "dreambooth":
        from .data import load_dreambooth

        if not config.data:
            raise ValueError("the dreambooth protocol needs --data: the DreamBooth dataset folder")
        ds = load_dreambooth(config.data)
        subjects = []
        for name in sorted(ds.subjects):
            def load(resolution: int, name=name):
                return ds.concept(name, config.token, resolution)
            s = ds.subjects[name]
            subjects.append(Subject(name, config.token, s.class_word, ds.prompts(name, config.token), load))
    elif config.protocol == "customconcept101":
        if not config.data:
            raise ValueError("the customconcept101 protocol needs --data: the CustomConcept101 folder")
        subjects = load_customconcept101(config.data, config.token)
    else:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {config.protocol!r}")
    if config.subjects:
        known = {s.name for s in subjects}
        missing = [n for n in config.subjects if n not in known]
        if missing:
            raise ValueError(f"unknown subjects {missing}; this protocol has: {', '.join(sorted(known))}")
        subjects = [s for s in subjects if s.name in config.subjects]
    for s in subjects:
        s.prompts = s.prompts[:config.max_prompts] if config.max_prompts else s.prompts
    return subjects


def variants(method: str) -> list[tuple[str, bool]]:
    """The sampled variants of a trained method: (row label, LAG on)."""
    return [("residuals", False), ("residuals+lag", True)] if method == "residuals" else [(method, False)]


# ------------------------------------------------------------------------------------------ jobs and shards

def job_list(methods: Sequence[str], subjects: Sequence[str]) -> list[tuple[str, str]]:
    """Every (method, subject) pair, method-major."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    return [(m, s) for m in methods for s in subjects]


def job_cost(method: str, config: EvalConfig, prompts: int) -> float:
    """A rough relative cost of one job (training image-steps plus sampling), for balancing shards."""
    from .targets import recipe

    sampling = prompts * config.images_per_prompt * config.sample_steps * len(variants(method)) * 2  # CFG: x2
    if method == "base":
        return float(sampling)
    r = recipe(method, **config.train.get(method, {}))
    weight = {"dreambooth": 3.0, "custom_diffusion": 1.3}.get(method, 1.0)  # full backward + optimizer state
    return r["steps"] * r["batch_size"] * 3 * weight + sampling  # a training step ~ 3 forward passes


def shard(jobs: Sequence, rank: int, world_size: int, cost: Callable | None = None) -> list:
    """This rank's share of ``jobs``, the same on every rank (deterministic).

    Args:
        jobs: the full job list, in the same order on every rank.
        rank, world_size: this process and how many there are.
        cost: job -> relative cost; given, jobs go longest first to the least loaded rank (LPT), else round-robin.
    Returns:
        the rank's jobs, in the list's order.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if cost is None:
        return list(jobs[rank::world_size])
    load = [0.0] * world_size
    owner = {}
    for i in sorted(range(len(jobs)), key=lambda i: (-cost(jobs[i]), i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += cost(jobs[i])
    return [job for i, job in enumerate(jobs) if owner[i] == rank]


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun, accelerate); (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


# -------------------------------------------------------------------------------------------------- files

def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV (strings), [] when it does not exist."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(value) -> str:
    value = value.item() if hasattr(value, "item") else value  # numpy / torch scalars
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return repr(float(value)) if isinstance(value, float) else str(value)


def write_rows(path: Path, rows: list[dict], columns: Sequence[str] = COLUMNS) -> Path:
    """Write rows atomically (temporary file, fsync, rename): readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def append_rows(path: Path, rows: list[dict]) -> Path:
    """Add one finished pair's rows to ``path`` as one atomic replacement of the file."""
    return write_rows(path, read_rows(path) + rows)


def _part_files(out: Path) -> list[Path]:
    return sorted((out / "parts").glob("*.csv")) if (out / "parts").is_dir() else []


def finished_pairs(out: str | Path) -> set[tuple[str, str]]:
    """(method, subject) pairs with rows in ``out``'s results CSV or in any rank's part file."""
    out = Path(out)
    return {(r["target"], r["subject"]) for p in [out / RESULTS, *_part_files(out)] for r in read_rows(p)}


def merge(out: str | Path) -> list[dict]:
    """Fold every part file into results.csv (one row per key, sorted), then delete the parts; returns the rows."""
    out = Path(out)
    parts = _part_files(out)
    rows: dict[tuple, dict] = {}
    for path in [out / RESULTS, *parts]:
        for r in read_rows(path):
            rows[tuple(r[k] for k in KEY)] = r
    order = {m: i for i, m in enumerate(METHODS)}
    merged = sorted(rows.values(), key=lambda r: (order.get(r["target"], 99), r["method"], r["subject"],
                                                  int(r["prompt_index"]), int(r["seed"])))
    write_rows(out / RESULTS, merged)
    for path in parts:
        path.unlink()
    return merged


# ---------------------------------------------------------------------------------------------- summary

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile (a table, conservative between its entries; 1.96 beyond 120)."""
    if df < 1:
        return float("nan")
    if df > 120:
        return 1.96
    return _T975[max(k for k in _T975 if k <= df)]  # the next smaller tabulated df: a slightly wider interval


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) of the finite values; NaN where undefined."""
    xs = [float(v) for v in values if v == v and not math.isinf(float(v))]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return mean, t975(len(xs) - 1) * sd / math.sqrt(len(xs))


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def summarize(rows: list[dict], ci_over: str = "image") -> list[dict]:
    """Per method: images, subjects, mean trainable parameters and training seconds, and mean and 95%
    interval of every metric (over images, or over per-subject means with ``ci_over="subject"``)."""
    if ci_over not in ("image", "subject"):
        raise ValueError(f"ci_over must be 'image' or 'subject', got {ci_over!r}")
    order = {m: i for i, m in enumerate(METHODS)}
    methods = sorted({r["method"] for r in rows}, key=lambda m: (order.get(m.split("+")[0], 99), m))
    out = []
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        subjects = sorted({r["subject"] for r in sel})
        per_subject = [next(r for r in sel if r["subject"] == s) for s in subjects]
        summary = {"method": method, "images": len(sel), "subjects": len(subjects),
                   "parameters": mean_ci([_num(r["parameters"]) for r in per_subject])[0],
                   "train_seconds": mean_ci([_num(r["train_seconds"]) for r in per_subject])[0]}
        for m in METRICS:
            if ci_over == "image":
                values = [_num(r.get(m)) for r in sel]
            else:
                values = [mean_ci([_num(r.get(m)) for r in sel if r["subject"] == s])[0] for s in subjects]
            summary[m], summary[f"{m}_ci95"] = mean_ci(values)
        out.append(summary)
    return out


def format_table(summary: list[dict], unavailable: dict[str, str] | None = None, ci_over: str = "image") -> str:
    """A markdown table of the summary (metrics with no value in any row are left out), reasons as notes."""
    shown = [m for m in METRICS if any(s[m] == s[m] for s in summary)]
    head = ["method", "subjects", "images", *[LABELS[m] for m in shown], "trainable params", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["method"], str(s["subjects"]), str(s["images"])]
        for m in shown:
            ci = s[f"{m}_ci95"]
            cells.append(f"{s[m]:.4f}" + (f" ± {ci:.4f}" if ci == ci else ""))
        cells += [f"{s['parameters']:,.0f}", f"{s['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"\n± : 95% t-interval over {'images' if ci_over == 'image' else 'per-subject means'}. "
             "CLIP-T is given in both conventions, as labelled."]
    notes += [f"- {name} unavailable: {reason}" for name, reason in (unavailable or {}).items() if reason]
    return "\n".join(lines + notes) + "\n"


# ---------------------------------------------------------------------------------------------- scoring

def strip_token(prompt: str, token: str) -> str:
    """The prompt without the identifier ("a photo of a sks dog" -> "a photo of a dog"), as CLIP-T reads it."""
    return re.sub(rf"\s*\b{re.escape(token)}\b", "", prompt).strip()


def _reference_images(concept) -> list:
    """The concept's original reference images (full size, EXIF-rotated) when its files exist, else its crops."""
    from PIL import Image, ImageOps

    paths = [p for p in concept.paths if Path(p).is_file()]
    if len(paths) != len(concept.images):
        return list(concept.images)
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(ImageOps.exif_transpose(im).convert("RGB"))
    return out


class Scorer:
    """Holds the metric backbones (or why each is unavailable) and the oracle, and scores one job's images."""

    def __init__(self, config: EvalConfig, device, oracle=None, need_oracle: bool = True):
        from .metrics import DEFAULT_CLIP, DEFAULT_DINO, WORLD, try_load_clip, try_load_dino

        clip = {"auto": WORLD if config.protocol == "world" else DEFAULT_CLIP}.get(config.clip, config.clip)
        dino = {"auto": DEFAULT_DINO}.get(config.dino, config.dino)
        get = config.download_backbones
        self.clip, clip_reason = try_load_clip(clip, device, get) if clip else (None, "switched off")
        self.dino, dino_reason = try_load_dino(dino, device, get) if dino else (None, "switched off")
        self.unavailable = {"CLIP-I/CLIP-T": clip_reason, "DINO": dino_reason}
        for name, reason in self.unavailable.items():
            if reason:
                log.warning("%s unavailable: %s", name, reason)
        self.oracle = oracle
        if config.protocol == "world" and oracle is None and need_oracle:
            from .world.oracle import load_oracle

            self.oracle = load_oracle(device)
        self._refs: dict[str, tuple] = {}

    def _ref(self, subject: Subject, concept) -> tuple:
        if subject.name not in self._refs:
            images = _reference_images(concept)
            self._refs[subject.name] = (self.clip.embed_images(images) if self.clip else None,
                                        self.dino.embed_images(images) if self.dino else None)
        return self._refs[subject.name]

    def score(self, subject: Subject, concept, images: list[list], base: list[list] | None) -> list[dict]:
        """Rows (prompt_index, prompt, seed, metrics) for ``images[prompt][seed]``; ``base`` as for the world."""
        from . import metrics

        per = len(images[0])
        flat = [im for group in images for im in group]
        rows = [{"prompt_index": i, "prompt": p, "seed": j} for i, p in enumerate(subject.prompts) for j in range(per)]
        if self.oracle is not None and subject.world is not None:
            from .world.bench import grade
            from .world.oracle import read

            side = 64  # the oracle reads (and masks) 64x64 images: grade at that size
            gen64 = [im if im.size == (side, side) else im.resize((side, side)) for im in flat]
            base64 = [im if im.size == (side, side) else im.resize((side, side)) for group in base for im in group]
            graded = grade(gen64, base64, read(gen64, self.oracle), read(base64, self.oracle), subject.world,
                           subject.prompts, per)
            for row, g in zip(rows, graded):
                row.update({k: g[k] for k in ("identity", "identity_colors", "scene", "class", "background_change")})
        clip_ref, dino_ref = self._ref(subject, concept)
        if self.clip is not None:
            gen = self.clip.embed_images(flat)
            texts = self.clip.embed_texts([strip_token(p, subject.token) for p in subject.prompts])
            texts = texts.repeat_interleave(per, dim=0)  # (N, D): each image's prompt
            scores = {"clip_i": metrics.clip_i(gen, clip_ref, reduce=False),
                      "clip_t_dreambooth": metrics.clip_t(gen, texts, "dreambooth", reduce=False),
                      "clip_t_clipscore": metrics.clip_t(gen, texts, "clipscore", reduce=False)}
            for k, v in scores.items():
                for row, x in zip(rows, v.tolist()):
                    row[k] = x
        if self.dino is not None:
            for row, x in zip(rows, metrics.dino(self.dino.embed_images(flat), dino_ref, reduce=False).tolist()):
                row["dino"] = x
        return rows


# ------------------------------------------------------------------------------------------------ running

def _train_config(method: str, subject: Subject, config: EvalConfig, resolution: int):
    from .data import load_concept
    from .targets import recipe
    from .train import TrainConfig

    overrides = dict(config.train.get(method, {}))
    prior = overrides.get("prior_images")
    if isinstance(prior, str):  # a folder of class images; "{subject}" is replaced by the subject's name
        overrides["prior_images"] = load_concept(prior.format(subject=subject.name), subject.token,
                                                 subject.class_word, resolution)
    return TrainConfig(**{"seed": config.seed, **recipe(method, **overrides)})


def run_job(pipe, subject: Subject, method: str, config: EvalConfig, scorer: Scorer,
            base_images: dict | None = None) -> list[dict]:
    """Train ``method`` on ``subject`` (none for "base"), sample every variant, score; the model is restored after.

    Args:
        base_images: a per-process cache subject -> base-model images (the world's background reference;
            unused by the other protocols).
    Returns:
        one row per (variant, prompt, seed), every column of ``COLUMNS``.
    """
    from .residuals import Residuals
    from .sample import generate
    from .train import train_residuals

    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    concept = subject.load(resolution)
    sample = dict(seed=config.seed, num_images=config.images_per_prompt, steps=config.sample_steps,
                  guidance_scale=config.guidance_scale)

    def images_of(handle, lag: bool) -> list[list]:
        residuals = handle if isinstance(handle, Residuals) else None
        return [generate(pipe, p, residuals, lag=lag and residuals is not None, **sample) for p in subject.prompts]

    base = None
    if config.protocol == "world" or method == "base":  # the world compares every method's images with these
        cache = base_images if base_images is not None and config.protocol == "world" else {}
        if subject.name not in cache:
            cache[subject.name] = images_of(None, False)
        base = cache[subject.name]
    handle, seconds, steps = None, 0.0, 0
    rows = []
    try:
        if method != "base":
            result = train_residuals(pipe, concept, _train_config(method, subject, config, resolution), name="trained",
                                     progress=False)
            handle, seconds, steps = result.residuals, result.seconds, result.steps_done
            if hasattr(handle, "after_training"):
                handle.after_training()
        params = handle.num_parameters() if handle is not None else 0
        for label, lag in variants(method):
            images = base if method == "base" else images_of(handle, lag)
            if config.save_images:
                folder = Path(config.out) / "images" / label / subject.name
                folder.mkdir(parents=True, exist_ok=True)
                for i, group in enumerate(images):
                    for j, im in enumerate(group):
                        im.save(folder / f"{i:02d}_{j}.png")
            for row in scorer.score(subject, concept, images, base if config.protocol == "world" else None):
                rows.append({"protocol": config.protocol, "target": method, "method": label, "subject": subject.name,
                             **row, "parameters": params, "train_seconds": seconds, "train_steps": steps})
    finally:
        if handle is not None:
            handle.remove()
    return rows


def _device(config: EvalConfig, local_rank: int, world_size: int):
    import torch

    from .pipeline import resolve_device

    if config.device == "auto" and world_size > 1 and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return resolve_device(config.device)


def _group(world_size: int):
    """A gloo process group for the two barriers (CPU-only: works on any launcher and device); None alone."""
    if world_size == 1:
        return None
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=72))
    return dist


def evaluate(config: EvalConfig, pipe=None, *, oracle=None, progress: bool = True) -> list[dict]:
    """Run this process's share of the evaluation; the only or rank-0 process then merges and summarizes.

    Args:
        config: what to run; its ``out`` folder collects results.csv, summary.csv, summary.md and run.json.
        pipe: a loaded pipeline (default: ``load_pipeline(config.model)`` on this rank's device).
        oracle: the world's oracle (default: the shipped one, for the world protocol).
    Returns:
        the summary rows (one per method label) on rank 0, [] on the other ranks.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    rank, world_size, local_rank = dist_env()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    subjects = {s.name: s for s in load_subjects(config)}
    jobs = job_list(config.methods, list(subjects))
    dist = _group(world_size)
    done = finished_pairs(out)
    if dist is not None:
        dist.barrier()  # every rank has read the finished pairs before any rank writes
    todo = [j for j in jobs if j not in done]
    mine = shard(todo, rank, world_size, cost=lambda j: job_cost(j[0], config, len(subjects[j[1]].prompts)))
    part = out / RESULTS if world_size == 1 else out / "parts" / f"rank{rank:03d}-of-{world_size:03d}.csv"
    log.info("rank %d/%d: %d of %d jobs (%d done before)", rank, world_size, len(mine), len(jobs),
             len(done & set(jobs)))
    scorer = None
    if mine:
        device = _device(config, local_rank, world_size)
        if pipe is None:
            from .pipeline import load_pipeline

            pipe = load_pipeline(config.model, device=device, dtype=config.dtype)
            pipe.set_progress_bar_config(disable=True)
        scorer = Scorer(config, pipe.unet.device, oracle)
        base_images: dict = {}
        for method, name in tqdm(mine, desc=f"eval rank {rank}", disable=not progress):
            rows = run_job(pipe, subjects[name], method, config, scorer, base_images)
            append_rows(part, rows)  # the pair is finished once its rows are in
            log.info("%s on %s: %d rows", method, name, len(rows))
            _free(pipe)
    if dist is not None:
        dist.barrier()  # every part is written
    if rank != 0:
        return []
    rows = merge(out)
    unavailable = (scorer or Scorer(config, "cpu", need_oracle=False)).unavailable
    summary = summarize(rows, config.ci_over)
    write_rows(out / SUMMARY, summary, columns=list(summary[0]) if summary else ["method"])
    (out / "summary.md").write_text(format_table(summary, unavailable, config.ci_over))
    run = {"config": asdict(config), "world_size": world_size, "seconds": time.perf_counter() - start,
           "unavailable": unavailable, "jobs": len(jobs)}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    return summary


def _free(pipe) -> None:
    import gc

    import torch

    gc.collect()
    if pipe.unet.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- CLI

def _parse_set(items: Sequence[str]) -> dict:
    """["textual_inversion.steps=500", ...] -> {"textual_inversion": {"steps": 500}}."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, field_name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set wants METHOD.FIELD=VALUE (e.g. textual_inversion.steps=500), got {item!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(method, {})[field_name] = parsed
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation options (shared by ``prkit eval`` and ``python -m prkit.evaluate``)."""
    d = EvalConfig()
    parser.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol)
    parser.add_argument("--data", default=None, help="dataset folder (dreambooth, customconcept101)")
    parser.add_argument("--model", default=d.model, help="'world', a diffusers folder or a hub id")
    parser.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS)
    parser.add_argument("--subjects", nargs="*", default=[], help="default: all of the protocol's")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--images-per-prompt", type=int, default=d.images_per_prompt)
    parser.add_argument("--sample-steps", type=int, default=d.sample_steps)
    parser.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--token", default=d.token)
    parser.add_argument("--set", dest="train", nargs="*", default=[], metavar="METHOD.FIELD=VALUE",
                        help="recipe overrides, e.g. textual_inversion.steps=500 "
                             "dreambooth.prior_images=class_images/{subject}")
    parser.add_argument("--clip", default=d.clip, help="hub id, folder, 'world', 'auto' or 'none'")
    parser.add_argument("--dino", default=d.dino, help="hub id, folder, 'auto' or 'none'")
    parser.add_argument("--download-backbones", action="store_true",
                        help="fetch CLIP/DINO hub ids missing from the local cache")
    parser.add_argument("--out", default=d.out)
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--save-images", action="store_true")
    parser.add_argument("--ci-over", choices=("image", "subject"), default=d.ci_over)
    return parser


def config_from_args(args) -> EvalConfig:
    none = lambda v: None if v in (None, "none", "None", "") else v  # noqa: E731
    return EvalConfig(protocol=args.protocol, data=args.data, model=args.model, methods=tuple(args.methods),
                      subjects=tuple(args.subjects), max_prompts=args.max_prompts,
                      images_per_prompt=args.images_per_prompt, sample_steps=args.sample_steps,
                      guidance_scale=args.guidance_scale, seed=args.seed, token=args.token,
                      train=_parse_set(args.train), clip=none(args.clip), dino=none(args.dino), out=args.out,
                      device=args.device, dtype=args.dtype, save_images=args.save_images, ci_over=args.ci_over,
                      download_backbones=args.download_backbones)


def run_from_args(args) -> int:
    """Run an evaluation from parsed arguments; rank 0 prints the summary table."""
    config = config_from_args(args)
    summary = evaluate(config)
    if dist_env()[0] == 0:
        print((Path(config.out) / "summary.md").read_text() if summary else "no results")
        print(f"wrote {Path(config.out) / RESULTS} and {Path(config.out) / SUMMARY}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prkit.evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
