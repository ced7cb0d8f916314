"""Fast personalization on CUDA: one CUDA graph per training step and no host sync between loss checks.

Owns the loop ``train_residuals`` runs on CUDA: the frozen UNet in its own half precision (no autocast
when its weights already are bf16/fp16), fused AdamW, forward + backward + optimizer step captured once as
a CUDA graph and replayed, losses checked every ``check_every`` steps with a rollback to the last good
state, and convolutions that keep no input for backward. It draws the same batches from the same
generator as the eager loop and writes the same checkpoints; it must not change results beyond rounding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import types
import warnings
from dataclasses import dataclass, replace as _replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)
_CPU = torch.device("cpu")


@dataclass
class FastConfig:
    """Switches of the fast loop; the defaults are what measured fastest on an H100 (BENCHMARKS.md)."""

    cuda_graph: bool = True  # capture forward + backward + AdamW of a step once, replay it (eager if capture fails)
    check_every: int = 25  # steps between loss checks (one host sync each); progress updates at the same rate
    frozen_conv: bool = True  # frozen convolutions keep only their weight for backward (less memory, same math)
    channels_last: bool = False  # NHWC activations; torch <= 2.11 GroupNorm converts them back, so off
    merged_lowrank: bool = False  # apply W + up @ down as one weight (fewer kernels, delta rounded to bf16 of W)
    cudnn_benchmark: bool = False  # autotune convolutions at the first step (costs time up front)
    encode_batch: int = 1  # images per VAE call when caching latents: the VAE's peak memory stays small
    # attention kernels in priority order (None: torch's). Flash first: cuDNN's is ~10% faster per step on an H100
    # but compiles its kernels at run time, which costs ~7 s at a machine's first run and ~1 s in each new process
    sdpa_backends: tuple[str, ...] | None = ("flash", "efficient", "cudnn", "math")
    lean_blocks: bool = False  # resnets and attention without diffusers' no-op `/ 1.0` rescales (same numbers)


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose weight and bias need no gradient: backward needs only the weight, so the input is not kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        ctx.args = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, stride, padding, dilation, groups)
        return grad_input, None, None, None, None, None, None


def _frozen_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if (frozen and x.requires_grad and torch.is_grad_enabled() and self.padding_mode == "zeros"
            and not isinstance(self.padding, str) and not torch.is_autocast_enabled(x.device.type)):
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return type(self).forward(self, x)


def patch_frozen_convs(model: nn.Module):
    """Make every frozen ``Conv2d`` of ``model`` keep no input for backward; returns the undo function."""
    patched = []
    for module in model.modules():
        if type(module) is nn.Conv2d and "forward" not in module.__dict__:
            module.forward = types.MethodType(_frozen_conv_forward, module)
            patched.append(module)

    def undo():
        for module in patched:
            module.__dict__.pop("forward", None)
    return undo


def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
    """ResidualProjection.forward with the active sets folded into one weight (training: no masks)."""
    if self.mask_source is not None:
        return type(self).forward(self, x)
    delta = None
    for name, lowrank in self.sets.items():
        if not self.active[name] or name in self.merged or self.scales[name] == 0:
            continue
        part = lowrank.up @ lowrank.down  # (C, C) fp32
        part = part * self.scales[name] if self.scales[name] != 1 else part
        delta = part if delta is None else delta + part
    base = self.base_layer
    if delta is None:
        return base(x)
    weight = (base.weight.float() + delta.view(base.weight.shape)).to(base.weight.dtype)
    if self.is_conv:
        return base._conv_forward(x, weight, base.bias)
    return F.linear(x, weight, base.bias)


def patch_merged_lowrank(unet: nn.Module):
    """Apply each residual wrapper as one merged weight during training; returns the undo function."""
    from .residuals import wrapped_layers

    layers = [layer for layer in wrapped_layers(unet).values() if "forward" not in layer.__dict__]
    for layer in layers:
        layer.forward = types.MethodType(_merged_forward, layer)

    def undo():
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return undo


def _lean_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for the plain case, without the `/ output_scale_factor` of 1.0."""
    hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:
        hidden = hidden + temb
    hidden = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden))))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return input_tensor + hidden


