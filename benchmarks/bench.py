"""GPU benchmark of prkit: personalization speed and memory, LAG sampling cost, SDXL shapes.

    rm -rf ~/.nv/ComputeCache; python benchmarks/bench.py cold --out DIR --tag 1   # fresh process, empty JIT cache
    python benchmarks/bench.py sd15 --out DIR     # SD1.5 training (ours eager / fast / peft LoRA r4), sampling
    python benchmarks/bench.py sdxl --out DIR     # SDXL 1024 recipe, step times, sampling
    python benchmarks/bench.py steps --out DIR    # fast step NCHW vs channels-last, each attention kernel
    python benchmarks/bench.py ratios --out DIR   # one process: fast recipe first/again, straightforward, peft
    python benchmarks/bench.py diag --out DIR     # kernel profile of the fast step, SDPA backends, LAG's small ops
    python benchmarks/bench.py table --out DIR    # merge DIR/bench_*.json into DIR/bench.json and print one table
    python benchmarks/bench.py all --tiny         # CPU smoke test of every part on tiny models

Each subcommand is its own process (fresh CUDA context) and writes DIR/bench_<what><tag>.json. Full-size UNet,
text encoders and VAE are built from the published configs in prkit.arch with random weights on the GPU: nothing
is downloaded. Every ratio compares numbers measured in the same process on the same card.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prkit  # noqa: E402
import prkit.train as train  # noqa: E402
from prkit import fast as fastmod  # noqa: E402
from prkit.arch import TEXT_CONFIGS, UNET_CONFIGS, VAE_CONFIG  # noqa: E402
from prkit.residuals import remove_residuals, residual_names  # noqa: E402

TOKENIZER = Path(prkit.__file__).resolve().parent / "world" / "tokenizer"
TOKEN, CLASS = "qrv", "star"  # single tokens of the embedded world tokenizer
PROMPT = f"a photo of a {TOKEN} {CLASS} on the beach"
GB = 1e9

SDXL_TEXT = {  # CLIP ViT-L and OpenCLIP bigG, as SDXL ships them
    "l": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "g": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
}
TINY_UNET = {
    "sd15": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8),
    "sdxl": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
}
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=8, sample_size=16)


class Bench:
    """Clock, device helpers, the result tree and the budget of one benchmark process."""

    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.start = time.perf_counter()
        self.results: dict = {"env": env_info(self), "sections": {}}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn):
        self.sync()
        t = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t, out

    def mem_reset(self) -> None:
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def mem(self) -> dict:
        if not self.cuda:
            return {}
        return {"peak_alloc_GB": torch.cuda.max_memory_allocated() / GB,
                "peak_reserved_GB": torch.cuda.max_memory_reserved() / GB,
                "resident_GB": torch.cuda.memory_allocated() / GB}

    def record(self, section: str, key: str, value) -> None:
        self.results["sections"].setdefault(section, {})[key] = value
        print(f"[{self.elapsed():6.1f}s] {section}.{key}: {json.dumps(value, default=str)}", flush=True)
        self.save()

    def save(self) -> None:
        name = getattr(self, "json_name", "bench.json")
        (self.out / name).write_text(json.dumps(self.results, indent=1, default=str))

    def guarded(self, section: str, key: str, fn, need: float = 0.0):
        """Run one measurement; a failure or a spent budget is recorded, not fatal."""
        if self.left() < need:
            self.record(section, key, {"skipped": f"budget: {self.left():.0f}s left, needs ~{need:.0f}s"})
            return None
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - the table must still come out
            import traceback

            traceback.print_exc()
            value = {"error": f"{type(err).__name__}: {err}"[:500]}
            if self.cuda:
                torch.cuda.synchronize()
        self.record(section, key, value)
        return value


def env_info(bench) -> dict:
    import diffusers
    import transformers

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if bench.cuda:
        info["card"] = torch.cuda.get_device_name()
        info["sdpa_backends"] = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                                 for k in ("flash", "mem_efficient", "cudnn", "math")}
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"unavailable: {err}"
    else:
        info["card"] = "cpu"
    return info


# ---------------------------------------------------------------- models

def build(bench, arch: str):
    """A full-size (or tiny) SD1.5/SDXL pipeline with random weights on the device, and a 5-image concept."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from prkit.data import Concept

    tiny, device, dtype = bench.tiny, bench.device, bench.dtype
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET[arch] if tiny else UNET_CONFIGS[arch]))
        vae_cfg = TINY_VAE if tiny else dict(VAE_CONFIG, **({"scaling_factor": 0.13025, "sample_size": 1024}
                                                             if arch == "sdxl" else {}))
        vae = AutoencoderKL(**vae_cfg)
        if arch == "sdxl":
            te1 = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else SDXL_TEXT["l"])))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**(TINY_TEXT if tiny else SDXL_TEXT["g"])))
        else:
            te1 = CLIPTextModel(CLIPTextConfig(**(dict(TINY_TEXT, hidden_size=32) if tiny else TEXT_CONFIGS["sd15"])))
    modules = [unet, vae, te1] + ([te2] if arch == "sdxl" else [])
    for m in modules:
        m.to(dtype).eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=scheduler, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te1, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    side = (unet.config.sample_size * pipe.vae_scale_factor)
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(5)]
    concept = Concept(images=images, token=TOKEN, class_word=CLASS, paths=[])
    return pipe, concept


def convert(pipe, dtype) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(dtype)


# ---------------------------------------------------------------- measurements

