"""Evaluation of the world model: loading and sampling the pipeline, the base model read by the oracle
(``evaluate_base``), the ``eval`` stage, and the CPU speed bars of a pipeline folder (``cpu_speed``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .recipe_util import MODEL_DIR, RecipeConfig, _oracle_file, _Timer, log
from .render import caption, sample_scene
from .train_unet import tokenize
from .vocab import BACKGROUNDS


def load_world_pipeline(folder: Path, device: torch.device):
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance_scale: float = 7.5,
             batch: int = 100) -> np.ndarray:
    """(N, 64, 64, 3) uint8 samples; image i uses torch.Generator().manual_seed(seeds[i]) (CPU)."""
    outs = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        lat = torch.stack([torch.randn((4, 16, 16), generator=g) for g in gens]).to(pipe.device, pipe.unet.dtype)
        img = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance_scale, latents=lat,
                   output_type="np").images
        outs.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(outs)


def _rate(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def evaluate_base(pipe, n: int = 400, steps: int = 25, seed: int = 0, n_two: int = 100, oracle=None,
                  guidance_scale: float = 7.5, batch: int = 100, return_images: bool = False) -> dict:
    """Base model read by the oracle: n single-object prompts and n_two two-object prompts.

    Prompts are canonical captions (``caption(scene)``: 'a photo of a red ball on the grass') of
    scenes from ``sample_scene(rng, n_objects=k)`` with rng = default_rng([seed, 7, k]); image i
    starts from the latents of torch.Generator().manual_seed(seed * 100_000 + i).
    """
    from .oracle import load_oracle, read

    oracle = oracle if oracle is not None else load_oracle(str(pipe.device))
    res: dict = {"n": n, "n_two": n_two, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
                 "scheduler": type(pipe.scheduler).__name__}
    images = {}
    for k, count in ((1, n), (2, n_two)):
        if not count:
            continue
        rng = np.random.default_rng([seed, 7, k])
        scenes = [sample_scene(rng, n_objects=k) for _ in range(count)]
        prompts = [caption(s) for s in scenes]
        seeds = [seed * 100_000 + (0 if k == 1 else 50_000) + i for i in range(count)]
        imgs = generate(pipe, prompts, seeds, steps, guidance_scale, batch)
        images[k] = (prompts, imgs)
        reads = read(imgs, oracle=oracle)
        truth = [sorted(s.objects, key=lambda o: o.x) for s in scenes]
        bg = [r["background"] == s.background for r, s in zip(reads, scenes)]
        count_ok = [len(r["objects"]) == k for r in reads]
        if k == 1:
            cls = [r["objects"][0]["cls"] == t[0].cls for r, t in zip(reads, truth)]
            col = [r["objects"][0]["color"] == t[0].color for r, t in zip(reads, truth)]
            res["single"] = {"scene": _rate(bg), "class": _rate(cls), "color": _rate(col),
                             "all": _rate(a and b and c for a, b, c in zip(bg, cls, col)), "count": _rate(count_ok)}
            res["single"]["scene_by_background"] = {
                b: _rate(ok for ok, s in zip(bg, scenes) if s.background == b) for b in BACKGROUNDS}
            errors: dict[str, int] = {}
            for r, s in zip(reads, scenes):
                if r["background"] != s.background:
                    key = f"{s.background} -> {r['background']}"
                    errors[key] = errors.get(key, 0) + 1
            res["single"]["scene_errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1]))
        else:
            def slot_ok(r, t, s, key):
                return len(r["objects"]) > s and r["objects"][s][key] == getattr(t[s], key)

            cls = [[slot_ok(r, t, s, "cls") for s in (0, 1)] for r, t in zip(reads, truth)]
            col = [[slot_ok(r, t, s, "color") for s in (0, 1)] for r, t in zip(reads, truth)]
            both = [all(a) and all(b) for a, b in zip(cls, col)]
            unordered = [sorted((o["cls"], o["color"]) for o in r["objects"]) == sorted((o.cls, o.color) for o in t)
                         for r, t in zip(reads, truth)]
            res["two"] = {"scene": _rate(bg), "count": _rate(count_ok),
                          "class_per_object": _rate(x for c in cls for x in c),
                          "color_per_object": _rate(x for c in col for x in c),
                          "both_objects_correct_ordered": _rate(both), "both_objects_correct_any_order": _rate(unordered),
                          "all": _rate(a and b for a, b in zip(bg, both))}
    if return_images:
        res["_images"] = images
    return res


def _grid(imgs: np.ndarray, cols: int = 10) -> np.ndarray:
    rows = math.ceil(len(imgs) / cols)
    g = np.full((rows * 66, cols * 66, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        g[r * 66 + 1:r * 66 + 65, c * 66 + 1:c * 66 + 65] = im
    return g


def stage_eval(cfg: RecipeConfig, out: Path, device: torch.device) -> dict:
    from PIL import Image

    from .oracle import evaluate_oracle, load_oracle

    t = _Timer()
    oracle = load_oracle(str(device), _oracle_file(out))  # the shipped (fp16) weights
    info: dict = {"oracle_renders": evaluate_oracle(oracle, n=cfg.oracle_eval_n, seed=cfg.seed + 12345)}
    log.info("eval oracle on %d fresh renders: %s", cfg.oracle_eval_n, info["oracle_renders"])
    pipe = load_world_pipeline(out / "model", device)
    res = evaluate_base(pipe, n=cfg.eval_n, steps=cfg.eval_steps, seed=cfg.seed, n_two=cfg.eval_n_two, oracle=oracle,
                        guidance_scale=cfg.eval_guidance, batch=cfg.eval_batch, return_images=True)
    images = res.pop("_images")
    info["base"] = res
    log.info("eval base model: %s", res)
    if cfg.eval_guidance_alt is not None:
        alt = evaluate_base(pipe, n=cfg.eval_n, steps=cfg.eval_steps, seed=cfg.seed, n_two=cfg.eval_n_two,
                            oracle=oracle, guidance_scale=cfg.eval_guidance_alt, batch=cfg.eval_batch)
        info[f"base_guidance_{cfg.eval_guidance_alt:g}"] = alt
        log.info("eval base model at guidance %g: %s", cfg.eval_guidance_alt, alt)
    edir = out / "eval"
    edir.mkdir(exist_ok=True)
    for k, (prompts, imgs) in images.items():
        Image.fromarray(_grid(imgs[:50])).save(edir / f"samples_{k}obj.png")
        (edir / f"prompts_{k}obj.json").write_text(json.dumps(prompts[:50], indent=0))
    info["seconds"] = t()
    info["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return info


def cpu_speed(folder: Path = MODEL_DIR, threads: int = 2, reps: int = 3) -> dict:
    """Seconds on the CPU (fp32): one batch-4 training step with gradients to every proj_out
    (full backward through the UNet's activations), and 8 images x 25 steps with CFG + decode."""
    torch.set_num_threads(threads)
    pipe = load_world_pipeline(folder, torch.device("cpu"))
    unet = pipe.unet
    for p in unet.parameters():
        p.requires_grad_(False)
    targets = [m.weight for n, m in unet.named_modules() if n.endswith("proj_out")]
    for p in targets:
        p.requires_grad_(True)
    ids = tokenize(pipe.tokenizer, ["a photo of a sks ball"] * 4)
    x = torch.randn(4, 4, 16, 16)
    steps = []
    for _ in range(reps + 1):
        t = _Timer()
        with torch.no_grad():
            cond = pipe.text_encoder(ids)[0]
        unet(x, torch.randint(0, 1000, (4,)), cond).sample.pow(2).mean().backward()
        steps.append(t())
    for p in targets:
        p.requires_grad_(False)
    samples = []
    for _ in range(max(1, reps - 1)):
        t = _Timer()
        pipe(["a photo of a red ball on the grass"] * 8, num_inference_steps=25, guidance_scale=7.5, output_type="np")
        samples.append(t())
    return {"threads": threads, "train_step_s": min(steps[1:]), "train_step_s_all": steps,
            "sample8x25_cfg_s": min(samples), "sample_s_all": samples, "proj_out": len(targets)}