class _LeanAttnProcessor:
    """AttnProcessor2_0 for plain self/cross attention, without its no-op `/ 1.0` rescale."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def patch_lean_blocks(unet: nn.Module):
    """Skip diffusers' no-op rescales in plain resnets and attention layers; returns the undo function."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    resnets = [m for m in unet.modules() if type(m) is ResnetBlock2D and "forward" not in m.__dict__
               and m.upsample is None and m.downsample is None and m.output_scale_factor == 1
               and m.time_embedding_norm == "default"]
    for module in resnets:
        module.forward = types.MethodType(_lean_resnet_forward, module)
    original = unet.attn_processors
    lean = _LeanAttnProcessor()
    plain = {}
    for key, proc in original.items():
        attn = unet.get_submodule(key.rsplit(".", 1)[0])
        simple = (type(proc) is AttnProcessor2_0 and attn.spatial_norm is None and attn.group_norm is None
                  and attn.norm_q is None and attn.norm_k is None and not attn.norm_cross
                  and not attn.residual_connection and attn.rescale_output_factor == 1 and attn.scale_qk)
        plain[key] = lean if simple else proc
    unet.set_attn_processor(plain)

    def undo():
        unet.set_attn_processor(original)
        for module in resnets:
            module.__dict__.pop("forward", None)
    return undo


def _checkpoint(module, *args):
    # the UNet draws no random numbers in training (dropout 0), so no RNG state is saved: graph-capturable
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


@contextlib.contextmanager
def fast_modules(unet: nn.Module, fast: FastConfig, gradient_checkpointing: bool = False):
    """Within the block the UNet runs the fast configuration; everything is put back on exit."""
    undo = []
    try:
        if fast.channels_last and unet.device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
            undo.append(lambda: unet.to(memory_format=torch.contiguous_format))
        if fast.frozen_conv:
            undo.append(patch_frozen_convs(unet))
        if fast.merged_lowrank:
            undo.append(patch_merged_lowrank(unet))
        if fast.lean_blocks:
            undo.append(patch_lean_blocks(unet))
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing(_checkpoint)
            undo.append(unet.disable_gradient_checkpointing)
        if fast.sdpa_backends and unet.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                     "math": "MATH"}
            backends = [getattr(SDPBackend, names[n]) for n in fast.sdpa_backends]
            try:
                context = sdpa_kernel(backends, set_priority=True)
            except TypeError:  # torch < 2.6 has no priority order: keep torch's own choice
                context = contextlib.nullcontext()
            context.__enter__()
            undo.append(lambda: context.__exit__(None, None, None))
        if fast.cudnn_benchmark:
            previous = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            undo.append(partial(setattr, torch.backends.cudnn, "benchmark", previous))
        yield
    finally:
        for fn in reversed(undo):
            fn()


def make_optimizer(params, learning_rate: float, weight_decay: float, device: torch.device):
    """AdamW as the eager loop uses it; on CUDA fused and graph-capturable (step counters on the device)."""
    extra = {"fused": True, "capturable": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, **extra)


def _make_capturable(optimizer, device: torch.device) -> None:
    """After loading an eager checkpoint: keep the groups fused/capturable and the step counters on the device."""
    if device.type != "cuda":
        return
    for group in optimizer.param_groups:
        group.update(fused=True, capturable=True, foreach=None)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)


class _Slot:
    """Static device buffers of one loss term: noisy latents, timesteps, target; its conditioning and weight."""

    def __init__(self, shape, cond: dict, weight: float, dtype, device, channels_last: bool):
        fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        self.noisy = torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        self.timesteps = torch.empty(shape[0], dtype=torch.long, device=device)
        self.target = torch.empty(shape, dtype=torch.float32, device=device)
        self.cond = cond
        self.weight = weight


