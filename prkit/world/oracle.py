"""The world's oracle: a small CNN that reads a 64x64 image back into its scene attributes.

Owns the network, its training on rendered scenes (with blur/noise/colour augmentation so it reads
diffusion samples), evaluation on fresh renders, fp16 safetensors save/load and `read()`.
It does not train or touch the diffusion model; the recipe (train.py) calls `train_oracle`.
"""

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .oracle_input import as_batch as _as_batch
from .render import render, sample_scene
from .vocab import BACKGROUNDS, CLASSES, COLOR_NAMES, PATTERNS

log = logging.getLogger(__name__)

ORACLE_PATH = Path(__file__).parent / "oracle" / "oracle.safetensors"
CLASS_LABELS = ("none", *CLASSES)  # "none" first, as for patterns
PATTERN_LABELS = ("none", *PATTERNS)
SYMMETRIC_PATTERNS = ("stripes", "checks")  # colour order unreadable: read in COLORS order
SLOT_HEADS = {"cls": len(CLASS_LABELS), "color": len(COLOR_NAMES), "pattern": len(PATTERN_LABELS),
              "color2": len(COLOR_NAMES), "xy": 2}  # per-slot outputs, in this order
IGNORE = -100


@dataclass
class OracleConfig:
    """Network widths; stored in the safetensors metadata."""

    widths: tuple[int, ...] = (24, 48, 96, 160)  # channels at 64, 32, 16, 8 px
    hidden: int = 256  # global MLP width
    slot_channels: int = 32  # 1x1 squeeze of the 8x8 map before flattening (keeps position)


