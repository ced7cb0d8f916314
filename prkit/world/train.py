"""Recipe of the embedded world model: renders -> VAE -> UNet + text encoder -> diffusers pipeline.

``python -m prkit.world.train --stage {data,vae,oracle,unet,export,eval,all} --out DIR --seed 0
[--minutes N] [--resume] [--device cuda] [--ship]``

Stages (each reads what the earlier ones left in DIR; each stops gracefully within ``--minutes``):
- data:   pre-render a fixed pool of captioned scenes (half the objects patterned and captioned so,
          "a red and white striped ball", never as an example concept) for the diffusion model and a
          pool rendered with ``patterns=True`` for the VAE (multiprocessing, deterministic per chunk).
- vae:    train a small AutoencoderKL (64x64x3 -> 16x16x4) on both pools; set ``scaling_factor``
          to 1 / std of its latents.
- oracle: ``prkit.world.oracle.train_oracle`` (the oracle's own code) and save it (fp16).
- unet:   encode the diffusion pool once, then train UNet2DConditionModel + CLIPTextModel jointly
          from scratch on latents (bf16 autocast, EMA, min-SNR weighting, 10% caption dropout);
          ``--resume`` continues from DIR/ckpt; ``--init-from FOLDER`` warm-starts from a pipeline.
- export: EMA weights -> fp16 StableDiffusionPipeline folder DIR/model (DPM-Solver++ default).
- eval:   oracle accuracy on 2,000 fresh renders; base model on 400 single-object and 100
          two-object prompts read by the oracle (``evaluate_base``).
``--ship`` copies DIR/model to prkit/world/model and the oracle to prkit/world/oracle/.
Identifier tokens never occur in captions and token embeddings get no weight decay, so their
embeddings keep their random initialisation. See RECIPE.md for the shipped run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .render import caption, render, sample_scene
from .vocab import BACKGROUNDS, COLOR_NAMES, PATTERNS

log = logging.getLogger("prkit.world.train")

WORLD_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = WORLD_DIR / "tokenizer"
MODEL_DIR = WORLD_DIR / "model"
ORACLE_FILE = WORLD_DIR / "oracle" / "oracle.safetensors"
STAGES = ("data", "vae", "oracle", "oracle_vae", "unet", "export", "eval")
SIZE_LIMIT_MB = 30.0  # pipeline folder + oracle
PROVENANCE = "prkit_world.json"  # recipe provenance written into the exported pipeline folder


# ---------------------------------------------------------------------------- configuration
def vae_config() -> dict:
    """AutoencoderKL: 64x64x3 -> 16x16x4 (three blocks, two downsamples)."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                block_out_channels=(32, 64, 128), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32, scaling_factor=1.0)


def unet_config() -> dict:
    """SD1-style UNet on 16x16 latents: cross-attention at 16x16, 8x8 and the 4x4 mid block.

    ``attention_head_dim`` is, as in SD1, diffusers' (mis)name for the number of heads: 2/4/6
    heads of dimension 32. 1x1-conv proj_out (use_linear_projection=False), as SD1.x.
    """
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(64, 128, 192),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=128, attention_head_dim=(2, 4, 6), use_linear_projection=False,
                norm_num_groups=32)


def text_config(tokenizer) -> dict:
    """CLIPTextConfig kwargs: 4 layers of width 128 over the world tokenizer."""
    return dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, projection_dim=128)