class TrainStep:
    """One training step on static buffers: forward, loss, backward, (unscale,) clip, AdamW, (scale update).

    The first call runs eagerly (a real step that also warms up cuDNN/cuBLAS); on CUDA the step is then
    captured as a CUDA graph and every later call replays it. If capture fails, steps stay eager.
    ``loss`` is a device scalar holding the last step's (unscaled) loss; nothing here syncs with the host.
    """

    def __init__(self, unet, params, optimizer, slots: list[_Slot], *, amp: torch.dtype | None,
                 scaler=None, max_grad_norm: float | None = None, cuda_graph: bool = True):
        self.unet, self.params, self.optimizer, self.slots = unet, list(params), optimizer, slots
        self.device = slots[0].noisy.device
        # autocast only where the weights are not already in the compute dtype
        self.autocast = amp if amp is not None and unet.dtype != amp else None
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        self.want_graph = cuda_graph and self.device.type == "cuda"
        self.graph = None
        self.capture_error: str | None = None
        self.loss = torch.zeros((), dtype=torch.float32, device=self.device)
        self.found_inf = None
        if scaler is not None:
            scaler._lazy_init_scale_growth_tracker(self.device)
            self.found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
            optimizer.found_inf = self.found_inf  # read by fused AdamW: skips the update on inf/nan grads
        self.calls = 0
        self.capture_seconds = 0.0

    def load(self, batches) -> None:
        """Copy one step's (noisy, timesteps, target) per slot into the static buffers (async)."""
        for slot, (noisy, steps, target) in zip(self.slots, batches):
            slot.noisy.copy_(noisy, non_blocking=True)
            slot.timesteps.copy_(steps, non_blocking=True)
            slot.target.copy_(target, non_blocking=True)

    def _body(self) -> None:
        total = None
        device_type = self.device.type
        for slot in self.slots:
            with torch.autocast(device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None,
                                cache_enabled=False):
                pred = self.unet(slot.noisy, slot.timesteps, **slot.cond).sample
            loss = F.mse_loss(pred.float(), slot.target)
            total = loss if total is None else total + slot.weight * loss
        if self.scaler is not None:
            scale = self.scaler._scale
            (total * scale).backward()
            grads = [p.grad for p in self.params if p.grad is not None]
            self.found_inf.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, scale.double().reciprocal().float())
        else:
            total.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.scaler is not None:
            s = self.scaler
            torch._amp_update_scale_(s._scale, s._growth_tracker, self.found_inf, s._growth_factor,
                                     s._backoff_factor, s._growth_interval)
        self.loss.copy_(total.detach())

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        self.optimizer.zero_grad(set_to_none=True)
        if not self.want_graph:
            self._body()
            return self.loss
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # the warm-up is a real step, run on a side stream as capture wants
            self._body()
        current.wait_stream(side)
        self._capture()
        return self.loss

    def _capture(self) -> None:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._body()
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager steps
            self.want_graph = False
            self.capture_error = f"{type(err).__name__}: {err}"
            self.optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"CUDA graph capture of the training step failed ({self.capture_error}); "
                          "continuing with eager steps", RuntimeWarning, stacklevel=3)
            return
        finally:
            self.capture_seconds = time.perf_counter() - start
        self.graph = graph

    def close(self) -> None:
        """Free the graph and its memory pool; detach the fp16 hooks from the optimizer."""
        self.graph = None
        if self.found_inf is not None and getattr(self.optimizer, "found_inf", None) is self.found_inf:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)


class _Snapshot:
    """Device copies of the trainable state (parameters, AdamW moments and steps, loss scale) for rollback."""

    def __init__(self, params, optimizer, scaler):
        self.params, self.optimizer, self.scaler = list(params), optimizer, scaler
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _tensors(self) -> list[torch.Tensor]:
        out = list(self.params)
        for p in self.params:
            out.extend(v for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v))
        if self.scaler is not None and self.scaler._scale is not None:
            out.extend([self.scaler._scale, self.scaler._growth_tracker])
        return out

    @torch.no_grad()
    def take(self) -> None:
        self.saved = [(t, t.detach().clone()) for t in self._tensors()]

    @torch.no_grad()
    def restore(self) -> None:
        kept = {id(t) for t, _ in self.saved}
        for tensor, copy in self.saved:
            tensor.copy_(copy)
        for tensor in self._tensors():  # state created after the snapshot (AdamW's, at the first step): fresh
            if id(tensor) not in kept:
                tensor.zero_()


def _draw(sources, size: int, gen: torch.Generator, scheduler) -> list[tuple[torch.Tensor, ...]]:
    """One step's batches on the CPU, in the eager loop's order (instance, then prior)."""
    return [cache.batch(size, gen, scheduler, _CPU) for cache, _, _ in sources]


def _stage(drawn: list[list[tuple]], device: torch.device) -> list[list[torch.Tensor]]:
    """Stack a window's batches per slot and send them to the device in one pinned copy each."""
    staged = []
    for slot in range(len(drawn[0])):
        parts = [torch.stack([step[slot][i] for step in drawn]) for i in range(3)]
        if device.type == "cuda":
            parts = [p.pin_memory().to(device, non_blocking=True) for p in parts]
        staged.append(parts)
    return staged