@dataclass
class OracleTrainConfig:
    """Training settings of `train_oracle`."""

    lr: float = 2e-3  # AdamW peak, cosine decay after 5% warm-up
    weight_decay: float = 0.01
    patterns_p: float = 0.5  # fraction of scenes sampled with patterns=True
    augment: bool = True  # blur, JPEG-like smoothing, noise, colour jitter (diffusion-like)
    num_workers: int | None = None  # render processes; None: cpu_count - 1 (<= 15) on CUDA, 0 on CPU
    eval_n: int = 2000  # fresh renders evaluated at the end (0: skip)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Oracle(nn.Module):
    """CNN with a background head, two left-to-right object slots and a union-mask head."""

    def __init__(self, config: OracleConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or OracleConfig()
        w = c.widths
        self.stem = nn.Sequential(_conv(3, w[0]), _conv(w[0], w[0]))
        self.stages = nn.ModuleList(nn.Sequential(_conv(a, b, 2), _conv(b, b)) for a, b in zip(w, w[1:]))
        self.squeeze = nn.Conv2d(w[-1], c.slot_channels, 1)
        self.mlp = nn.Sequential(nn.Linear(c.slot_channels * 64 + w[-1], c.hidden), nn.ReLU(inplace=True))
        self.heads = nn.Linear(c.hidden, len(BACKGROUNDS) + 2 * sum(SLOT_HEADS.values()))
        self.mask_head = nn.Sequential(  # 1x1 fuse of 64/32/16-px features, then a 3x3 readout
            nn.Conv2d(w[0] + w[1] + w[2], 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head; x (B,3,64,64) in [0,1] or uint8 (channels-last uint8 accepted)."""
        if x.dtype == torch.uint8:
            x = (x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x).float() / 255
        feats = [self.stem((x - 0.5) / 0.25)]  # (B, w0, 64, 64)
        for stage in self.stages:
            feats.append(stage(feats[-1]))  # (B, w1, 32, 32), (B, w2, 16, 16), (B, w3, 8, 8)
        top = feats[-1]
        g = torch.cat([self.squeeze(top).flatten(1), top.mean((2, 3))], 1)
        out = self.heads(self.mlp(g))  # (B, n_bg + 2 * n_slot)
        nb = len(BACKGROUNDS)
        slots = out[:, nb:].reshape(len(x), 2, -1).split(list(SLOT_HEADS.values()), -1)  # each (B, 2, n)
        heads = dict(zip(SLOT_HEADS, slots), background=out[:, :nb])
        heads["xy"] = torch.sigmoid(heads["xy"])  # (B, 2, 2) centre / 64
        up = [F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False) for f in feats[1:3]]
        heads["mask"] = self.mask_head(torch.cat([feats[0], *up], 1))[:, 0]  # (B, 64, 64) logits
        return heads


# ---------------------------------------------------------------------------- data
def render_batch(rng: np.random.Generator, n: int, patterns_p: float = 0.5) -> dict[str, np.ndarray]:
    """Render n random scenes (1 or 2 objects, 50/50) with oracle targets (slots left to right).

    For stripes and checks the two colours are symmetric, so targets list them in COLORS order.
    """
    out = {"image": np.zeros((n, 64, 64, 3), np.uint8), "mask": np.zeros((n, 64, 64), bool),
           "background": np.zeros(n, np.int64), "cls": np.zeros((n, 2), np.int64),
           "color": np.full((n, 2), IGNORE), "pattern": np.full((n, 2), IGNORE),
           "color2": np.full((n, 2), IGNORE), "xy": np.zeros((n, 2, 2), np.float32)}
    for i in range(n):
        scene = sample_scene(rng, n_objects=int(rng.integers(1, 3)), patterns=bool(rng.random() < patterns_p))
        img, masks = render(scene, seed=int(rng.integers(2**31)))
        out["image"][i], out["mask"][i] = img, masks.any(0)
        out["background"][i] = BACKGROUNDS.index(scene.background)
        for s, o in enumerate(sorted(scene.objects, key=lambda o: o.x)):
            c1, c2 = COLOR_NAMES.index(o.color), COLOR_NAMES.index(o.color2) if o.pattern else IGNORE
            c1, c2 = sorted((c1, c2)) if o.pattern in SYMMETRIC_PATTERNS else (c1, c2)
            out["cls"][i, s], out["color"][i, s], out["color2"][i, s] = CLASS_LABELS.index(o.cls), c1, c2
            out["pattern"][i, s] = PATTERN_LABELS.index(o.pattern or "none")
            out["xy"][i, s] = (o.x / 64, o.y / 64)
    return out


@dataclass
class _SceneStream(torch.utils.data.IterableDataset):
    """Endless batches of rendered scenes; each worker has its own seeded stream."""

    seed: int
    batch_size: int
    patterns_p: float

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            yield {k: torch.from_numpy(v) for k, v in render_batch(rng, self.batch_size, self.patterns_p).items()}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Diffusion-like corruption of x (B,3,H,W) in [0,1]: colour jitter, blur, smoothing, noise."""
    B = x.shape[0]
    r = lambda *s: torch.rand(*s, device=x.device, generator=gen)  # noqa: E731
    gray = x.mean(1, keepdim=True)
    x = gray + (x - gray) * (0.8 + 0.4 * r(B, 1, 1, 1))  # saturation
    x = x * (0.9 + 0.2 * r(B, 3, 1, 1)) + 0.1 * (r(B, 3, 1, 1) - 0.5)  # per-channel gain + offset
    sigma = (r(B) * (r(B) < 0.7)).clamp_min(1e-3)  # gaussian blur sigma 0-1 px, 70% of images
    k = torch.exp(-torch.arange(-2, 3, device=x.device).float() ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B*3, 5)
    y = F.pad(x.reshape(1, B * 3, *x.shape[-2:]), (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(y, (k[:, :, None] * k[:, None, :])[:, None], groups=B * 3).reshape_as(x)  # (B*3, 1, 5, 5)
    soft = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    a = r(B, 1, 1, 1) * (r(B, 1, 1, 1) < 0.3)  # JPEG/VAE-like smoothing on 30%
    x = x * (1 - a) + soft * a
    x = x + 0.04 * r(B, 1, 1, 1) * torch.randn(x.shape, device=x.device, generator=gen)
    return x.clamp(0, 1)


def oracle_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of CE (background, slot attributes), L1 (slot centres) and BCE (union mask)."""
    def ce(k: str) -> torch.Tensor:  # mean over labelled entries; 0 when there are none
        target = batch[k].flatten()
        total = F.cross_entropy(out[k].float().flatten(0, -2), target, ignore_index=IGNORE, reduction="sum")
        return total / (target != IGNORE).sum().clamp_min(1)

    present = (batch["cls"] > 0).float()[..., None]
    xy = ((out["xy"].float() - batch["xy"]).abs() * present).sum() / present.sum().clamp_min(1)
    mask = F.binary_cross_entropy_with_logits(out["mask"].float(), batch["mask"].float())
    return ce("background") + ce("cls") + ce("color") + ce("pattern") + ce("color2") + 5 * xy + mask


# ---------------------------------------------------------------------------- training and evaluation
def train_oracle(steps: int = 4000, batch_size: int = 256, device: str | torch.device = "cuda", seed: int = 0,
                 config: OracleTrainConfig | None = None) -> tuple[Oracle, dict]:
    """Train an oracle on scenes rendered on the fly; returns it (eval mode) and metrics."""
    cfg, device = config or OracleTrainConfig(), torch.device(device)
    torch.manual_seed(seed)
    oracle = Oracle().to(device)
    cuda = device.type == "cuda"
    workers = cfg.num_workers if cfg.num_workers is not None else (min(15, (os.cpu_count() or 2) - 1) if cuda else 0)
    loader = torch.utils.data.DataLoader(
        _SceneStream(seed, batch_size, cfg.patterns_p), batch_size=None, num_workers=workers,
        pin_memory=cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    opt = torch.optim.AdamW(oracle.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, i / max(1, steps)))))
    gen = torch.Generator(device=device).manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for step, batch in zip(range(steps), loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        x = batch["image"].permute(0, 3, 1, 2).float() / 255  # (B, 3, 64, 64)
        x = augment(x, gen) if cfg.augment else x
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = oracle_loss(oracle(x), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
        if step % 500 == 0:
            log.info("oracle step %d/%d loss %.4f", step, steps, loss.item())
    seconds, losses = time.perf_counter() - t0, torch.stack(losses).float().cpu().numpy()
    oracle.eval()
    k = max(1, min(10, len(losses) // 4))
    metrics = {"steps": steps, "batch_size": batch_size, "seconds": seconds,
               "images_per_s": steps * batch_size / seconds,
               "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
               "params": sum(p.numel() for p in oracle.parameters())}
    if cfg.eval_n:
        metrics["eval"] = evaluate_oracle(oracle, n=cfg.eval_n, seed=seed + 1)
    return oracle, metrics


@torch.no_grad()
def evaluate_oracle(oracle: Oracle, n: int = 2000, seed: int = 1, augment_images: bool = False) -> dict:
    """Accuracy of every attribute on n fresh renders (patterns half the time), mask IoU, xy error (px)."""
    data = render_batch(np.random.default_rng([seed, 10**6]), n)
    device = next(oracle.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    xs = torch.from_numpy(data["image"]).to(device).permute(0, 3, 1, 2).float() / 255  # (n, 3, 64, 64)
    outs = [oracle.eval()(augment(x, gen) if augment_images else x) for x in xs.split(250)]
    p = {k: torch.cat([o[k].float() if k in ("xy", "mask") else o[k].argmax(-1) for o in outs]).cpu().numpy()
         for k in outs[0]}
    present, pat, pm, tm = data["cls"] > 0, data["color2"] != IGNORE, p["mask"] > 0, data["mask"]
    iou = (pm & tm).sum((1, 2)) / np.maximum((pm | tm).sum((1, 2)), 1)
    acc = {k: float((p[k] == data[k])[present].mean()) for k in ("cls", "color", "pattern")}
    return {"background": float((p["background"] == data["background"]).mean()),
            "n_objects": float(((p["cls"][:, 1] > 0) == present[:, 1]).mean()), **acc,
            "color2": float((p["color2"] == data["color2"])[pat].mean()) if pat.any() else float("nan"),
            "mask_iou": float(iou.mean()),
            "xy_err_px": float(np.abs(p["xy"] - data["xy"]).max(-1)[present].mean()) * 64}


# ---------------------------------------------------------------------------- weights and reading
def save_oracle(oracle: Oracle, path: str | Path = ORACLE_PATH) -> Path:
    """Save fp16 weights (+ config in the metadata) as safetensors; returns the path."""
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in oracle.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(oracle.config))})
    return path


def load_oracle(device: str | torch.device = "cpu", path: str | Path = ORACLE_PATH) -> Oracle:
    """Load the shipped oracle (eval mode, fp32) from safetensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no oracle weights at {path}; train one with `python -m prkit.world.train --stage "
                                f"oracle --out DIR` (it writes DIR/oracle.safetensors; add --ship to install it "
                                f"as the shipped oracle) and pass its path")
    if path.is_dir():  # safe_open said "No such device (os error 19)"
        raise IsADirectoryError(f"{path} is a folder; pass the oracle's weights file in it, e.g. "
                                f"{path / 'oracle.safetensors'}")
    try:  # a file of other weights listed every missing key; a broken one said "header too small", naming no file
        with safe_open(str(path), "pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
        oracle = Oracle(OracleConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}))
        oracle.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    except (SafetensorError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{path} holds no oracle weights ({str(err).splitlines()[0][:200]}); pass a file that "
                         "`python -m prkit.world.train --stage oracle` wrote (DIR/oracle.safetensors)") from err
    return oracle.to(device).eval()


_default_oracle = functools.lru_cache(maxsize=2)(lambda device: load_oracle(device))


@torch.no_grad()
def read(images: list | np.ndarray | torch.Tensor, oracle: Oracle | None = None) -> list[dict]:
    """Read images back into scenes: background, 1-2 objects (left to right) and the union mask.

    Args:
        images: PIL images, numpy arrays or tensors, one image or a batch or a list of them, uint8 or floats in
            [0, 1], grey/RGB/RGBA, any size (each resized to 64); see ``prkit.world.oracle_input``.
        oracle: defaults to `load_oracle()` on CPU (cached).
    Returns:
        one dict per image: {"background", "objects": [{"cls", "color", "pattern", "color2", "x", "y"}]
        (1 or 2, x/y in px of 64), "mask": (64, 64) bool union of objects}. For stripes and checks the
        two colours come in COLORS order (their order is not readable). An empty input gives [].
    """
    oracle = oracle if oracle is not None else _default_oracle("cpu")
    x = _as_batch(images, next(oracle.parameters()).device)
    if not len(x):
        return []
    outs = [oracle.eval()(x[i:i + 256]) for i in range(0, len(x), 256)]
    out = {k: torch.cat([o[k].float().cpu() for o in outs]) for k in outs[0]}
    idx = {k: out[k].argmax(-1).tolist() for k in ("background", "cls", "color", "pattern", "color2")}
    first = (out["cls"][:, 0, 1:].argmax(-1) + 1).tolist()  # slot 0 always holds an object
    results = []
    for j in range(len(x)):
        objects = []
        for s, cls in enumerate((first[j], idx["cls"][j][1])):
            pattern = idx["pattern"][j][s]
            if cls:
                objects.append({"cls": CLASS_LABELS[cls], "color": COLOR_NAMES[idx["color"][j][s]],
                                "pattern": PATTERN_LABELS[pattern] if pattern else None,
                                "color2": COLOR_NAMES[idx["color2"][j][s]] if pattern else None,
                                "x": float(out["xy"][j, s, 0]) * 64, "y": float(out["xy"][j, s, 1]) * 64})
        results.append({"background": BACKGROUNDS[idx["background"][j]], "objects": objects,
                        "mask": (out["mask"][j] > 0).numpy()})
    return results
