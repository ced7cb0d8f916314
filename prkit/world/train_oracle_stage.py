"""Oracle stages of the world recipe: ``oracle`` (train it on renders with ``prkit.world.oracle``) and
``oracle_vae`` (fine-tune its MLP and heads on renders round-tripped through the world VAE).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .eval_base import _rate
from .recipe_util import RecipeConfig, _lr_factor, _oracle_file, _Timer, _vae_dir, log
from .train_vae import vae_roundtrip


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
    # the render-trained weights that oracle_vae starts from (a stale copy would fine-tune an older oracle)
    O.save_oracle(net, out / "oracle_renders.safetensors")
    metrics["seconds_total"] = t()
    log.info("oracle: %s", metrics)
    return metrics


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
    Starts from DIR/oracle_renders.safetensors (the oracle stage's weights; copied from DIR/oracle.safetensors
    or the shipped oracle when an older oracle stage did not write it)
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
