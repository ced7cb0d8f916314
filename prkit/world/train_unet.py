"""UNet + text encoder of the world recipe: tokenizer and model builders, the ``unet`` stage (joint
training on VAE latents), the ``export`` stage (fp16 pipeline folder) and ``ship`` (into the package).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..pipeline import DEFAULTS_FILE
from .pool import _load_images
from .recipe_util import (MODEL_DIR, ORACLE_FILE, PERSONALIZATION_DEFAULTS, PROVENANCE, SIZE_LIMIT_MB, TOKENIZER_DIR,
                          RecipeConfig, _autocast,
                          _lr_factor, _oracle_file, _plan_steps, _Timer, _to_unit, _vae_dir, log, scheduler_config,
                          text_config, unet_config)


def load_tokenizer(path: Path = TOKENIZER_DIR, pad_side: str | None = None):
    """The world tokenizer; ``pad_side`` "left" or "right" overrides the side it pads on (the recipe's ``pad_side``)."""
    from transformers import CLIPTokenizer

    if pad_side not in (None, "left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    return CLIPTokenizer.from_pretrained(str(path), **({"padding_side": pad_side} if pad_side else {}))


def resolve_pad_side(asked: str | None, state: dict | None, init_from: Path | None) -> str:
    """The side a UNet stage pads on: ``asked``, else the side of what it continues, else "right".

    A resumed checkpoint keeps its side (asking for the other one is refused); a warm start from a model folder
    (``init_from``) takes the side its tokenizer config names unless another is asked for, which switches it.
    """
    if state is not None:
        trained = trained_pad_side(state)
        if asked is not None and asked != trained:
            raise ValueError(f"the checkpoint being resumed was trained with pad_side={trained!r}, not {asked!r}; "
                             "resume with the same side, or start a new run (--init-from its exported model)")
        return trained
    if asked is not None:
        return asked
    config_file = Path(init_from) / "tokenizer" / "tokenizer_config.json" if init_from is not None else None
    if config_file is not None and config_file.exists():
        return json.loads(config_file.read_text()).get("padding_side") or "right"
    return "right"


def trained_pad_side(checkpoint: dict) -> str:
    """The side a UNet checkpoint was trained with (checkpoints of runs 1-5 record none: right)."""
    return (checkpoint.get("config") or {}).get("pad_side") or "right"


def summary_dropout(cond: torch.Tensor, empty_cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``cond`` (B, T, D) with the last position (a left-padded caption's end token) taken from ``empty_cond``
    (1, T, D) where ``drop`` (B,) is true."""
    last = torch.where(drop[:, None], empty_cond[:, -1], cond[:, -1])
    return torch.cat([cond[:, :-1], last[:, None]], 1)


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


def _latents_stamp(out: Path, vae_dir: Path) -> dict:
    """What the stored latents were encoded from: size and modification time of the images and of every VAE file."""
    files = {"images.npy": out / "data" / "images.npy",
             **{f"vae/{p.name}": p for p in sorted(Path(vae_dir).iterdir()) if p.is_file()}}
    return {role: [p.stat().st_size, p.stat().st_mtime_ns] for role, p in files.items()}  # keyed by role: a moved
    # or differently spelt --out keeps its latents


def stage_unet(cfg: RecipeConfig, out: Path, device: torch.device, resume: bool = False,
               init_from: Path | None = None) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    t = _Timer()
    torch.manual_seed(cfg.seed)
    ckpt = out / "ckpt" / "unet_train.pt"
    state = None
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
    elif resume:
        log.warning("unet: --resume but no checkpoint at %s; the UNet stage starts from %s", ckpt,
                    init_from or "scratch")
    elif ckpt.exists():  # a new run: keep the one it replaces
        kept = ckpt.with_name("unet_train.previous.pt")
        os.replace(ckpt, kept)
        log.warning("unet: a checkpoint was in %s and this run was not asked to --resume it: moved to %s "
                    "(rerun with --resume to continue a run)", ckpt.parent, kept.name)
    cfg = replace(cfg, pad_side=resolve_pad_side(cfg.pad_side, state, init_from))  # the checkpoint records it
    if cfg.eos_dropout and cfg.pad_side != "left":
        raise ValueError("eos_dropout needs pad_side='left' (with right padding the pads after the end token "
                         "summarise the caption as well)")
    tok = load_tokenizer(pad_side=cfg.pad_side)
    caps = json.loads((out / "data" / "captions.json").read_text())
    lat_path = out / "data" / "latents.pt"
    vae = AutoencoderKL.from_pretrained(_vae_dir(out, init_from), torch_dtype=torch.float32).to(device).eval()
    sf = float(vae.config.scaling_factor)
    stamp = _latents_stamp(out, _vae_dir(out, init_from))
    stamp_path = lat_path.with_suffix(".json")
    if resume and lat_path.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        post = torch.load(lat_path)
    else:
        if resume and lat_path.exists():
            log.info("unet: the images or the VAE changed since %s was encoded; encoding again", lat_path.name)
        post = encode_pool(vae, _load_images(out, "images.npy"), device)
        torch.save(post, lat_path)
        stamp_path.write_text(json.dumps(stamp))
    del vae
    t_encode = t()
    log.info("unet: %d latents ready in %.1fs (scaling factor %.4f)", len(post), t_encode, sf)
    post = post.to(device)
    ids = tokenize(tok, caps).to(device)
    empty = tokenize(tok, [""]).to(device)[0]

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
            if cfg.eos_dropout:  # the empty caption rides along in the same text-encoder batch
                eos_drop = torch.rand(B, device=device, generator=gen) < cfg.eos_dropout
                cond = te(torch.cat([tok_ids, empty[None]]))[0]
                cond = summary_dropout(cond[:-1], cond[-1:], eos_drop)
            else:
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


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def stage_export(cfg: RecipeConfig, out: Path, init_from: Path | None = None) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    ckpt = torch.load(out / "ckpt" / "unet_train.pt", map_location="cpu")
    pad_side = trained_pad_side(ckpt)
    tok = load_tokenizer(pad_side=pad_side)
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
    if pad_side != "right":  # the side is the model's: its tokenizer config says it, so every loader pads alike
        config_file = folder / "tokenizer" / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "padding_side": pad_side},
                                          indent=2) + "\n")
    prov = {"recipe": "python -m prkit.world.train", "unet_steps": int(ckpt["step"]), "config": ckpt.get("config", {}),
            "unet_batch": (ckpt.get("config") or {}).get("unet_batch")}
    (folder / PROVENANCE).write_text(json.dumps(prov, indent=1, default=str))
    (folder / DEFAULTS_FILE).write_text(json.dumps(PERSONALIZATION_DEFAULTS, indent=1) + "\n")
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
    """Copy DIR/model and DIR/oracle.safetensors (whichever exist) into the package; logs what it copied."""
    shipped = []
    if (out / "model" / "model_index.json").exists():
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(out / "model", model_dir)
        shipped.append(str(model_dir))
    if (out / "oracle.safetensors").exists():
        oracle_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "oracle.safetensors", oracle_file)
        shipped.append(str(oracle_file))
    if shipped:
        log.info("shipped %s", " and ".join(shipped))
    else:
        log.warning("--ship: nothing to ship in %s (no model/ from the export stage, no oracle.safetensors)", out)