def matmul_peak(bench) -> dict:
    n = 2048 if bench.tiny or not bench.cuda else 8192
    a, b = (torch.randn(n, n, device=bench.device, dtype=bench.dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10 if bench.cuda else 2):
        times.append(bench.timed(lambda: a @ b)[0])
    t = float(np.median(times))
    return {"n": n, "median_ms": t * 1e3, "tflops": 2 * n ** 3 / t / 1e12}


def _prepare(pipe, concept, batch: int, *, seed: int = 0, encode_batch: int = 1):
    """The cache, expanded conditioning, scheduler and a generator, as the training loops build them."""
    from diffusers import DDPMScheduler

    prompt = f"a photo of a {concept.token} {concept.class_word}"
    cache = train._Cache(pipe, concept, prompt, True, encode_batch=encode_batch)
    cond = fastmod._contiguous(train._expand(cache.cond, batch))
    return cache, cond, DDPMScheduler.from_config(pipe.scheduler.config), torch.Generator().manual_seed(seed)


def _residuals(pipe, name: str, *, randomize: float = 0.0):
    res = prkit.add_residuals(pipe.unet, 0.05, name, token=TOKEN, class_word=CLASS, seed=0)
    params = list(res.parameters())
    with torch.no_grad():
        for p in params:
            p.data = p.data.float()
        if randomize:
            gen = torch.Generator().manual_seed(1)
            for lr in res.factors().values():
                lr.up.copy_(torch.randn(lr.up.shape, generator=gen) * randomize)
    for p in params:
        p.requires_grad_(True)
    return res, params


def _drop(pipe, name: str) -> None:
    remove_residuals(pipe.unet, name)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_flops(bench, pipe, concept, batch: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cache, cond, scheduler, gen = _prepare(pipe, concept, batch)
    res, params = _residuals(pipe, "flops")
    unet = pipe.unet
    noisy, steps, target = (t.to(bench.device) for t in cache.batch(batch, gen, scheduler, bench.device))
    try:
        unet.train()
        with FlopCounterMode(display=False) as fwd_counter, torch.no_grad():
            unet(noisy[:1].to(unet.dtype), steps[:1], **{k: (v[:1] if torch.is_tensor(v) else
                                                              {kk: vv[:1] for kk, vv in v.items()})
                                                          for k, v in cond.items()})
        with FlopCounterMode(display=False) as counter:
            pred = unet(noisy.to(unet.dtype), steps, **cond).sample
            F.mse_loss(pred.float(), target).backward()
    finally:
        unet.eval()
        for p in params:
            p.requires_grad_(False)
        _drop(pipe, "flops")
    total = counter.get_total_flops()
    return {"forward_per_image_TFLOP": fwd_counter.get_total_flops() / 1e12, "step_TFLOP": total / 1e12,
            "per_image_fwd_bwd_TFLOP": total / batch / 1e12}


def time_straightforward(bench, pipe, concept, batch: int, n: int, amp=None, scaler=None) -> dict:
    """ms/step of train.py's eager step as it runs today: autocast, per-step .item(), foreach AdamW."""
    amp = amp or bench.dtype if bench.cuda else None
    cache, cond, scheduler, gen = _prepare(pipe, concept, batch, encode_batch=8)
    res, params = _residuals(pipe, "straight")
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    config = train.TrainConfig(batch_size=batch)
    unet = pipe.unet
    unet.train()
    try:
        bench.mem_reset()

        def one():
            loss = train._step(unet, cache, cond, None, None, config, scheduler, gen, bench.device, amp)
            value = loss.item()
            train._backward(loss, opt, scaler, params, None)
            return value

        for _ in range(3):
            one()
        seconds, values = bench.timed(lambda: [one() for _ in range(n)])
        out = {"ms_per_step": seconds / n * 1e3, "steps": n, "finite": all(math.isfinite(v) for v in values)}
        out.update(bench.mem())
        return out
    finally:
        unet.eval()
        for p in params:
            p.requires_grad_(False)
        del opt
        _drop(pipe, "straight")


def time_fast(bench, pipe, concept, batch: int, n: int, fast=None, *, amp=None, grad_ckpt: bool = False) -> dict:
    """ms/step of the fast loop's step (static buffers, CUDA graph replay, loss copy, no host sync)."""
    fast = fast or fastmod.FastConfig()
    amp = amp if amp is not None else (bench.dtype if bench.cuda else None)
    cache, cond, scheduler, gen = _prepare(pipe, concept, batch)
    res, params = _residuals(pipe, "fastbench")
    opt = fastmod.make_optimizer(params, 1e-3, 1e-2, bench.device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    drawn = [fastmod._draw([(cache, cond, 1.0)], batch, gen, scheduler) for _ in range(n + 1)]
    staged = fastmod._stage(drawn, bench.device)
    unet = pipe.unet
    unet.train()
    step = None
    try:
        bench.mem_reset()
        with fastmod.fast_modules(unet, fast, grad_ckpt):
            slot = fastmod._Slot((batch, *cache.mean.shape[1:]), cond, 1.0, unet.dtype, bench.device,
                                 fastmod.uses_channels_last(fast, bench.device))
            step = fastmod.TrainStep(unet, params, opt, [slot], amp=amp, scaler=scaler, cuda_graph=fast.cuda_graph,
                                     capture_first=fast.capture_first and not torch.backends.cudnn.benchmark)
            step.load([(s[0][0], s[1][0], s[2][0]) for s in staged])
            first, _ = bench.timed(step)
            losses = torch.empty(n, device=bench.device)

            def loop():
                for k in range(1, n + 1):
                    step.load([(s[0][k], s[1][k], s[2][k]) for s in staged])
                    step()
                    losses[k - 1].copy_(step.loss)

            seconds, _ = bench.timed(loop)
            graphed = step.graph is not None
        out = {"ms_per_step": seconds / n * 1e3, "steps": n, "first_call_s": first, "capture_s": step.capture_seconds,
               "graph": graphed, "capture_error": step.capture_error,
               "finite": bool(torch.isfinite(losses).all()), "config": vars(fast), "amp": str(amp),
               "gradient_checkpointing": grad_ckpt}
        out.update(bench.mem())
        return out
    finally:
        if step is not None:
            step.close()
        unet.eval()
        for p in params:
            p.requires_grad_(False)
        del opt
        _drop(pipe, "fastbench")


class _LogGrab(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _graph_state(lines: list[str]) -> bool | None:
    """Whether the fast loop replayed a CUDA graph, from its log line (None: no fast loop ran). A capture that fell
    back to eager steps is recorded as such, never as the graph path."""
    said = [line for line in lines if line.startswith("fast loop:")]
    return None if not said else "graph on" in said[-1] and "capture failed" not in said[-1]


def recipe(bench, pipe, concept, *, steps: int, batch: int, fast: bool | None, name: str, **overrides) -> dict:
    """The recipe end to end through the public API: caching, residuals, (capture,) all steps; no model loading."""
    grab = _LogGrab()
    logger = logging.getLogger("prkit.fast")
    logger.addHandler(grab)
    logger.setLevel(logging.INFO)
    bench.mem_reset()
    state = {}
    try:
        seconds, result = bench.timed(lambda: prkit.train_residuals(
            pipe, concept, steps=steps, batch_size=batch, seed=0, fast=fast, progress=False, name=name, **overrides))
        state = {k: v.detach().float().cpu() for k, v in result.residuals.state_dict().items()}
        out = {"seconds": seconds, "steps": result.steps_done, "loss_first": result.losses[0],
               "loss_last": result.losses[-1], "finite": all(math.isfinite(v) for v in result.losses),
               "fast_log": grab.lines, "overrides": overrides, "graph": _graph_state(grab.lines)}
        out.update(bench.mem())
    finally:
        logger.removeHandler(grab)
        if name in residual_names(pipe.unet):
            _drop(pipe, name)
    out["_state"] = state
    out["_losses"] = result.losses
    return out


def recipe_with(bench, pipe, concept, choice: dict, **kwargs) -> dict:
    """``recipe`` with these FastConfig fields, handed through the public API (``fast=FastConfig(...)``)."""
    return recipe(bench, pipe, concept, **{**kwargs, "fast": fastmod.FastConfig(**choice)})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def numerics(bench, pipe, concept, batch: int) -> dict:
    """Same batch, same seed: the straightforward step and the fast step (one eager step, then the graph replay)."""
    amp = bench.dtype if bench.cuda else None
    cache, cond, scheduler, gen = _prepare(pipe, concept, batch)
    noisy, steps, target = cache.batch(batch, gen, scheduler, torch.device("cpu"))
    unet = pipe.unet
    res, params = _residuals(pipe, "numerics", randomize=1e-2)  # non-zero up: the residuals shape the loss
    unet.train()
    out = {}
    try:
        with torch.autocast(bench.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            pred = unet(noisy.to(bench.device, unet.dtype), steps.to(bench.device), **cond).sample
        loss_a = F.mse_loss(pred.float(), target.to(bench.device).float())
        loss_a.backward()
        grads_a = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        # the eager graph's nodes must go before the capture: a live AccumulateGrad node of the default stream
        # invalidates it ("AccumulateGrad node's stream does not match"; the check then ran eagerly, graph false)
        loss_a_value = float(loss_a)
        del pred, loss_a
        opt = fastmod.make_optimizer(params, 1e-3, 1e-2, bench.device)
        snap = fastmod._Snapshot(params, opt, None)
        snap.take()
        with fastmod.fast_modules(unet, fastmod.FastConfig()):
            slot = fastmod._Slot((batch, *cache.mean.shape[1:]), cond, 1.0, unet.dtype, bench.device,
                                 fastmod.uses_channels_last(fastmod.FastConfig(), bench.device))  # as the loop feeds it
            # one eager step first (then the capture): the check compares the replay with it
            step = fastmod.TrainStep(unet, params, opt, [slot], amp=amp, capture_first=False)
            step.load([(noisy, steps, target)])
            loss_b = float(step())  # eager step (then capture)
            snap.restore()  # back to the same parameters and a fresh AdamW
            step.load([(noisy, steps, target)])
            loss_c = float(step())  # graph replay (eager again where capture is unavailable)
            grads_c = [p.grad.detach().clone() for p in params]
            out["graph"] = step.graph is not None
            step.close()
        la = loss_a_value
        out.update(loss_straightforward=la, loss_fast_eager=loss_b, loss_fast_graph=loss_c,
                   rel_loss_fast_vs_straight=abs(loss_c - la) / abs(la), rel_loss_graph_vs_eager=abs(loss_c - loss_b) / abs(loss_b),
                   grad_rel_err_max=max(_rel(c, a) for c, a in zip(grads_c, grads_a)),
                   grad_rel_err_median=float(np.median([_rel(c, a) for c, a in zip(grads_c, grads_a)])))
        # on a GPU the graph replay is what is checked: a capture that fell back to eager steps fails the check
        out["pass_bf16_tolerance"] = (out["rel_loss_fast_vs_straight"] < 1e-2 and out["grad_rel_err_max"] < 5e-2
                                      and (out["graph"] or not bench.cuda))
        return out
    finally:
        unet.eval()
        for p in params:
            p.requires_grad_(False)
        _drop(pipe, "numerics")


def trajectory(bench, pipe, concept, batch: int, steps: int) -> dict:
    """The public API both ways, same seed: per-step losses and final residuals."""
    a = recipe(bench, pipe, concept, steps=steps, batch=batch, fast=False, name="traj_a")
    b = recipe(bench, pipe, concept, steps=steps, batch=batch, fast=True, name="traj_b")
    rel = [abs(x - y) / abs(x) for x, y in zip(a["_losses"], b["_losses"])]
    state = max(_rel(b["_state"][k], a["_state"][k]) for k in a["_state"])
    return {"steps": steps, "loss_rel_diff_max": max(rel), "loss_rel_diff_first": rel[0],
            "loss_rel_diff_median": float(np.median(rel)), "residual_state_rel_diff_max": state,
            "losses_straightforward": a["_losses"][:5], "losses_fast": b["_losses"][:5]}


def time_peft(bench, pipe, concept, batch: int, n: int, e2e_steps: int) -> dict:
    """peft LoRA r4 on attention q/k/v/out as diffusers' train_dreambooth_lora.py runs it (bf16 weights, LoRA in
    the dtype peft gives it, accelerate-style autocast on the UNet; the VAE encodes the batch and the text encoder
    the prompt every step, in bf16; clip_grad_norm 1.0, torch AdamW, loss.item() every step)."""
    from diffusers import DDPMScheduler

    from prkit.targets import LORA_MODULES, PeftTarget

    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    device = bench.device
    pixels = concept.tensors()  # the data loader's CPU tensors (N, 3, R, R)
    ids = pipe.tokenizer(f"a photo of a {TOKEN} {CLASS}", padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.repeat(batch, 1)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    amp_on = bench.cuda
    out = {}

    def setup():
        torch.manual_seed(0)
        target = PeftTarget(unet, "peft", LORA_MODULES["lora"], 4)
        params = list(target.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        return target, params, opt

    def step(params, opt, cached=None):
        if cached is None:
            idx = torch.randint(len(pixels), (batch,))
            pv = pixels[idx].to(device, dtype=vae.dtype)
            latents = vae.encode(pv).latent_dist.sample() * vae.config.scaling_factor
            ehs = te(ids.to(device), attention_mask=None)[0]
        else:
            latents, ehs = cached
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=latents.device).long()
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_on):
            pred = unet(noisy, t, ehs, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        return loss.detach().item()

    unet.train()
    target = None
    try:
        bench.mem_reset()
        target, params, opt = setup()
        out["lora_params"] = sum(p.numel() for p in params)
        out["lora_dtype"] = str(params[0].dtype)
        for _ in range(3):
            step(params, opt)
        seconds, _ = bench.timed(lambda: [step(params, opt) for _ in range(n)])
        out["ms_per_step"] = seconds / n * 1e3
        out.update(bench.mem())
        with torch.no_grad():
            latents = vae.encode(pixels[:batch].to(device, vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
            ehs = te(ids.to(device))[0]
        seconds, _ = bench.timed(lambda: [step(params, opt, (latents, ehs)) for _ in range(n)])
        out["ms_per_step_cached_latents_text"] = seconds / n * 1e3
        pipe.unet.unload_lora()
        target = None
        if e2e_steps and bench.left() > e2e_steps * out["ms_per_step"] / 1e3 + 30:
            def run():
                nonlocal target
                target, params, opt = setup()
                return [step(params, opt) for _ in range(e2e_steps)]
            seconds, values = bench.timed(run)
            out["e2e_seconds"] = seconds
            out["e2e_steps"] = e2e_steps
            out["finite"] = all(math.isfinite(v) for v in values)
        return out
    finally:
        unet.eval()
        if target is not None:
            pipe.unet.unload_lora()
        gc.collect()


def time_sampling(bench, pipe, res, *, batch: int, lag: bool, fast: bool, hi: int, lo: int) -> dict:
    """ms per denoising step (CFG) from two call lengths, so text encoding and graph capture cancel out."""
    prompts = [PROMPT] * batch

    def run(steps):
        return prkit.generate(pipe, prompts, res, lag=lag, steps=steps, fast=fast, output_type="latent")

    run(lo)
    t_hi, latents = bench.timed(lambda: run(hi))
    t_lo, _ = bench.timed(lambda: run(lo))
    return {"ms_per_step": (t_hi - t_lo) / (hi - lo) * 1e3, "call_s": t_hi, "steps": hi, "batch": batch,
            "finite": bool(torch.isfinite(latents).all())}


def cfg_unet_inputs(bench, pipe, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, timestep, [uncond; cond] prompt embeddings) of one CFG UNet call on ``batch`` images of PROMPT."""
    with torch.inference_mode():
        pos, neg = pipe.encode_prompt(PROMPT, bench.device, batch, True)
        side = pipe.unet.config.sample_size
        latents = torch.randn(2 * batch, 4, side, side, device=bench.device, dtype=pipe.unet.dtype)
        return latents, torch.tensor(500, device=bench.device), torch.cat([neg, pos])


# LAG variants timed against each other (unet_lag_overhead modes): the default is "lag"
LAG_MODES = {
    "lag": {},
    "lag_inline": {"side": False},  # mask work on the current stream
    "lag_rows": {"layout": False},  # bool (rows, N) masks broadcast onto the middle (the path before layout_mask)
}


def unet_lag_overhead(bench, pipe, res, *, batch: int, graph: bool, n: int = 40, rounds: int = 3,
                      modes: tuple[str, ...] = ("plain", "lag")) -> dict:
    """UNet forward ms (CFG batch) plain vs LAG, alternating rounds (the order reversed every other round, so drift
    and order cancel), wall clock between device syncs; the pipeline adds the same scheduler and guidance work to
    both, so this is the upper bound of LAG's share of a denoising step. Plain is diffusers' own processors, as a
    user samples without LAG (LAG's attn2 processor also skips their division by rescale_output_factor, 1.0:
    ~0.3% of the UNet, BENCHMARKS.md).
    Modes: plain and the keys of LAG_MODES (lag: the default; lag_inline: mask work on the current stream;
    lag_rows: bool row masks broadcast onto the middle)."""
    import contextlib

    import prkit.attention as attention
    import prkit.lag as lagmod
    from prkit.graphs import graphed_unet
    from prkit.lag import lag_sampling
    from prkit.residuals import only_residuals

    unet = pipe.unet
    latents, t, emb = cfg_unet_inputs(bench, pipe, batch)
    times = {mode: [] for mode in modes}
    outputs = {}
    for round_ in range(rounds):
        for mode in (modes if round_ % 2 == 0 else tuple(reversed(modes))):
            knobs = LAG_MODES.get(mode, {})
            lag_ctx = (lag_sampling(unet, res, [PROMPT] * batch, tokenizer=pipe.tokenizer, cfg=True)
                       if mode != "plain" else contextlib.nullcontext())
            attention.SIDE_STREAM = knobs.get("side", True)
            lagmod.LAYOUT_MASKS = knobs.get("layout", True)
            try:
                with torch.inference_mode(), only_residuals(unet, [res.name]), lag_ctx, \
                        graphed_unet(unet, enabled=graph):
                    def run():
                        return unet(latents, t, encoder_hidden_states=emb, return_dict=False)[0]
                    for _ in range(3):
                        outputs[mode] = run().clone()
                    seconds, _ = bench.timed(lambda: [run() for _ in range(n)])
            finally:
                attention.SIDE_STREAM, lagmod.LAYOUT_MASKS = True, True
            times[mode].append(seconds / n * 1e3)
    median = {mode: float(np.median(v)) for mode, v in times.items()}
    out = {f"unet_ms_{mode}": ms for mode, ms in median.items()}
    out.update({f"overhead_pct_{mode}": 100 * (median[mode] - median["plain"]) / median["plain"]
                for mode in modes if mode != "plain"})
    out["overhead_pct"] = out.get("overhead_pct_lag")
    for mode in ("lag_inline", "lag_rows"):
        if "lag" in outputs and mode in outputs:
            out[f"{mode}_equals_lag"] = bool(torch.equal(outputs["lag"], outputs[mode]))
    out.update({"rounds_ms": times, "batch": batch, "graph": graph})
    return out


def images_per_second(bench, pipe, res, *, batch: int, steps: int, fast: bool, lag: bool = False) -> dict:
    prompts = [PROMPT] * batch
    bench.mem_reset()
    prkit.generate(pipe, prompts[:1], res, lag=lag, steps=2, fast=fast)
    seconds, images = bench.timed(lambda: prkit.generate(pipe, prompts, res, lag=lag, steps=steps, fast=fast))
    out = {"images_per_s": len(images) / seconds, "seconds": seconds, "batch": batch, "steps": steps}
    out.update(bench.mem())
    return out


# ---------------------------------------------------------------- sections

def section_train(bench, pipe, concept):
    s, B = "sd15_train", 4
    steps = bench.args.steps
    n = 5 if bench.tiny else 30
    bench.guarded(s, "recipe_fast_cold", lambda: _public(recipe(bench, pipe, concept, steps=steps, batch=B,
                                                                fast=True, name="cold")))
    bench.guarded("env", "matmul_peak", lambda: matmul_peak(bench))
    bench.guarded(s, "flops", lambda: count_flops(bench, pipe, concept, B))
    bench.guarded(s, "numerics_same_batch", lambda: numerics(bench, pipe, concept, B))
    bench.guarded(s, "step_straightforward", lambda: time_straightforward(bench, pipe, concept, B, max(3, n // 2)))
    variants = {
        "step_fast_default": fastmod.FastConfig(),
        "step_fast_eager_no_graph": fastmod.FastConfig(cuda_graph=False),
        "step_fast_no_frozen_conv": fastmod.FastConfig(frozen_conv=False),
        "step_fast_lean_blocks": fastmod.FastConfig(lean_blocks=True),
        "step_fast_sdpa_torch_choice": fastmod.FastConfig(sdpa_backends=None),  # cuDNN attention on an H100
        **STEP_VARIANTS,
    }
    for key, cfg in variants.items():
        bench.guarded(s, key, lambda cfg=cfg: time_fast(bench, pipe, concept, B, n, cfg), need=20)
    bench.guarded(s, "recipe_fast_warm", lambda: _public(recipe(bench, pipe, concept, steps=steps, batch=B,
                                                                fast=True, name="warm")), need=15)
    for key, choice in (("recipe_fast_warm_cudnn", dict(sdpa_backends=None)),
                        ("recipe_fast_warm_nchw", dict(channels_last=False, fused_geglu=False,
                                                       cudnn_attention_from=None))):
        bench.guarded(s, key, lambda choice=choice, key=key: _public(recipe_with(
            bench, pipe, concept, choice, steps=steps, batch=B, fast=True, name=key)), need=15)
    bench.guarded(s, "recipe_straightforward", lambda: _public(recipe(bench, pipe, concept, steps=steps, batch=B,
                                                                      fast=False, name="plain")), need=30)
    bench.guarded(s, "trajectory_api", lambda: trajectory(bench, pipe, concept, B, 10 if not bench.tiny else 4),
                  need=20)
    bench.guarded(s, "mode_bf16_grad_ckpt", lambda: time_fast(bench, pipe, concept, B, n // 2, grad_ckpt=True),
                  need=15)
    if bench.cuda:
        convert(pipe, torch.float16)
        try:
            bench.guarded(s, "mode_fp16_scaler", lambda: time_fast(bench, pipe, concept, B, n // 2, amp=torch.float16),
                          need=15)
            bench.guarded(s, "mode_fp16_scaler_grad_ckpt", lambda: time_fast(
                bench, pipe, concept, B, n // 2, amp=torch.float16, grad_ckpt=True), need=15)
            bench.guarded(s, "mode_fp16_straightforward", lambda: time_straightforward(
                bench, pipe, concept, B, 5, amp=torch.float16, scaler=torch.amp.GradScaler("cuda")), need=15)
            bench.guarded(s, "recipe_fp16_scaler_grad_ckpt", lambda: _public(recipe(
                bench, pipe, concept, steps=steps, batch=B, fast=True, name="fp16", mixed_precision="fp16",
                gradient_checkpointing=True)), need=25)
        finally:
            convert(pipe, torch.bfloat16)


def section_peft(bench, pipe, concept):
    """Last on the SD1.5 pipe: it changes the UNet's layers (unloaded again afterwards)."""
    n = 5 if bench.tiny else 30
    bench.guarded("sd15_train", "peft_lora_r4_script", lambda: time_peft(
        bench, pipe, concept, 4, max(3, n // 2), 0 if bench.tiny else bench.args.steps), need=40)


STEP_VARIANTS = {  # the Triton kernels one by one (NCHW without them was the default before), both attentions
    "step_fast_nchw": fastmod.FastConfig(channels_last=False, fused_geglu=False, cudnn_attention_from=None),
    "step_fast_nchw_cudnn": fastmod.FastConfig(channels_last=False, fused_geglu=False, sdpa_backends=None),
    "step_fast_channels_last": fastmod.FastConfig(channels_last=True, fused_geglu=False, cudnn_attention_from=None),
    "step_fast_cl_geglu": fastmod.FastConfig(channels_last=True, fused_geglu=True, cudnn_attention_from=None),
    "step_fast_cl_geglu_long_cudnn": fastmod.FastConfig(channels_last=True, fused_geglu=True,
                                                        cudnn_attention_from=4096),
    "step_fast_cl_geglu_cudnn": fastmod.FastConfig(channels_last=True, fused_geglu=True, sdpa_backends=None),
}


def section_steps(bench):
    """ms/step of the fast step with and without the Triton kernels (NHWC GroupNorm, GEGLU), and the norms alone."""
    pipe, concept = build(bench, "sd15")
    n = 5 if bench.tiny else 30
    for rounds in range(2):  # alternate, so that drift shows
        for key, cfg in STEP_VARIANTS.items():
            bench.guarded("steps", f"{key}_{rounds}", lambda cfg=cfg: time_fast(bench, pipe, concept, 4, n, cfg),
                          need=20)
    if bench.cuda:
        bench.guarded("steps", "group_norm_parts", lambda: group_norm_parts(bench))
    bench.guarded("steps", "profile_fast_step", lambda: profile_step(bench, pipe, concept))


def group_norm_parts(bench) -> dict:
    """Forward + backward of GroupNorm + SiLU at the SD1.5 training shapes (batch 4): torch NCHW, torch
    channels-last, prkit's NHWC kernel; CUDA-graph replay times, ms summed over the shapes of one UNet step."""
    from prkit.kernels.group_norm_nhwc import group_norm_nhwc

    # (channels, latent side, count per step): resnet norms + transformer norms of SD1.5 at 512 px
    shapes = [(320, 64, 13), (640, 64, 2), (960, 64, 1), (640, 32, 9), (960, 32, 2), (1280, 32, 4),
              (1280, 16, 16), (1920, 16, 2), (2560, 16, 2), (1280, 8, 10), (2560, 8, 6)]
    ways = {
        "torch_nchw": lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-5)),
        "torch_channels_last": lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-5)),
        "prkit_nhwc": lambda x, w, b: group_norm_nhwc(x, 32, w, b, 1e-5, silu=True),
    }
    out = {}
    for way, fn in ways.items():
        total = 0.0
        for channels, side, count in shapes:
            x = torch.randn(4, channels, side, side, device=bench.device, dtype=bench.dtype)
            if way != "torch_nchw":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            w = torch.randn(channels, device=bench.device, dtype=bench.dtype)
            b = torch.randn(channels, device=bench.device, dtype=bench.dtype)
            grad = torch.randn_like(x)

            def run(x=x, w=w, b=b, grad=grad, fn=fn):
                x.grad = None
                fn(x, w, b).backward(grad)
            total += _graph_ms(bench, run) * count
        out[f"{way}_ms"] = total
    return out


def section_sample(bench, pipe, concept, section: str = "sd15_sample", big: int = 16):
    s = section
    res, params = _residuals(pipe, "samp", randomize=1e-2)
    for p in params:
        p.requires_grad_(False)
    hi, lo = (4, 2) if bench.tiny else (50, 10)
    big = 2 if bench.tiny else big
    try:
        for fast in (True, False):
            mode = "graph" if fast else "eager"
            sizes = ((1, (hi, lo)),) + (((big, (hi // 2, lo // 2) if not bench.tiny else (hi, lo)),) if big else ())
            for batch, (h, l) in sizes:
                if fast and batch * 2 > 8:
                    continue  # the graph is only used up to a UNet batch of 8: the eager numbers are the ones
                for lag in (False, True):
                    key = f"{mode}_b{batch}_{'lag' if lag else 'plain'}"
                    bench.guarded(s, key, lambda b=batch, lg=lag, f=fast, h=h, l=l: time_sampling(
                        bench, pipe, res, batch=b, lag=lg, fast=f, hi=h, lo=l), need=10)
        for graph, batch in ((True, 1), (False, 1), (True, 4)):
            if section == "sd15_sample":
                bench.guarded(s, f"unet_lag_{'graph' if graph else 'eager'}_b{batch}", lambda g=graph, b=batch:
                              unet_lag_overhead(bench, pipe, res, batch=b, graph=g, n=4 if bench.tiny else 40), need=15)
        if section != "sd15_sample":
            return
        steps = 4 if bench.tiny else 50
        for batch in ((32,) if not bench.tiny else (2,)):
            bench.guarded(s, f"images_per_s_b{batch}", lambda b=batch: images_per_second(
                bench, pipe, res, batch=b, steps=steps, fast=None), need=40)
        bench.guarded(s, f"images_per_s_b{32 if not bench.tiny else 2}_lag", lambda: images_per_second(
            bench, pipe, res, batch=32 if not bench.tiny else 2, steps=steps, fast=None, lag=True), need=40)
    finally:
        _drop(pipe, "samp")


def section_sdxl(bench):
    s, B = "sdxl", 2
    pipe, concept = build(bench, "sdxl")
    steps = bench.args.steps
    n = 3 if bench.tiny else 10
    bench.record(s, "resident_after_build", bench.mem())
    bench.guarded(s, "recipe_fast_cold", lambda: _public(recipe(bench, pipe, concept, steps=steps, batch=B,
                                                                fast=True, name="xl")), need=40)
    bench.guarded(s, "flops", lambda: count_flops(bench, pipe, concept, B), need=20)
    bench.guarded(s, "numerics_same_batch", lambda: numerics(bench, pipe, concept, B), need=20)
    bench.guarded(s, "step_fast_default", lambda: time_fast(bench, pipe, concept, B, n), need=20)
    for key in ("step_fast_nchw", "step_fast_cl_geglu_cudnn"):
        bench.guarded(s, key, lambda key=key: time_fast(bench, pipe, concept, B, n, STEP_VARIANTS[key]), need=20)
    bench.guarded(s, "step_straightforward", lambda: time_straightforward(bench, pipe, concept, B, n), need=20)
    bench.guarded(s, "recipe_fast_warm", lambda: _public(recipe(bench, pipe, concept, steps=steps, batch=B,
                                                                fast=True, name="xlwarm")), need=40)
    section_sample(bench, pipe, concept, section="sdxl_sample", big=0)
    bench.guarded(s, "recipe_straightforward", lambda: _public(recipe(bench, pipe, concept, steps=steps, batch=B,
                                                                      fast=False, name="xlplain")), need=60)


def pipeline_lag_overhead(bench, pipe, res, *, hi: int, lo: int, rounds: int = 9) -> dict:
    """Whole-pipeline ms per denoising step (batch 1, CFG, graphs) plain vs LAG, alternating rounds: the medians
    (single calls move by several percent)."""
    times = {"plain": [], "lag": []}
    for _ in range(rounds):
        for mode in times:
            times[mode].append(time_sampling(bench, pipe, res, batch=1, lag=mode == "lag", fast=True, hi=hi,
                                             lo=lo)["ms_per_step"])
    plain, lag = float(np.median(times["plain"])), float(np.median(times["lag"]))
    return {"ms_per_step_plain": plain, "ms_per_step_lag": lag, "overhead_pct": 100 * (lag - plain) / plain,
            "rounds_ms": times, "steps": (hi, lo)}


def section_lag(bench):
    """LAG's cost with its mask work on the side stream vs inline, SD1.5 shapes: UNet forward (alternating
    rounds) and whole pipeline steps (50 steps, CFG)."""
    s = "lag"
    pipe, _ = build(bench, "sd15")
    res, params = _residuals(pipe, "lag", randomize=1e-2)
    for p in params:
        p.requires_grad_(False)
    modes = ("plain",) + tuple(LAG_MODES)
    n, rounds = (4, 2) if bench.tiny else (50, 5)
    hi, lo = (4, 2) if bench.tiny else (50, 10)
    try:
        for graph, batch in ((True, 1), (True, 4)):
            bench.guarded(s, f"unet_{'graph' if graph else 'eager'}_b{batch}", lambda g=graph, b=batch:
                          unet_lag_overhead(bench, pipe, res, batch=b, graph=g, n=n, rounds=rounds, modes=modes),
                          need=20)
        bench.guarded(s, "pipe_graph_b1", lambda: pipeline_lag_overhead(bench, pipe, res, hi=hi, lo=lo), need=30)
    finally:
        _drop(pipe, "lag")


def section_cold(bench):
    """First thing in a fresh process: the fast recipe, then again (warm), with the loop's own time split."""
    pipe, concept = build(bench, "sd15")
    tag = bench.args.tag
    overrides = {}
    if bench.args.sdpa:
        overrides["sdpa_backends"] = None if bench.args.sdpa == "torch" else tuple(bench.args.sdpa.split(","))
        bench.record("cold", f"{tag}_sdpa_backends", bench.args.sdpa)
    if bench.args.cudnn_from is not None:
        overrides["cudnn_attention_from"] = bench.args.cudnn_from or None
        bench.record("cold", f"{tag}_cudnn_attention_from", bench.args.cudnn_from)
    if bench.args.warm_up != "default":
        overrides["warm_up"] = bench.args.warm_up == "on"
        bench.record("cold", f"{tag}_warm_up", bench.args.warm_up)
    if bench.args.capture_first != "default":
        overrides["capture_first"] = bench.args.capture_first == "on"
        bench.record("cold", f"{tag}_capture_first", bench.args.capture_first)
    if bench.args.channels_last != "default":
        overrides["channels_last"] = bench.args.channels_last == "on"
        bench.record("cold", f"{tag}_channels_last", bench.args.channels_last)
    if bench.args.plan_ahead != "default":
        overrides["plan_ahead"] = bench.args.plan_ahead == "on"
        bench.record("cold", f"{tag}_plan_ahead", bench.args.plan_ahead)
    for key in (("cold", "warm") if bench.args.warm else ("cold",)):
        bench.guarded("cold", f"{tag}_{key}", lambda k=key: _public(recipe_with(
            bench, pipe, concept, overrides, steps=bench.args.steps, batch=4, fast=True, name=k)))


def section_ratios(bench):
    """One process, short: the fast recipe (its first run, then again), the steps, the straightforward and peft
    recipes, the fast recipe once more: the same-run ratios without the full sd15 section."""
    pipe, concept = build(bench, "sd15")
    s, steps = "ratios", bench.args.steps

    def fast_recipe(name):
        return _public(recipe(bench, pipe, concept, steps=steps, batch=4, fast=True, name=name))

    bench.guarded(s, "recipe_fast_first", lambda: fast_recipe("a"))
    bench.guarded(s, "recipe_fast_second", lambda: fast_recipe("b"))
    bench.guarded(s, "matmul_peak", lambda: matmul_peak(bench))
    bench.guarded(s, "step_fast", lambda: time_fast(bench, pipe, concept, 4, 30))
    bench.guarded(s, "step_straightforward", lambda: time_straightforward(bench, pipe, concept, 4, 15))
    bench.guarded(s, "recipe_straightforward", lambda: _public(recipe(bench, pipe, concept, steps=steps, batch=4,
                                                                      fast=False, name="plain")), need=40)
    bench.guarded(s, "recipe_fast_third", lambda: fast_recipe("c"))
    bench.guarded(s, "peft", lambda: time_peft(bench, pipe, concept, 4, 15, steps), need=60)


def _graph_ms(bench, fn, repeat: int = 20) -> float:
    """GPU time of fn() per call: fn captured `repeat` times in one CUDA graph and replayed."""
    fn()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph.capture_begin()
        for _ in range(repeat):
            fn()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    seconds, _ = bench.timed(lambda: [graph.replay() for _ in range(5)])
    return seconds / (5 * repeat) * 1e3


def section_diag(bench):
    """What the step is made of: kernel profile, SDPA backends, LAG's small ops, LAG variants."""
    s = "diag"
    bench.record(s, "cudnn_version", torch.backends.cudnn.version() if bench.cuda else None)
    if bench.cuda:
        bench.guarded(s, "lag_ops_us", lambda: lag_ops(bench))
        bench.guarded(s, "sdpa_backends_ms", lambda: sdpa_backends(bench))
    pipe, concept = build(bench, "sd15")
    bench.guarded(s, "profile_fast_step", lambda: profile_step(bench, pipe, concept))
    import prkit.lag as lagmod

    res, params = _residuals(pipe, "diag", randomize=1e-2)
    for p in params:
        p.requires_grad_(False)
    hi, lo = (4, 2) if bench.tiny else (50, 10)
    try:
        for kernel in ("sort", "median"):
            lagmod.MEDIAN_KERNEL = kernel
            bench.guarded(s, f"graph_b1_lag_{kernel}", lambda: time_sampling(bench, pipe, res, batch=1, lag=True,
                                                                            fast=True, hi=hi, lo=lo))
        lagmod.MEDIAN_KERNEL = "median"
        bench.guarded(s, "graph_b1_plain", lambda: time_sampling(bench, pipe, res, batch=1, lag=False, fast=True,
                                                                 hi=hi, lo=lo))
    finally:
        _drop(pipe, "diag")


def lag_ops(bench) -> dict:
    """GPU microseconds of each op LAG adds per block (SD1.5 shapes, CFG batch 1), from graph replays."""
    dev, out = bench.device, {}
    for n, heads, dim, ch in ((4096, 8, 40, 320), (1024, 8, 80, 640), (256, 8, 160, 1280), (64, 8, 160, 1280)):
        q = torch.randn(1, heads, n, dim, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, heads, 77, dim, device=dev, dtype=torch.bfloat16)
        v = torch.zeros(1, heads, 77, dim, device=dev, dtype=torch.bfloat16)
        v[..., :1] = 1
        sums = torch.rand(1, n, 1, device=dev)
        out_t = torch.randn(2, ch, int(n ** 0.5), int(n ** 0.5), device=dev, dtype=torch.bfloat16)
        delta = torch.randn_like(out_t)
        mask = sums > 0.5
        middle = torch.randn(2, ch // 20, int(n ** 0.5), int(n ** 0.5), device=dev, dtype=torch.bfloat16)
        ops = {
            "sdpa_map": lambda: F.scaled_dot_product_attention(q, k, v, scale=dim ** -0.5),
            "head_sum": lambda: q[..., :1].sum(1, dtype=torch.float32),
            "median": lambda: sums.median(dim=1, keepdim=True),
            "sort": lambda: sums.sort(dim=1),
            "kthvalue": lambda: sums.kthvalue(n // 2, dim=1, keepdim=True),
            "gt": lambda: sums > 0.5,
            "cat": lambda: torch.cat([mask, mask]),
            "add": lambda: out_t + delta,
            "mask_middle": lambda: prkit.residual_layer._mask_rows(middle, mask[..., 0], True),
        }
        row = {}
        for name, fn in ops.items():
            try:
                row[name] = round(_graph_ms(bench, fn) * 1e3, 2)
            except Exception as err:  # noqa: BLE001 - one op that cannot be captured must not hide the rest
                row[name] = f"{type(err).__name__}: {str(err)[:60]}"
                torch.cuda.synchronize()
        out[f"N{n}"] = row
    return out


def sdpa_backends(bench) -> dict:
    """fwd+bwd ms of attn1 at SD1.5's shapes (batch 4) with each SDPA backend forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for n, dim in ((4096, 40), (1024, 80), (256, 160)):
        q, k, v = (torch.randn(4, 8, n, dim, device=bench.device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(4, 8, n, dim, device=bench.device, dtype=torch.bfloat16)
        row = {}
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    def run():
                        o = F.scaled_dot_product_attention(q, k, v)
                        o.backward(grad)
                    run()
                    t, _ = bench.timed(lambda: [run() for _ in range(10)])
                row[name.split("_")[0].lower()] = round(t / 10 * 1e3, 3)
            except Exception as err:  # noqa: BLE001
                row[name.split("_")[0].lower()] = f"{type(err).__name__}: {str(err)[:80]}"
        out[f"N{n}_d{dim}"] = row
    return out


def profile_step(bench, pipe, concept) -> dict:
    """CUDA kernel time of the fast step (run eagerly under the profiler: same kernels as the graph)."""
    from torch.profiler import ProfilerActivity, profile

    cache, cond, scheduler, gen = _prepare(pipe, concept, 4)
    res, params = _residuals(pipe, "prof")
    opt = fastmod.make_optimizer(params, 1e-3, 1e-2, bench.device)
    unet = pipe.unet
    unet.train()
    try:
        with fastmod.fast_modules(unet, fastmod.FastConfig()):
            slot = fastmod._Slot((4, *cache.mean.shape[1:]), cond, 1.0, unet.dtype, bench.device, False)
            step = fastmod.TrainStep(unet, params, opt, [slot], amp=bench.dtype if bench.cuda else None,
                                     cuda_graph=False)
            step.load([cache.batch(4, gen, scheduler, bench.device)])
            for _ in range(2):
                step()
            bench.sync()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
            with profile(activities=acts, record_shapes=True) as prof:
                for _ in range(3):
                    step()
                bench.sync()
        from torch.autograd import DeviceType

        rows = []
        for e in prof.key_averages():
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue  # kernels only: the ops above them would count the same time twice
            t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            rows.append((t / 3 / 1e3, e.count // 3, e.key[:90]))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        (bench.out / "profile_fast_step.txt").write_text(prof.key_averages().table(
            sort_by="device_time_total" if bench.cuda else "cpu_time_total", row_limit=60))
        copies = []  # layout copies and casts by input shape: what is left to remove
        for e in prof.key_averages(group_by_input_shape=True):
            if e.key in ("aten::copy_", "aten::_to_copy", "aten::clone"):
                t = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
                copies.append((round(t / 3 / 1e3, 3), e.count // 3, e.key, str(e.input_shapes)[:120]))
        copies.sort(reverse=True)
        by_shape = []  # every aten op with kernel time of its own, by input shapes: what the elementwise time is
        for e in prof.key_averages(group_by_input_shape=True):
            t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            if e.key.startswith("aten::") and t > 0:
                by_shape.append((round(t / 3 / 1e3, 3), e.count // 3, e.key, str(e.input_shapes)[:160]))
        by_shape.sort(reverse=True)
        groups = {}
        for ms, _, name in rows:
            low = name.lower()
            kind = ("attention" if any(w in low for w in ("flash", "fmha", "attention", "cutlass_sm90_fmha")) else
                    "conv" if any(w in low for w in ("conv", "cudnn", "implicit", "xmma", "sm90_xmma", "nchw", "nhwc"))
                    else "gemm" if any(w in low for w in ("gemm", "sm90_", "cutlass", "cublas")) else
                    "norm" if "norm" in low else "elementwise/other")
            groups[kind] = groups.get(kind, 0) + ms
        return {"kernel_ms_per_step": round(total, 2), "by_kind_ms": {k: round(v, 2) for k, v in groups.items()},
                "top": [(round(ms, 3), count, name) for ms, count, name in rows[:70]], "copies": copies[:30],
                "ops_by_shape": by_shape[:80]}
    finally:
        unet.eval()
        for p in params:
            p.requires_grad_(False)
        _drop(pipe, "prof")


def _public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


# ---------------------------------------------------------------- table

def table(bench) -> str:
    r = bench.results["sections"]
    env = bench.results["env"]
    peak = r.get("env", {}).get("matmul_peak", {}).get("tflops")

    def get(sec, key, field):
        v = sec.get(key, {})
        return v.get(field) if isinstance(v, dict) else None

    def fmt(v, spec=".1f"):
        return "-" if v is None or isinstance(v, str) else format(v, spec)

    def pct(base, new):
        return fmt(base and new and 100 * (new - base) / base, "+.1f")

    t = r.get("sd15_train", {})
    flops = t.get("flops", {}).get("step_TFLOP")
    lines = [f"prkit benchmark | {env.get('card')} | torch {env['torch']} | diffusers {env['diffusers']} | "
             f"peft {env.get('peft')} | {env['date_utc']}",
             f"bf16 matmul peak (8192^3, measured): {fmt(peak, '.0f')} TFLOP/s",
             f"SD1.5 512x512 batch 4 training: {fmt(flops, '.2f')} TFLOP/step (flop_counter, attention included); "
             f"floor {fmt(flops and peak and flops / peak * 1e3, '.1f')} ms/step = "
             f"{fmt(flops and peak and flops / peak * 150, '.2f')} s per 150 steps",
             f"  {'path':32s} {'ms/step':>8s} {'TFLOP/s':>8s} {'%peak':>6s} {'peak GB':>8s} {'x straight':>10s} "
             f"{'x peft':>7s}"]
    straight = get(t, "step_straightforward", "ms_per_step")
    peft_ms = get(t, "peft_lora_r4_script", "ms_per_step")
    rows = [("straightforward (train.py eager)", "step_straightforward"), ("peft LoRA r4 (diffusers script)",
                                                                          "peft_lora_r4_script")]
    rows += [(k.replace("step_", ""), k) for k in t if k.startswith("step_fast")]
    rows += [(k, k) for k in t if k.startswith("mode_")]
    for label, key in rows:
        ms = get(t, key, "ms_per_step")
        # the FLOP count is the residual step's: peft's step does other work (a VAE encode of the batch each step)
        tf = flops / ms * 1e3 if (flops and ms and key != "peft_lora_r4_script") else None
        lines.append(f"  {label:32s} {fmt(ms):>8s} {fmt(tf, '.0f'):>8s} {fmt(tf and peak and 100 * tf / peak):>6s} "
                     f"{fmt(get(t, key, 'peak_alloc_GB'), '.2f'):>8s} {fmt(ms and straight and straight / ms, '.2f'):>10s} "
                     f"{fmt(ms and peft_ms and peft_ms / ms, '.2f'):>7s}")
    cached = get(t, "peft_lora_r4_script", "ms_per_step_cached_latents_text")
    if cached:
        lines.append(f"  (peft with latents and text cached instead of encoded every step: {cached:.1f} ms/step)")
    lines.append("150-step recipe end to end (caching, capture, every step; model loading excluded):")
    cold = r.get("cold", {})
    recipes = [(f"fast, fresh process {k}", cold, k) for k in cold]
    recipes += [("fast, first in sd15 process", t, "recipe_fast_cold"), ("fast, warm process", t, "recipe_fast_warm"),
                ("straightforward, warm process", t, "recipe_straightforward"),
                ("fp16+scaler+grad ckpt (fast)", t, "recipe_fp16_scaler_grad_ckpt")]
    for label, sec, key in recipes:
        if key in sec:
            log = (get(sec, key, "fast_log") or [""])[-1]
            graph = get(sec, key, "graph")
            state = "" if graph is None else "graph replayed; " if graph else "NO GRAPH (eager fallback); "
            lines.append(f"  {label:34s} {fmt(get(sec, key, 'seconds'), '.2f'):>6s} s  peak "
                         f"{fmt(get(sec, key, 'peak_alloc_GB'), '.2f')} GB (reserved "
                         f"{fmt(get(sec, key, 'peak_reserved_GB'), '.2f')})  {state}"
                         f"{log[log.find(';') + 2:] if ';' in log else ''}")
    e_peft = get(t, "peft_lora_r4_script", "e2e_seconds")
    e_plain = get(t, "recipe_straightforward", "seconds")
    lines.append(f"  {'peft LoRA r4 (diffusers script)':34s} {fmt(e_peft, '.2f'):>6s} s")
    # ratios within the sd15 process only (the cold section's recipes ran in other processes, maybe on other cards):
    # its first fast recipe (one-time costs included) and its warm one
    mine = [(label, get(t, key, "seconds")) for label, sec, key in recipes if sec is t and "fast_" in key]
    mine = [(label, b) for label, b in mine if b]
    if mine and e_plain:
        lines.append("  ratios in the sd15 process: " + "; ".join(
            f"{label.replace('fast, ', '')}: straightforward {e_plain / b:.2f}x"
            + (f", peft {e_peft / b:.2f}x" if e_peft else "") for label, b in mine))
    num = t.get("numerics_same_batch", {})
    traj = t.get("trajectory_api", {})
    lines.append(f"numerics (same batch, seed): loss rel diff fast vs straightforward "
                 f"{fmt(num.get('rel_loss_fast_vs_straight'), '.1e')}, graph vs eager "
                 f"{fmt(num.get('rel_loss_graph_vs_eager'), '.1e')}, grad rel err max {fmt(num.get('grad_rel_err_max'), '.1e')}"
                 f" -> pass {num.get('pass_bf16_tolerance')}; API 10 steps: loss max rel diff "
                 f"{fmt(traj.get('loss_rel_diff_max'), '.1e')}")
    for name, label in (("sd15_sample", "SD1.5 512"), ("sdxl_sample", "SDXL 1024")):
        smp = r.get(name, {})
        if not smp:
            continue
        lines.append(f"{label} sampling, ms per denoising step (CFG; graph = default up to UNet batch 8):")
        for mode in ("graph", "eager"):
            for batch in (1, 2, 4, 16):
                p, l = get(smp, f"{mode}_b{batch}_plain", "ms_per_step"), get(smp, f"{mode}_b{batch}_lag", "ms_per_step")
                if p is None and l is None:
                    continue
                lines.append(f"  {mode:5s} batch {batch:2d}: plain {fmt(p, '.2f')}  LAG {fmt(l, '.2f')}  "
                             f"LAG overhead {pct(p, l)}%")
        for key in smp:
            if key.startswith("unet_lag"):
                v = smp[key]
                if isinstance(v, dict) and "overhead_pct" in v:
                    lines.append(f"  UNet forward only, {key[9:]}: plain {v['unet_ms_plain']:.2f} ms, LAG "
                                 f"{v['unet_ms_lag']:.2f} ms, overhead {v['overhead_pct']:+.1f}%")
            if key.startswith("images_per_s"):
                lines.append(f"  {key}: {fmt(get(smp, key, 'images_per_s'), '.2f')} images/s, 50 steps "
                             f"(peak {fmt(get(smp, key, 'peak_alloc_GB'), '.1f')} GB)")
    xl = r.get("sdxl", {})
    if xl:
        xf = xl.get("flops", {}).get("step_TFLOP")
        lines.append(f"SDXL 1024x1024 batch 2 training: {fmt(xf, '.1f')} TFLOP/step")
        xs = get(xl, "step_straightforward", "ms_per_step")
        for key in ("step_straightforward", "step_fast_default"):
            ms = get(xl, key, "ms_per_step")
            lines.append(f"  {key:24s} {fmt(ms):>7s} ms/step {fmt(xf and ms and xf / ms * 1e3, '.0f'):>5s} TFLOP/s "
                         f"peak {fmt(get(xl, key, 'peak_alloc_GB'), '.2f')} GB  x straight "
                         f"{fmt(ms and xs and xs / ms, '.2f')}")
        for key in ("recipe_fast_cold", "recipe_fast_warm", "recipe_straightforward"):
            lines.append(f"  {key:24s} {fmt(get(xl, key, 'seconds'), '.2f'):>7s} s / {bench.args.steps} steps, peak "
                         f"{fmt(get(xl, key, 'peak_alloc_GB'), '.2f')} GB")
        xn = xl.get("numerics_same_batch", {})
        lines.append(f"  numerics: loss rel diff {fmt(xn.get('rel_loss_fast_vs_straight'), '.1e')}, grad rel err max "
                     f"{fmt(xn.get('grad_rel_err_max'), '.1e')} -> pass {xn.get('pass_bf16_tolerance')}")
    d = r.get("diag", {})
    if d:
        prof = d.get("profile_fast_step", {})
        lines.append(f"diag: kernels {prof.get('kernel_ms_per_step')} ms/step by kind {prof.get('by_kind_ms')}")
        for key in ("graph_b1_plain", "graph_b1_lag_sort", "graph_b1_lag_median"):
            lines.append(f"  {key}: {fmt(get(d, key, 'ms_per_step'), '.2f')} ms/step")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sd15", "sdxl", "diag", "lag", "cold", "steps", "ratios", "table",
                                                             "all"])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke test of this script)")
    parser.add_argument("--out", default="out/bench", help="folder for bench_<what>.json and table.txt")
    parser.add_argument("--steps", type=int, default=150, help="steps of the recipe")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds; later parts are skipped past it")
    parser.add_argument("--tag", default="", help="suffix of this run's json (cold: several fresh processes)")
    parser.add_argument("--sdpa", default="", help="cold: SDPA backends in priority order (flash,efficient,math) "
                        "or 'torch' for torch's own choice; empty: FastConfig's default")
    parser.add_argument("--channels-last", choices=["default", "on", "off"], default="default",
                        help="cold: the fast loop's memory format (on: NHWC with prkit's GroupNorm kernels)")
    parser.add_argument("--cudnn-from", type=int, default=None,
                        help="cold: FastConfig.cudnn_attention_from (0: never; unset: the default)")
    parser.add_argument("--warm-up", choices=["default", "on", "off"], default="default",
                        help="cold: FastConfig.warm_up (the one-time kernel costs paid before the first step: the "
                             "graph capture once the latents are encoded, or with --capture-first off a throwaway "
                             "step beside their encoding)")
    parser.add_argument("--capture-first", choices=["default", "on", "off"], default="default",
                        help="cold: FastConfig.capture_first (capture the step before any eager step)")
    parser.add_argument("--plan-ahead", choices=["default", "on", "off"], default="default",
                        help="cold: FastConfig.plan_ahead (cuDNN's plans built while the latents encode)")
    parser.add_argument("--warm", action="store_true", help="cold: also run the recipe a second time (warm)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps = min(args.steps, 6)
    bench = Bench(args)
    if args.what == "table":
        merge(bench)
        print(table(bench), flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # `timeout` still gets the json
    print(json.dumps(bench.results["env"]), flush=True)
    bench.json_name = f"bench_{args.what}{args.tag}.json"
    try:
        if args.what in ("sd15", "all"):
            pipe, concept = build(bench, "sd15")
            bench.record("env", "resident_after_build_sd15", bench.mem())
            section_train(bench, pipe, concept)
            section_peft(bench, pipe, concept)
            section_sample(bench, pipe, concept)
            del pipe
            gc.collect()
            if bench.cuda:
                torch.cuda.empty_cache()
        if args.what in ("sdxl", "all"):
            section_sdxl(bench)
        if args.what in ("diag", "all"):
            section_diag(bench)
        if args.what == "lag":
            section_lag(bench)
        if args.what == "cold":
            section_cold(bench)
        if args.what == "steps":
            section_steps(bench)
        if args.what == "ratios":
            section_ratios(bench)
    finally:
        bench.results["elapsed_s"] = bench.elapsed()
        bench.save()
        if args.what == "all":
            print("\n" + table(bench), flush=True)


def merge(bench) -> None:
    """Fold every bench_*.json of the output folder into one result tree (first file's env)."""
    merged: dict = {"env": None, "sections": {}}
    for path in sorted(bench.out.glob("bench_*.json")):
        data = json.loads(path.read_text())
        merged["env"] = merged["env"] or data["env"]
        for section, values in data["sections"].items():
            merged["sections"].setdefault(section, {}).update(values)
    merged["env"] = merged["env"] or bench.results["env"]
    bench.results = merged
    (bench.out / "bench.json").write_text(json.dumps(merged, indent=1, default=str))
    (bench.out / "table.txt").write_text(table(bench) + "\n")


if __name__ == "__main__":
    main()
