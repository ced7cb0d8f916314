"""Fast personalization on CUDA: one CUDA graph per training step and no host sync between loss checks.

Owns the loop ``train_residuals`` runs on CUDA: the frozen UNet in its own half precision (no autocast
when its weights already are bf16/fp16), fused AdamW, forward + backward + optimizer step captured once as
a CUDA graph and replayed, losses checked every ``check_every`` steps with a rollback to the last good
state, and convolutions that keep no input for backward. It draws the same batches from the same
generator as the eager loop and writes the same checkpoints; it must not change results beyond rounding.
The model patches live in ``fast_patches``, the captured step in ``fast_step``; this module keeps the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace as _replace

import torch
from tqdm.auto import tqdm

from .checks import check_flag, check_whole
# re-exported: prkit.fast stays the one import for the fast path (tests and benchmarks/bench.py use these)
from .fast_patches import (  # noqa: F401
    SDPA_BACKENDS, fast_modules, patch_frozen_convs, patch_lean_blocks, patch_merged_lowrank, uses_channels_last)
from . import checkpoints, fast_warmup as warmup
from .interrupts import deferred_interrupt
from .fast_step import TrainStep, _Slot, _Snapshot, _make_capturable, make_optimizer, match_state_layouts
from .train_run import diverged_message, record_run, resume, validation_images

log = logging.getLogger(__name__)
_CPU = torch.device("cpu")


@dataclass
class FastConfig:
    """Switches of the fast loop; the defaults are what measured fastest on an H100 or H200 (BENCHMARKS.md)."""

    cuda_graph: bool = True  # capture forward + backward + AdamW of a step once, replay it (eager if capture fails)
    # capture before any eager step (the capture pays the one-time kernel costs, once the latents are encoded);
    # off, or where that capture fails: one eager step, then the capture. Not under cuDNN's benchmark mode (it times
    # kernels: cudnn_benchmark or torch.backends.cudnn.benchmark), nor again where it failed for the same key
    capture_first: bool = True
    check_every: int = 25  # steps between loss checks (one host sync each); progress updates at the same rate
    frozen_conv: bool = True  # frozen convolutions keep only their weight for backward (less memory, same math)
    # NHWC activations end to end, with prkit's NHWC GroupNorm + SiLU kernels (torch's convert NHWC back to NCHW);
    # needs Triton (else NCHW); 36 vs 44 ms per SD1.5 step on an H100 (BENCHMARKS.md)
    channels_last: bool = True
    fused_geglu: bool = True  # the feed-forwards' GEGLU as one Triton kernel each way (needs Triton)
    merged_lowrank: bool = False  # apply W + up @ down as one weight (fewer kernels, delta rounded to bf16 of W)
    cudnn_benchmark: bool = False  # autotune convolutions at the first step (costs time up front)
    encode_batch: int = 1  # images per VAE call when caching latents: the VAE's peak memory stays small
    # attention kernels in priority order (None: torch's). Flash first: cuDNN's is faster on an H100 but compiles
    # each shape at run time (~10 s at a machine's first run, ~1.2 s in each new process for all SD1.5 shapes)
    sdpa_backends: tuple[str, ...] | None = ("flash", "efficient", "cudnn", "math")
    # query length from which self-attention prefers cuDNN's kernel anyway (SD1.5's 64x64 blocks: 4096); None: never
    cudnn_attention_from: int | None = 4096
    lean_blocks: bool = False  # resnets and attention without diffusers' no-op `/ 1.0` rescales (same numbers)
    # before the first step, pay the process's one-time kernel costs: by the step's graph capture once the latents
    # are encoded (capture_first; they encode in a background thread beside the prompt), else by a throwaway forward
    # + backward beside that encoding (same numbers); None: on CUDA. Off: no background encoding (the first step is
    # still captured first). Once per thread, UNet and shapes.
    warm_up: bool | None = None
    # with a capture first: while the latents encode, run the step's frozen convolutions and attention layers once on
    # zeros (forward and backward to their inputs) in the thread that trains, so that cuDNN's per-thread plans are
    # built before the capture (fast_plans; same numbers)
    plan_ahead: bool = True

    def __post_init__(self):
        for name in ("cuda_graph", "capture_first", "frozen_conv", "channels_last", "fused_geglu", "merged_lowrank",
                     "cudnn_benchmark", "lean_blocks", "plan_ahead"):
            check_flag(getattr(self, name), f"FastConfig.{name}")
        check_flag(self.warm_up, "FastConfig.warm_up", " or None")
        check_whole(self, ("check_every", "encode_batch"), 1)
        check_whole(self, ("cudnn_attention_from",), 1, " or None")
        if self.sdpa_backends is not None:
            if isinstance(self.sdpa_backends, str):
                self.sdpa_backends = tuple(self.sdpa_backends.split(","))
            unknown = [n for n in self.sdpa_backends if n not in SDPA_BACKENDS]
            if unknown or not self.sdpa_backends:
                raise ValueError(f"FastConfig.sdpa_backends: {unknown or 'nothing'} is not a backend; name some of "
                                 f"{', '.join(SDPA_BACKENDS)} in priority order, or None for torch's choice")


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


def train_fast(pipe, concept, config, *, name: str = "default", progress: bool = True,
               fast: FastConfig | None = None, register=None):
    """``train_residuals`` with the fast loop: same arguments, batches, checkpoints, errors and result.

    Args:
        pipe, concept, config, name, progress: as for ``prkit.train_residuals`` (``config`` is a TrainConfig).
        fast: switches of the fast loop (FastConfig defaults when None).
        register: called with the training target once it is on the model (``train_residuals`` takes it off
            again if the run fails).
    Returns:
        a ``TrainResult``; ``losses`` hold every step's loss, read from the device every ``check_every`` steps.
    """
    device = pipe.unet.device
    # the graph capture, its streams and the Triton launches work on the current device: make it the UNet's (a
    # UNet on cuda:1 with cuda:0 current captured an empty graph, whose replays trained nothing)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(), warmup.Encoder() as enc:
        return _train_fast(pipe, concept, config, name=name, progress=progress, fast=fast, register=register,
                           encoder=enc)


def _train_fast(pipe, concept, config, *, name: str, progress: bool, fast: FastConfig | None, register, encoder):
    from . import train as base

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
    if register is not None:
        register(target)
    params = [p for p in target.parameters()]
    for p in params:
        p.data = p.data.float()  # fp32 master weights even on a half-precision base
        p.requires_grad_(True)
    scheduler = base.training_scheduler(pipe)
    prompt = base.training_prompt(config, concept)
    amp = base._precision(config, device, unet.dtype)
    warm_key = warmup.key(pipe, concept, config, params, fast, amp)
    warm = warmup.needed(warm_key, fast, device)
    triton_ready = warmup.prepare_triton(fast, device) if warm else None
    latents_in = encoder.executor() if warm else None  # the latents encode beside the prompt (and an eager warm-up)
    cache = base._Cache(pipe, concept, prompt, config.flip, encode_batch=fast.encode_batch, latents_in=latents_in)

    def conditioning(cond: dict) -> dict:  # without autocast in the UNet's dtype (DreamBooth's fp32 master weights)
        cond = base._in_dtype(cond, pipe.unet.dtype) if amp is None else cond
        return _contiguous(base._expand(cond, config.batch_size))

    sources = [(cache, conditioning(cache.cond), 1.0)]
    if config.prior_images is not None:
        prior = base._Cache(pipe, config.prior_images, f"a photo of a {concept.class_word}", config.flip,
                            encode_batch=fast.encode_batch, latents_in=latents_in)
        sources.append((prior, conditioning(prior.cond), config.prior_weight))

    _sync(device)
    times["setup+cache" if not warm else "setup+text"] = time.perf_counter() - start
    optimizer = make_optimizer(params, config.learning_rate, config.weight_decay, device)
    # GradScaler("cuda") turns itself off elsewhere (fp16 autocast on a CPU): no scaler then, as in effect eagerly
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = checkpoints.checkpoint_file(config)
    stamp = checkpoints.fingerprint(pipe, concept, config, amp) if ckpt is not None else None
    # held: the step whose state ckpt holds, once this call restored or wrote it; finished: nothing left (or stopped
    # already), so the run's own seconds, not this call's set-up added
    step, losses, before, finished, stopped, held = resume(ckpt, stamp, target, optimizer, scaler, gen, config)
    start -= before  # the run's seconds count its earlier calls too (times[] keeps this call's own)
    if held is not None:
        _make_capturable(optimizer, device)

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
    completed = not stopped
    stepper = None
    window = None  # (a, b, staged) in flight
    enqueued = step
    # each step's loss and (without a grad scaler) its gradients' norm, read once per window
    record = torch.full((2, max(config.steps, 1)), float("nan"), device=device)
    record[1].zero_()
    snapshot = _Snapshot(params, optimizer, scaler)

    def settle(a: int, b: int, staged) -> tuple[list[float], int | None]:
        """Read the window's losses; on a non-finite one (or a non-finite gradient: ``record``) roll back and redo
        the good steps before it."""
        values, norms = record[:, a:b].tolist()
        bad = next((i for i, (v, n) in enumerate(zip(values, norms)) if not (math.isfinite(v) and math.isfinite(n))),
                   None)
        if bad is not None:
            snapshot.restore()
            for k in range(bad):
                stepper.load([(s[0][k], s[1][k], s[2][k]) for s in staged])
                stepper()
            _sync(device)
        return values, norms, bad

    try:
        # checkpointing the owner switched on (unet.enable_gradient_checkpointing()) too: diffusers' function saves
        # RNG states, which a graph capture cannot; fast_modules' is RNG-free and puts the owner's back afterwards
        checkpointing = config.gradient_checkpointing or getattr(unet, "is_gradient_checkpointing", False)
        with fast_modules(unet, fast, checkpointing):
            # a resumed state's moments as the parameters now are (channels-last: fused AdamW wants them alike)
            match_state_layouts(optimizer.state, params)

            def make_stepper(shapes):  # one latent shape per source: class images may have their own size
                slots = [_Slot((config.batch_size, *shape), cond, weight, unet.dtype, device,
                               uses_channels_last(fast, device))
                         for shape, (_, cond, weight) in zip(shapes, sources)]
                return TrainStep(unet, params, optimizer, slots, amp=amp, scaler=scaler,
                                 max_grad_norm=config.max_grad_norm, cuda_graph=fast.cuda_graph,
                                 capture_first=warmup.capture_first(fast, warm_key))

            def encoded_shapes():
                return [tuple(source.mean.shape[1:]) for source, _, _ in sources]

            if finished:  # resumed at its last step or its stop_after: a step made and warmed up (on a GPU a
                pass  # throwaway step or the graph's capture: seconds, and its memory) would serve no step
            elif warm:
                began = time.perf_counter()
                shapes = [warmup.latent_shape(pipe, source.size) for source, _, _ in sources]
                stepper = make_stepper(shapes)
                warmup.warm_up_while_encoding(stepper, [source[0] for source in sources], triton_ready, warm_key,
                                              plan=fast.plan_ahead)
                if encoded_shapes() != shapes:  # a VAE unlike its config: warm-up wasted, no harm
                    if stepper.first_capture_error:  # not tried again for the new shapes
                        warmup.capture_first_failed(warm_key)
                    stepper.close()
                    stepper = make_stepper(encoded_shapes())
                _sync(device)
                times["warm-up+latents"] = time.perf_counter() - began
            else:
                stepper = make_stepper(encoded_shapes())
            pending = draw_window(step) if step < config.steps and not stopped else None
            while pending is not None:
                a, b, drawn = pending
                staged = _stage(drawn, device)
                window = (a, b, staged)
                snapshot.take()
                # each step and its count: both or neither. Held once per window, not per step: on CUDA the loop
                # only enqueues graph replays, so an interrupt waits a few milliseconds (the first step: its capture)
                with deferred_interrupt():
                    for k in range(b - a):
                        stepper.load([(s[0][k], s[1][k], s[2][k]) for s in staged])
                        if stepper.calls == 0:
                            first = time.perf_counter()
                            label = "first step (replay)" if stepper.graph is not None else "first step+capture"
                            stepper()
                            _sync(device)
                            times[label] = time.perf_counter() - first
                            loop_start = time.perf_counter()
                        else:
                            stepper()
                        record[0, a + k].copy_(stepper.loss)
                        if stepper.grad_norm is not None:
                            record[1, a + k].copy_(stepper.grad_norm)
                        enqueued = a + k + 1
                stops = config.stop_after is not None and b >= config.stop_after and b < config.steps
                pending = draw_window(b) if b < config.steps and not stops else None  # overlaps the GPU
                values, norms, bad = settle(a, b, staged)
                if bad is not None:
                    window = None
                    if math.isfinite(values[bad]):  # the weights would be NaN from the next step on
                        what = f"the gradient of a finite loss ({values[bad]:.4g})"
                        raise base.TrainingDiverged(diverged_message(norms[bad], a + bad + 1, ckpt, config, amp,
                                                                          what))
                    raise base.TrainingDiverged(diverged_message(values[bad], a + bad + 1, ckpt, config, amp))
                with deferred_interrupt():  # the window's losses and its end: both or neither
                    losses.extend(values)
                    step, window = b, None
                bar.set_postfix(loss=f"{values[-1]:.4f}", refresh=False)  # drawn by the update: one write per window
                bar.update(b - a)
                if ckpt is not None and config.checkpoint_every and (step % config.checkpoint_every == 0
                                                                      or step == config.steps):
                    checkpoints.save(ckpt, stamp, target, optimizer, scaler, generator_at(step), step, losses,
                                     time.perf_counter() - start)
                    held = step
                if config.validate_every and step % config.validate_every == 0 and config.validation_prompts:
                    validation[step] = validation_images(pipe, target, concept, config)
                    unet.train()
                if stops:
                    if ckpt is not None:
                        checkpoints.save(ckpt, stamp, target, optimizer, scaler, generator_at(step), step, losses,
                                         time.perf_counter() - start)
                        held = step
                    completed = False
                    break
    except KeyboardInterrupt:
        if window is not None and stepper is not None:
            _sync(device)
            a, _, staged = window
            values, _, bad = settle(a, enqueued, staged)
            done = values if bad is None else values[:bad]
            losses.extend(done)
            step = a + len(done)
        if ckpt is not None:
            checkpoints.save(ckpt, stamp, target, optimizer, scaler, generator_at(step), step, losses,
                             time.perf_counter() - start)
            log.warning("interrupted at step %d; checkpoint saved to %s, %s", step, ckpt,
                        checkpoints.resume_hint(config))
        else:
            log.warning("interrupted at step %d; without a checkpoint_dir the partial run is not kept "
                        "(pass checkpoint_dir=... to be able to resume)", step)
        raise
    finally:
        bar.close()
        unet.train(was_training)
        if stepper is not None:
            if stepper.calls > 1:
                times[f"{stepper.calls - 1} more steps"] = time.perf_counter() - loop_start
            if stepper.first_capture_error:
                warmup.capture_first_failed(warm_key)
            log.info("fast loop: %d calls, graph %s, capture %.3f s%s%s; %s", stepper.calls,
                     "on" if stepper.graph is not None else "off", stepper.capture_seconds,
                     f", capture failed: {stepper.capture_error}" if stepper.capture_error else "",
                     f", capture before an eager step failed: {stepper.first_capture_error}"
                     if stepper.first_capture_error else "",
                     ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
            stepper.close()
        for p in params:
            p.requires_grad_(False)
    _sync(device)
    seconds = before if finished else time.perf_counter() - start
    record_run(target, pipe, config, seconds)
    return base.TrainResult(target, losses, seconds, step, completed, validation, ckpt if held == step else None)