def scheduler_config() -> dict:
    """The SD1 noise schedule (training: DDPM, 1000 steps, epsilon prediction)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, steps_offset=1)


@dataclass
class RecipeConfig:
    """Every knob of the recipe. ``smoke()`` gives a CPU-sized variant for tests."""

    seed: int = 0
    # data
    n_images: int = 300_000  # diffusion pool (captioned)
    caption_patterns: float = 0.5  # chance that an object of the diffusion pool is patterned (and captioned so);
    # 0 gives the pattern-free world of run 1-2. The example concepts (class, pattern, colours) never occur.
    n_pattern_images: int = 100_000  # VAE-only pool rendered with patterns=True
    pattern_all: bool = True  # ... and then a pattern on every object (the first run had False: half of them)
    chunk: int = 2_000  # images per deterministic render chunk
    workers: int | None = None  # render processes (None: cpu_count, at most 16)
    # vae
    vae_minutes: float = 2.0
    vae_steps: int | None = None  # None: as many as fit in vae_minutes
    vae_batch: int = 256
    vae_lr: float = 5e-4
    vae_kl: float = 1e-6  # weight of the per-element KL (mean) against per-element L1
    vae_edge: float = 0.5  # L1 between image gradients (sharp pattern edges)
    vae_mse: float = 1.0
    # oracle
    oracle_steps: int = 4000
    oracle_batch: int = 256
    oracle_eval_n: int = 2000
    oracle_workers: int | None = None  # render processes (None: cpu_count - 3 on CUDA, leaves cores to a parallel stage)
    # oracle_vae: fine-tune the oracle's global MLP + heads on renders passed through the world VAE
    oracle_vae_pool: int = 1500  # renders round-tripped through the VAE once
    oracle_vae_steps: int = 300
    oracle_vae_batch: int = 64  # half VAE round trips from the pool, half fresh renders
    oracle_vae_lr: float = 5e-5  # Adam's first steps move every weight by ~lr: keep it small for a fine-tune
    oracle_vae_eval_n: int = 400  # fresh renders (other seeds) round-tripped for the report
    # unet + text encoder
    unet_minutes: float = 5.0
    unet_steps: int | None = None
    unet_batch: int = 1024
    unet_lr: float = 5e-4
    unet_warmup: int = 500
    resume_warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.9995
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    grad_clip: float = 1.0
    ckpt_minutes: float = 2.0  # checkpoint period
    # eval
    eval_n: int = 400
    eval_n_two: int = 100
    eval_steps: int = 25
    eval_guidance: float = 7.5
    eval_guidance_alt: float | None = 4.0  # also report the base model at this guidance scale
    eval_batch: int = 100
    log_every: int = 200

    @staticmethod
    def smoke(seed: int = 0) -> "RecipeConfig":
        return RecipeConfig(seed=seed, n_images=48, n_pattern_images=16, chunk=16, workers=0, vae_steps=2,
                            vae_batch=4, oracle_steps=2, oracle_batch=4, oracle_eval_n=8, oracle_vae_pool=4,
                            oracle_vae_steps=2, oracle_vae_batch=4, oracle_vae_eval_n=4, unet_steps=2,
                            unet_batch=4, unet_warmup=1, resume_warmup=1, eval_n=2, eval_n_two=1, eval_steps=2,
                            eval_batch=4, log_every=1, ckpt_minutes=1e9)


# ---------------------------------------------------------------------------- helpers
class _Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def _dev(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _update_metrics(out: Path, stage: str, info: dict) -> None:
    """DIR/metrics/<stage>.json (one file per stage: stages may run in parallel processes)."""
    (out / "metrics").mkdir(exist_ok=True)
    (out / "metrics" / f"{stage}.json").write_text(json.dumps(info, indent=2, default=float))


def _vae_dir(out: Path, init_from: Path | None = None) -> Path:
    """DIR/vae, else the VAE of the pipeline we warm-start from (a continuation on a fresh machine)."""
    if (out / "vae" / "config.json").exists() or init_from is None:
        return out / "vae"
    return Path(init_from) / "vae"


def _oracle_file(out: Path) -> Path:
    return out / "oracle.safetensors" if (out / "oracle.safetensors").exists() else ORACLE_FILE


def _lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def _plan_steps(fixed: int | None, minutes: float, step_fn, probe: int = 20) -> tuple[int, float]:
    """Number of steps: `fixed`, else as many as fit in `minutes` after timing `probe` steps.

    Runs the probe steps (they count as training) and returns (total steps, seconds per step).
    """
    if fixed is not None:
        return fixed, float("nan")
    for i in range(3):  # warm-up (cudnn autotune, allocator), counted as steps
        step_fn(i)
    _sync()
    t = _Timer()
    for i in range(3, 3 + probe):
        step_fn(i)
    _sync()
    per = t() / probe
    return max(3 + probe, int(minutes * 60 / per * 0.97)), per


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- data
def _render_chunk(args: tuple) -> tuple[np.ndarray, list[str]]:
    """Render images [start, start + n) of pool `kind`; deterministic from (seed, kind, chunk index).

    patterns: False (no patterns), True (``sample_scene(patterns=True)``: each object patterned with
    probability 1/2), "all" (as True, then every plain object gets a random pattern and colour2), or a
    float p: each object patterned with probability p, never as one of the example concepts (captions
    name the pattern: "a red and white striped ball").
    """
    seed, kind, index, n, patterns = args
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
        captions.append(caption(scene, rng))
        images[i] = render(scene, seed=int(rng.integers(2**31)))[0]
    return images, captions


def _held_out() -> set[tuple]:
    from .concepts import EXAMPLE_CONCEPTS

    return {(c.class_word, c.pattern, frozenset(c.colors)) for c in EXAMPLE_CONCEPTS.values()}


def _random_pattern(obj, rng: np.random.Generator) -> None:
    """Give obj a random pattern and second colour that is not one of the example concepts."""
    held_out = _held_out()
    while True:
        obj.pattern = PATTERNS[rng.integers(len(PATTERNS))]
        others = [c for c in COLOR_NAMES if c != obj.color]
        obj.color2 = others[rng.integers(len(others))]
        if (obj.cls, obj.pattern, frozenset((obj.color, obj.color2))) not in held_out:
            return


def render_pool(seed: int, kind: int, n: int, chunk: int, patterns: bool | str, workers: int
                ) -> tuple[np.ndarray, list[str]]:
    """Render a pool of n captioned scenes (chunked so that the result does not depend on workers)."""
    jobs = [(seed, kind, i, min(chunk, n - i * chunk), patterns) for i in range(math.ceil(n / chunk))]
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
    imgs, caps = render_pool(cfg.seed, 0, cfg.n_images, cfg.chunk, float(cfg.caption_patterns) or False, workers)
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


# ---------------------------------------------------------------------------- vae
def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


def _to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B,64,64,3) uint8 -> (B,3,64,64) float in [-1, 1]."""
    return x_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def vae_loss(vae, x: torch.Tensor, cfg: RecipeConfig) -> tuple[torch.Tensor, dict]:
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample.float()
    l1 = (rec - x).abs().mean()
    mse = F.mse_loss(rec, x)
    (ry, rx), (ty, tx) = _edges(rec), _edges(x)
    edge = (ry - ty).abs().mean() + (rx - tx).abs().mean()
    kl = (0.5 * (post.mean.float() ** 2 + post.var.float() - 1 - post.logvar.float())).mean()
    loss = l1 + cfg.vae_mse * mse + cfg.vae_edge * edge + cfg.vae_kl * kl
    return loss, {"l1": l1.item(), "mse": mse.item(), "edge": edge.item(), "kl": kl.item()}