def _contiguous(cond: dict) -> dict:
    out = {}
    for key, value in cond.items():
        out[key] = _contiguous(value) if isinstance(value, dict) else value.contiguous()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _window_end(step: int, config, every: int, checkpointing: bool) -> int:
    """Where the window that starts at ``step`` ends: a check, checkpoint, validation or stop boundary."""
    ends = [config.steps, (step // every + 1) * every]
    if checkpointing and config.checkpoint_every:
        ends.append((step // config.checkpoint_every + 1) * config.checkpoint_every)
    if config.validate_every and config.validation_prompts:
        ends.append((step // config.validate_every + 1) * config.validate_every)
    if config.stop_after is not None:
        ends.append(max(config.stop_after, step + 1))
    return min(ends)


def _diverged_message(value: float, step: int, ckpt: Path | None, config) -> str:
    # the eager loop's wording, word for word (tests compare them)
    return (f"the loss became {value} at step {step}; the residuals were not updated with it"
            f"{f' and the last checkpoint is in {ckpt}' if ckpt and ckpt.exists() else ''}. "
            f"Lower learning_rate (now {config.learning_rate}) or use mixed_precision='no'.")


def train_fast(pipe, concept, config, *, name: str = "default", progress: bool = True,
               fast: FastConfig | None = None):
    """``train_residuals`` with the fast loop: same arguments, batches, checkpoints, errors and result.

    Args:
        pipe, concept, config, name, progress: as for ``prkit.train_residuals`` (``config`` is a TrainConfig).
        fast: switches of the fast loop (FastConfig defaults when None).
    Returns:
        a ``TrainResult``; ``losses`` hold every step's loss, read from the device every ``check_every`` steps.
    """
    from diffusers import DDPMScheduler

    from . import train as base
    from .residuals import Residuals

    fast = fast or FastConfig()
    if config.learning_rate is None:
        config = _replace(config, learning_rate=base.default_learning_rate(pipe, config.target,
                                                                                      config.batch_size))
    start = time.perf_counter()
    times: dict[str, float] = {}
    unet = pipe.unet
    device = unet.device
    for module in (unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None), pipe.vae):
        if module is not None:
            module.requires_grad_(False)
    target = base.TARGETS[config.target](pipe, concept, config, name)
    params = [p for p in target.parameters()]
    for p in params:
        p.data = p.data.float()  # fp32 master weights even on a half-precision base
        p.requires_grad_(True)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompt = config.prompt_template.format(token=concept.token, class_word=concept.class_word)
    cache = base._Cache(pipe, concept, prompt, config.flip, encode_batch=fast.encode_batch)
    sources = [(cache, _contiguous(base._expand(cache.cond, config.batch_size)), 1.0)]
    if config.prior_images is not None:
        prior = base._Cache(pipe, config.prior_images, f"a photo of a {concept.class_word}", config.flip,
                            encode_batch=fast.encode_batch)
        sources.append((prior, _contiguous(base._expand(prior.cond, config.batch_size)), config.prior_weight))

    _sync(device)
    times["setup+cache"] = time.perf_counter() - start
    optimizer = make_optimizer(params, config.learning_rate, config.weight_decay, device)
    amp = base._precision(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    step = 0
    ckpt = Path(config.checkpoint_dir) / "checkpoint.pt" if config.checkpoint_dir else None
    if ckpt is not None and config.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        target.load_state_dict(state["target"])
        base.load_optimizer(optimizer, state["optimizer"], config.learning_rate, ckpt)
        _make_capturable(optimizer, device)
        gen.set_state(state["generator"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        step, losses = state["step"], state["losses"]
        log.info("resumed from %s at step %d", ckpt, step)

    gen_states = {step: gen.get_state()}  # generator state once `k` steps' batches are drawn

    def generator_at(k: int) -> torch.Generator:
        g = torch.Generator()
        g.set_state(gen_states[k])
        return g

    def draw_window(a: int) -> tuple[int, int, list]:
        b = _window_end(a, config, max(1, fast.check_every), ckpt is not None)
        drawn = []
        for k in range(a, b):
            drawn.append(_draw(sources, config.batch_size, gen, scheduler))
            gen_states[k + 1] = gen.get_state()
        return a, b, drawn

    was_training = unet.training
    unet.train()
    validation: dict[int, list] = {}
    bar = tqdm(total=config.steps, initial=step, desc="personalizing", disable=not progress)
    completed = True
    stepper = None
    window = None  # (a, b, staged) in flight
    enqueued = step
    losses_dev = torch.full((max(config.steps, 1),), float("nan"), device=device)
    snapshot = _Snapshot(params, optimizer, scaler)

    def settle(a: int, b: int, staged) -> tuple[list[float], int | None]:
        """Read the window's losses; on a non-finite one roll back and redo the good steps before it."""
        values = losses_dev[a:b].tolist()
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            snapshot.restore()
            for k in range(bad):
                stepper.load([(s[0][k], s[1][k], s[2][k]) for s in staged])
                stepper()
            _sync(device)
        return values, bad

    try:
        with fast_modules(unet, fast, config.gradient_checkpointing):
            shape = tuple(cache.mean.shape[1:])
            slots = [_Slot((config.batch_size, *shape), cond, weight, unet.dtype, device, fast.channels_last)
                     for _, cond, weight in sources]
            stepper = TrainStep(unet, params, optimizer, slots, amp=amp, scaler=scaler,
                                max_grad_norm=config.max_grad_norm, cuda_graph=fast.cuda_graph)
            pending = draw_window(step) if step < config.steps else None
            while pending is not None:
                a, b, drawn = pending
                staged = _stage(drawn, device)
                window = (a, b, staged)
                snapshot.take()
                for k in range(b - a):
                    stepper.load([(s[0][k], s[1][k], s[2][k]) for s in staged])
                    if stepper.calls == 0:
                        first = time.perf_counter()
                        stepper()
                        _sync(device)
                        times["first step+capture"] = time.perf_counter() - first
                        loop_start = time.perf_counter()
                    else:
                        stepper()
                    losses_dev[a + k].copy_(stepper.loss)
                    enqueued = a + k + 1
                stops = config.stop_after is not None and b >= config.stop_after and b < config.steps
                pending = draw_window(b) if b < config.steps and not stops else None  # overlaps the GPU
                values, bad = settle(a, b, staged)
                if bad is not None:
                    window = None
                    raise base.TrainingDiverged(_diverged_message(values[bad], a + bad + 1, ckpt, config))
                losses.extend(values)
                step, window = b, None
                bar.update(b - a)
                bar.set_postfix(loss=f"{values[-1]:.4f}")
                if ckpt is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                    base._save_checkpoint(ckpt, target, optimizer, scaler, generator_at(step), step, losses)
                if config.validate_every and step % config.validate_every == 0 and config.validation_prompts:
                    validation[step] = base._validate(pipe, target, concept, config)
                    unet.train()
                if stops:
                    if ckpt is not None:
                        base._save_checkpoint(ckpt, target, optimizer, scaler, generator_at(step), step, losses)
                    completed = False
                    break
    except KeyboardInterrupt:
        if window is not None and stepper is not None:
            _sync(device)
            a, _, staged = window
            values, bad = settle(a, enqueued, staged)
            done = values if bad is None else values[:bad]
            losses.extend(done)
            step = a + len(done)
        if ckpt is not None:
            base._save_checkpoint(ckpt, target, optimizer, scaler, generator_at(step), step, losses)
            log.warning("interrupted at step %d; checkpoint saved to %s, call again to resume", step, ckpt)
        raise
    finally:
        bar.close()
        unet.train(was_training)
        if stepper is not None:
            if stepper.calls > 1:
                times[f"{stepper.calls - 1} more steps"] = time.perf_counter() - loop_start
            log.info("fast loop: %d calls, graph %s, capture %.3f s%s; %s", stepper.calls,
                     "on" if stepper.graph is not None else "off", stepper.capture_seconds,
                     f", capture failed: {stepper.capture_error}" if stepper.capture_error else "",
                     ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
            stepper.close()
        for p in params:
            p.requires_grad_(False)
    _sync(device)
    if isinstance(target, Residuals):
        target.meta.update(config=base._public(config), base_model=str(getattr(pipe, "name_or_path", "") or ""))
    return base.TrainResult(target, losses, time.perf_counter() - start, step, completed, validation, ckpt)
