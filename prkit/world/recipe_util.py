"""Shared pieces of the world recipe (``python -m prkit.world.train``): package paths, the model and
noise-schedule configs, ``RecipeConfig``, and the small helpers every stage uses (timing, device, LR schedule).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("prkit.world.train")

WORLD_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = WORLD_DIR / "tokenizer"
MODEL_DIR = WORLD_DIR / "model"
ORACLE_FILE = WORLD_DIR / "oracle" / "oracle.safetensors"
STAGES = ("data", "vae", "oracle", "oracle_vae", "unet", "export", "eval")
SIZE_LIMIT_MB = 30.0  # pipeline folder + oracle
PROVENANCE = "prkit_world.json"  # recipe provenance written into the exported pipeline folder
# the world's own training defaults, written as the exported folder's prkit_defaults.json (prkit.pipeline reads it):
# the narrow world learns a pattern faster at lr 1e-2 than at METHOD's 1e-3 (RECIPE.md, world_bench*.csv)
PERSONALIZATION_DEFAULTS = {"residuals": {"learning_rate": 1e-2}}


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
    caption_drop_colors: float = 0.0  # chance that an object is captioned without its colours ('a ball', 'a striped
    # ball'); run 4 uses 0.3 so that a prompt with neither colour nor pattern ('a sks ball') asks for a plain object
    caption_drop_attributes: float = 0.0  # chance that a plain object is captioned by its class alone ('a ball'), so
    # that 'a ball' asks for any ball, plain or patterned (run 8)
    caption_drop_attributes_patterned: float | None = None  # the same for a patterned object (None: as plain ones);
    # the patterned share of 'a ball' sets how often the base model draws a given pattern for 'a sks ball'
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
    pad_side: str | None = None  # "left": pads before the caption, so that (causal text encoder) they carry nothing of
    # it and the UNet must read each word's own token (runs 6-7); "right" is runs 1-5 (the pads summarise the caption);
    # None: the side of the model it continues (--init-from's tokenizer config, a resumed checkpoint), else "right"
    eos_dropout: float = 0.0  # with pad_side="left": chance that the caption's end token (its one remaining summary)
    # is replaced by the empty caption's during UNet training, so that the words themselves must carry it
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


def _to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B,64,64,3) uint8 -> (B,3,64,64) float in [-1, 1]."""
    return x_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1