@torch.no_grad()
def _psnr(vae, imgs: torch.Tensor, device: torch.device, batch: int = 500) -> float:
    errs = []
    for i in range(0, len(imgs), batch):
        x = _to_unit(imgs[i:i + batch].to(device))
        with _autocast(device):
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        errs.append(((rec - x) / 2).pow(2).mean((1, 2, 3)).cpu())
    mse = torch.cat(errs)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def stage_vae(cfg: RecipeConfig, out: Path, device: torch.device, resume: bool = False,
              init_from: Path | None = None) -> dict:
    from diffusers import AutoencoderKL

    t = _Timer()
    torch.manual_seed(cfg.seed)
    plain = torch.from_numpy(np.array(_load_images(out, "images.npy")))
    pat = torch.from_numpy(np.array(_load_images(out, "pattern_images.npy")))
    hold = max(1, min(1000, len(pat) // 20))  # held-out tail of each pool for the PSNR report
    plain_tr, plain_ho, pat_tr, pat_ho = plain[:-hold], plain[-hold:], pat[:-hold], pat[-hold:]
    plain_tr, pat_tr = plain_tr.to(device), pat_tr.to(device)
    vdir = out / "vae"
    if resume and (vdir / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(vdir, torch_dtype=torch.float32)
    elif init_from is not None:  # continue the VAE of a shipped pipeline (fp16 weights -> fp32)
        vae = AutoencoderKL.from_pretrained(Path(init_from) / "vae", torch_dtype=torch.float32)
    else:
        vae = build_vae()
    warm_start = resume or init_from is not None
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    half = cfg.vae_batch // 2
    hist: list[dict] = []
    state = {"total": cfg.vae_steps or 10**9}

    def step(i: int) -> None:
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _lr_factor(i, state["total"], min(50 if warm_start else 200, max(1, state["total"] // 10)))
        a = torch.randint(0, len(plain_tr), (cfg.vae_batch - half,), device=device, generator=gen)
        b = torch.randint(0, len(pat_tr), (half,), device=device, generator=gen)
        x = _to_unit(torch.cat([plain_tr[a], pat_tr[b]]))
        flip = torch.rand(len(x), device=device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with _autocast(device):
            loss, parts = vae_loss(vae, x, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if i % cfg.log_every == 0 or i >= state["total"] - 5:
            parts.update(step=i, loss=loss.item())
            hist.append(parts)
            if i % cfg.log_every == 0:
                log.info("vae step %d/%s loss %.4f l1 %.4f edge %.4f kl %.2f (%.0fs)", i, state["total"], loss.item(),
                         parts["l1"], parts["edge"], parts["kl"], t())

    total, per = _plan_steps(cfg.vae_steps, cfg.vae_minutes - t() / 60, step)
    state["total"] = total
    done = 3 + 20 if cfg.vae_steps is None else 0
    for i in range(done, total):
        step(i)
    vae.eval()
    # scaling factor: 1 / std of posterior samples of the diffusion pool (as SD's 0.18215)
    with torch.no_grad(), _autocast(device):
        idx = torch.randperm(len(plain_tr), generator=torch.Generator().manual_seed(cfg.seed))[:8192].to(device)
        lat = torch.cat([vae.encode(_to_unit(plain_tr[idx[i:i + 512]])).latent_dist.sample().float()
                         for i in range(0, len(idx), 512)])
    std, mean = lat.std().item(), lat.mean().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(vdir, safe_serialization=True)
    with torch.no_grad():  # a look at the reconstructions: originals (odd rows) over reconstructions
        x = torch.cat([plain_ho[:10], pat_ho[:10]]).to(device)
        rec = vae.decode(vae.encode(_to_unit(x)).latent_dist.mode()).sample.clamp(-1, 1)
        rec = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        rows = [t for i in range(0, len(x), 10) for t in (x[i:i + 10], rec[i:i + 10])]
    from PIL import Image

    (out / "eval").mkdir(exist_ok=True)
    Image.fromarray(_grid(torch.cat(rows).cpu().numpy())).save(out / "eval" / "vae_recon.png")
    k = max(1, len(hist) // 10)
    info = {"steps": total, "sec_per_step": per, "seconds": t(), "batch": cfg.vae_batch,
            "params": sum(p.numel() for p in vae.parameters()), "latent_std": std, "latent_mean": mean,
            "scaling_factor": 1.0 / std, "loss_last": float(np.mean([h["loss"] for h in hist[-k:]])),
            "l1_last": float(np.mean([h["l1"] for h in hist[-k:]])),
            "psnr_plain": _psnr(vae, plain_ho, device), "psnr_patterns": _psnr(vae, pat_ho, device)}
    log.info("vae: %s", info)
    return info


# ---------------------------------------------------------------------------- oracle
def stage_oracle(cfg: RecipeConfig, out: Path, device: torch.device) -> dict:
    from . import oracle as O

    t = _Timer()
    ocfg = O.OracleTrainConfig(eval_n=cfg.oracle_eval_n)
    if device.type != "cuda":
        ocfg.num_workers = 0
    elif cfg.oracle_workers is not None:
        ocfg.num_workers = cfg.oracle_workers
    else:
        ocfg.num_workers = max(1, min(15, (os.cpu_count() or 4) - 3))
    net, metrics = O.train_oracle(steps=cfg.oracle_steps, batch_size=cfg.oracle_batch, device=str(device),
                                  seed=cfg.seed, config=ocfg)
    O.save_oracle(net, out / "oracle.safetensors")
    metrics["seconds_total"] = t()
    log.info("oracle: %s", metrics)
    return metrics


@torch.no_grad()
def vae_roundtrip(vae, images: np.ndarray, device: torch.device, batch: int = 250) -> np.ndarray:
    """(N,64,64,3) uint8 -> the same images encoded (posterior mode) and decoded by the VAE."""
    outs = []
    for i in range(0, len(images), batch):
        x = _to_unit(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).to(device))
        with _autocast(device):
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        outs.append(((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(outs)


@torch.no_grad()
def _oracle_vae_report(net, vae, device: torch.device, n: int, seed: int) -> dict:
    """Oracle accuracy on n fresh renders after a VAE round trip (what the decoder can express)."""
    from . import oracle as O

    data = O.render_batch(np.random.default_rng([seed, 56]), n)
    reads = O.read(vae_roundtrip(vae, data["image"], device), oracle=net)
    labels = [O.BACKGROUNDS[b] for b in data["background"]]
    first = [O.CLASS_LABELS[c] for c in data["cls"][:, 0]]
    per_bg = {b: _rate(r["background"] == b for r, lb in zip(reads, labels) if lb == b) for b in O.BACKGROUNDS}
    return {"n": n, "background": _rate(r["background"] == lb for r, lb in zip(reads, labels)),
            "first_class": _rate(r["objects"][0]["cls"] == c for r, c in zip(reads, first)),
            "background_by_scene": per_bg}


def stage_oracle_vae(cfg: RecipeConfig, out: Path, device: torch.device, init_from: Path | None = None) -> dict:
    """Fine-tune the oracle's global MLP and heads (backbone, BatchNorm statistics and mask head frozen)
    on a mix of fresh renders and renders round-tripped through the world VAE.

    Why: the VAE cannot express pixel noise such as the sparse white speckles of the snow texture, so
    every decoded image (a generated one, or a render after a round trip) shows snow as a smooth light
    blue, which the render-trained oracle read as the flat plain background (0% of snow round trips).
    Starts from DIR/oracle_renders.safetensors (the oracle stage's weights, saved there on first use)
    and writes DIR/oracle.safetensors. (Re-fitting only the last linear layer on cached features was
    tried: no better on snow, and colour2 fell to 97.3% on renders.)
    """
    from diffusers import AutoencoderKL

    from . import oracle as O

    t = _Timer()
    base = out / "oracle_renders.safetensors"
    if not base.exists():
        shutil.copy2(_oracle_file(out), base)
    net = O.load_oracle(str(device), base)
    vae = AutoencoderKL.from_pretrained(_vae_dir(out, init_from), torch_dtype=torch.float32).to(device).eval()
    info: dict = {"before_renders": O.evaluate_oracle(net, n=cfg.oracle_eval_n, seed=cfg.seed + 12345),
                  "before_vae": _oracle_vae_report(net, vae, device, cfg.oracle_vae_eval_n, cfg.seed)}
    log.info("oracle_vae before: %s", info)
    rng = np.random.default_rng([cfg.seed, 55])
    pool = O.render_batch(rng, cfg.oracle_vae_pool)
    pool["image"] = vae_roundtrip(vae, pool["image"], device)
    info["pool_seconds"] = t()
    del vae
    for p in net.parameters():
        p.requires_grad_(False)
    params = [*net.mlp.parameters(), *net.heads.parameters()]
    for p in params:
        p.requires_grad_(True)
    net.eval()  # BatchNorm statistics stay those of the render-trained oracle
    opt = torch.optim.AdamW(params, lr=cfg.oracle_vae_lr, weight_decay=0.01)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    half = cfg.oracle_vae_batch // 2
    losses = []
    for step in range(cfg.oracle_vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.oracle_vae_lr * _lr_factor(step, cfg.oracle_vae_steps, max(1, cfg.oracle_vae_steps // 10), 0.0)
        idx = rng.integers(0, len(pool["image"]), half)
        fresh = O.render_batch(rng, cfg.oracle_vae_batch - half)
        batch = {k: torch.from_numpy(np.concatenate([pool[k][idx], fresh[k]])).to(device) for k in fresh}
        x = O.augment(batch["image"].permute(0, 3, 1, 2).float() / 255, gen)
        loss = O.oracle_loss(net(x), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, cfg.log_every // 4) == 0:
            log.info("oracle_vae step %d/%d loss %.4f (%.0fs)", step, cfg.oracle_vae_steps, loss.item(), t())
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    O.save_oracle(net, out / "oracle.safetensors")
    net = O.load_oracle(str(device), out / "oracle.safetensors")  # report on the saved (fp16) weights
    vae = AutoencoderKL.from_pretrained(_vae_dir(out, init_from), torch_dtype=torch.float32).to(device).eval()
    k = max(1, min(20, len(losses) // 4))
    info.update(steps=cfg.oracle_vae_steps, batch=cfg.oracle_vae_batch, pool=cfg.oracle_vae_pool,
                loss_first=float(np.mean(losses[:k])), loss_last=float(np.mean(losses[-k:])),
                after_renders=O.evaluate_oracle(net, n=cfg.oracle_eval_n, seed=cfg.seed + 12345),
                after_vae=_oracle_vae_report(net, vae, device, cfg.oracle_vae_eval_n, cfg.seed), seconds=t())
    log.info("oracle_vae: %s", info)
    return info


# ---------------------------------------------------------------------------- unet + text encoder
def load_tokenizer(path: Path = TOKENIZER_DIR):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_config(tokenizer)))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, model_max_length) token ids, padded with the pad (= eos) token; unique captions tokenized once."""
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    where = {c: i for i, c in enumerate(unique)}
    return ids[torch.tensor([where[c] for c in captions], dtype=torch.long)]


@torch.no_grad()
def encode_pool(vae, images: np.ndarray, device: torch.device, batch: int = 2048) -> torch.Tensor:
    """Posterior (mean, logvar) of every image: (N, 8, 16, 16) fp16 on CPU."""
    outs = []
    for i in range(0, len(images), batch):
        x = _to_unit(torch.from_numpy(np.array(images[i:i + batch])).to(device))
        with _autocast(device):
            p = vae.encode(x).latent_dist
        outs.append(torch.cat([p.mean, p.logvar], 1).half().cpu())
    return torch.cat(outs)


def _param_groups(unet, te, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for model in (unet, te):
        for name, p in model.named_parameters():
            if p.ndim < 2 or "embedding" in name or "norm" in name:
                no_decay.append(p)  # token/position embeddings, norms, biases
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def stage_unet(cfg: RecipeConfig, out: Path, device: torch.device, resume: bool = False,
               init_from: Path | None = None) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    t = _Timer()
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer()
    caps = json.loads((out / "data" / "captions.json").read_text())
    lat_path = out / "data" / "latents.pt"
    vae = AutoencoderKL.from_pretrained(_vae_dir(out, init_from), torch_dtype=torch.float32).to(device).eval()
    sf = float(vae.config.scaling_factor)
    if lat_path.exists() and resume:
        post = torch.load(lat_path)
    else:
        post = encode_pool(vae, _load_images(out, "images.npy"), device)
        torch.save(post, lat_path)
    del vae
    t_encode = t()
    log.info("unet: %d latents ready in %.1fs (scaling factor %.4f)", len(post), t_encode, sf)
    post = post.to(device)
    ids = tokenize(tok, caps).to(device)
    empty = tokenize(tok, [""]).to(device)[0]

    ckpt = out / "ckpt" / "unet_train.pt"
    state = torch.load(ckpt, map_location="cpu") if resume and ckpt.exists() else None
    if init_from is not None and state is None:
        unet = UNet2DConditionModel.from_pretrained(init_from, subfolder="unet", torch_dtype=torch.float32)
        te = CLIPTextModel.from_pretrained(init_from, subfolder="text_encoder", torch_dtype=torch.float32)
    else:
        unet, te = build_unet(), build_text_encoder(tok)
    if state is not None:
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["te"])
    unet.to(device).train()
    te.to(device).train()
    ema_unet, ema_te = build_unet().to(device).eval(), build_text_encoder(tok).to(device).eval()
    ema_unet.load_state_dict(state["ema_unet"] if state else unet.state_dict())
    ema_te.load_state_dict(state["ema_te"] if state else te.state_dict())
    for p in [*ema_unet.parameters(), *ema_te.parameters()]:
        p.requires_grad_(False)
    params = [*unet.parameters(), *te.parameters()]
    ema_params = [*ema_unet.parameters(), *ema_te.parameters()]
    opt = torch.optim.AdamW(_param_groups(unet, te, cfg.weight_decay), lr=cfg.unet_lr, betas=(0.9, 0.999))
    if state is not None and "opt" in state:
        opt.load_state_dict(state["opt"])
    start = int(state["step"]) if state else 0
    if state is None and init_from is not None and (Path(init_from) / PROVENANCE).exists():
        start = int(json.loads((Path(init_from) / PROVENANCE).read_text()).get("unet_steps", 0))
    warm_start = state is not None or init_from is not None
    warmup = cfg.resume_warmup if warm_start else cfg.unet_warmup

    sched = DDPMScheduler(**scheduler_config())
    abar = sched.alphas_cumprod.to(device)
    snr = abar / (1 - abar)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * start + (7919 if init_from else 0))
    hist: list[dict] = []
    seg = {"total": cfg.unet_steps or 10**9, "start": start}
    last_ckpt = _Timer()

    def save_ckpt(step: int) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet.state_dict(),
                    "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "step": step,
                    "config": asdict(cfg)}, ckpt.with_suffix(".tmp"))
        os.replace(ckpt.with_suffix(".tmp"), ckpt)

    def step(i: int) -> None:
        gstep = seg["start"] + i
        lr = cfg.unet_lr * _lr_factor(i, seg["total"], warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        B = cfg.unet_batch
        idx = torch.randint(0, len(post), (B,), device=device, generator=gen)
        p = post[idx].float()
        mean, logvar = p[:, :4], p[:, 4:]
        x0 = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=device, generator=gen)) * sf
        tok_ids = ids[idx]
        drop = torch.rand(B, device=device, generator=gen) < cfg.caption_dropout
        tok_ids = torch.where(drop[:, None], empty[None], tok_ids)
        tt = torch.randint(0, 1000, (B,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        a = abar[tt].view(B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(device):
            cond = te(tok_ids)[0]
            pred = unet(xt, tt, cond).sample.float()
        per = (pred - noise).pow(2).mean((1, 2, 3))
        w = (snr[tt].clamp(max=cfg.min_snr_gamma) / snr[tt]) if cfg.min_snr_gamma else torch.ones_like(per)
        loss = (per * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        e = i if init_from is not None and state is None else gstep  # a warm start restarts the EMA warm-up
        decay = min(cfg.ema_decay, (1 + e) / (10 + e))
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        if i % cfg.log_every == 0 or i >= seg["total"] - 20:
            rec = {"step": gstep, "loss": loss.item(), "mse": per.mean().item(), "lr": lr}
            hist.append(rec)
            if i % cfg.log_every == 0:
                log.info("unet step %d (%d/%s) loss %.4f mse %.4f gnorm %.2f lr %.2e (%.0fs)", gstep, i, seg["total"],
                         rec["loss"], rec["mse"], float(gnorm), lr, t())
        if cfg.ckpt_minutes and last_ckpt() > cfg.ckpt_minutes * 60 and i % 50 == 0:
            save_ckpt(gstep + 1)
            last_ckpt.t0 = time.perf_counter()

    total, per_step = _plan_steps(cfg.unet_steps, cfg.unet_minutes - t() / 60, step)
    seg["total"] = total
    for i in range(0 if cfg.unet_steps is not None else 23, total):
        step(i)
    save_ckpt(start + total)
    k = [h for h in hist if h["step"] >= start + total - 20] or hist[-1:]
    info = {"steps_this_run": total, "step_total": start + total, "sec_per_step": per_step, "batch": cfg.unet_batch,
            "images_seen_this_run": total * cfg.unet_batch, "seconds": t(), "encode_seconds": t_encode,
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "text_params": sum(p.numel() for p in te.parameters()),
            "loss_last": float(np.mean([h["loss"] for h in k])), "mse_last": float(np.mean([h["mse"] for h in k])),
            "resumed": state is not None, "init_from": str(init_from) if init_from else None}
    log.info("unet: %s", info)
    return info


# ---------------------------------------------------------------------------- export
def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def stage_export(cfg: RecipeConfig, out: Path, init_from: Path | None = None) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    ckpt = torch.load(out / "ckpt" / "unet_train.pt", map_location="cpu")
    tok = load_tokenizer()
    unet, te = build_unet(), build_text_encoder(tok)
    unet.load_state_dict(ckpt["ema_unet"])
    te.load_state_dict(ckpt["ema_te"])
    vae = AutoencoderKL.from_pretrained(_vae_dir(out, init_from), torch_dtype=torch.float32)
    scheduler = DPMSolverMultistepScheduler.from_config(DDPMScheduler(**scheduler_config()).config,
                                                        algorithm_type="dpmsolver++", solver_order=2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    folder = out / "model"
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    _canonical_text_encoder_keys(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")  # ship the world tokenizer files verbatim (vocab.json + merges.txt)
    shutil.copytree(TOKENIZER_DIR, folder / "tokenizer")
    prov = {"recipe": "python -m prkit.world.train", "unet_steps": int(ckpt["step"]), "config": ckpt.get("config", {}),
            "unet_batch": (ckpt.get("config") or {}).get("unet_batch")}
    (folder / PROVENANCE).write_text(json.dumps(prov, indent=1, default=str))
    oracle_mb = _oracle_file(out).stat().st_size / 2**20 if _oracle_file(out).exists() else 0.0
    info = {"folder_mb": folder_mb(folder), "oracle_mb": oracle_mb, "step_total": int(ckpt["step"])}
    info["total_mb"] = info["folder_mb"] + oracle_mb
    if info["total_mb"] > SIZE_LIMIT_MB:
        log.warning("export: %.1f MB exceeds the %.0f MB budget", info["total_mb"], SIZE_LIMIT_MB)
    log.info("export: %s", info)
    return info


def _canonical_text_encoder_keys(folder: Path) -> None:
    """Store CLIPTextModel weights under SD's 'text_model.' key prefix.

    transformers >= 5 builds CLIPTextModel without the `text_model` wrapper and saves bare keys, which
    transformers 4.x would silently ignore; it loads prefixed keys itself (a PrefixChange mapping).
    """
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    if all(k.startswith("text_model.") for k in state):
        return
    state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous() for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})


def ship(out: Path, model_dir: Path = MODEL_DIR, oracle_file: Path = ORACLE_FILE) -> None:
    """Copy DIR/model and DIR/oracle.safetensors into the package."""
    if (out / "model" / "model_index.json").exists():
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(out / "model", model_dir)
    if (out / "oracle.safetensors").exists():
        oracle_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "oracle.safetensors", oracle_file)
    log.info("shipped to %s and %s", model_dir, oracle_file)


# ---------------------------------------------------------------------------- evaluation
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


# ---------------------------------------------------------------------------- CPU speed (the kit's bars)
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


# ---------------------------------------------------------------------------- CLI
def run(stages: list[str], out: Path, cfg: RecipeConfig, device: torch.device, resume: bool = False,
        init_from: Path | None = None, do_ship: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    results = {}
    for stage in stages:
        t = _Timer()
        log.info("=== stage %s", stage)
        if stage == "data":
            info = stage_data(cfg, out)
        elif stage == "vae":
            info = stage_vae(cfg, out, device, resume, init_from)
        elif stage == "oracle":
            info = stage_oracle(cfg, out, device)
        elif stage == "oracle_vae":
            info = stage_oracle_vae(cfg, out, device, init_from)
        elif stage == "unet":
            info = stage_unet(cfg, out, device, resume, init_from)
        elif stage == "export":
            info = stage_export(cfg, out, init_from)
        elif stage == "eval":
            info = stage_eval(cfg, out, device)
        else:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES} or 'all'")
        info["wall_seconds"] = t()
        if device.type == "cuda":
            info["card"] = torch.cuda.get_device_name()
        _update_metrics(out, stage, info)
        results[stage] = info
    if do_ship:
        ship(out)
    return results


def _parse_value(value: str, default):
    if value == "None":
        return None
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if default is None:
        return float(value) if any(c in value for c in ".e") else int(value)
    return type(default)(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prkit.world.train", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", nargs="+", default=["all"], help=f"one or more of {', '.join(STAGES)}, or all")
    ap.add_argument("--out", type=Path, required=True, help="working folder (data, checkpoints, exported model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None,
                    help="time budget of the training stage(s) run (vae, unet); default: the config's")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of steps for vae/unet (overrides --minutes)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    ap.add_argument("--init-from", type=Path, default=None, help="warm-start unet + text encoder from a pipeline folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU-sized settings (tests)")
    ap.add_argument("--ship", action="store_true", help="copy the model and oracle into prkit/world/")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override RecipeConfig fields")
    ap.add_argument("--cpu-speed", action="store_true", help="measure the CPU speed bars of --out/model and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    if args.cpu_speed:
        print(json.dumps(cpu_speed(args.out / "model" if (args.out / "model").exists() else MODEL_DIR), indent=2))
        return 0
    cfg = RecipeConfig.smoke(args.seed) if args.smoke else RecipeConfig(seed=args.seed)
    for kv in args.set:
        key, value = kv.split("=", 1)
        cfg = replace(cfg, **{key: _parse_value(value, getattr(cfg, key))})
    if args.minutes is not None:
        cfg = replace(cfg, vae_minutes=args.minutes, unet_minutes=args.minutes)
    if args.steps is not None:
        cfg = replace(cfg, vae_steps=args.steps, unet_steps=args.steps)
    stages = list(STAGES) if args.stage == ["all"] else args.stage
    device = _dev(args.device)
    log.info("recipe %s on %s: %s", stages, device, asdict(cfg))
    results = run(stages, args.out, cfg, device, args.resume, args.init_from, args.ship)
    print(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
