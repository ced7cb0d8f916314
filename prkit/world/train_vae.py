"""VAE of the world recipe: the AutoencoderKL, its loss and PSNR, the ``vae`` stage (which also sets
``scaling_factor``) and ``vae_roundtrip``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .eval_base import _grid
from .pool import _load_images
from .recipe_util import RecipeConfig, _autocast, _lr_factor, _plan_steps, _Timer, _to_unit, log, vae_config


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


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
    loaded = resume and (vdir / "config.json").exists()
    if loaded:
        vae = AutoencoderKL.from_pretrained(vdir, torch_dtype=torch.float32)
    elif init_from is not None:  # continue the VAE of a shipped pipeline (fp16 weights -> fp32)
        vae = AutoencoderKL.from_pretrained(Path(init_from) / "vae", torch_dtype=torch.float32)
    else:
        if resume:  # as the UNet stage says it: nothing to resume, so a new VAE, with a new VAE's full warm-up
            log.warning("vae: --resume but no VAE at %s; the VAE stage starts from a new VAE", vdir)
        vae = build_vae()
    warm_start = loaded or init_from is not None  # a new VAE gets the full warm-up, --resume or not
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
