"""The personalization loop: frozen base model, trainable residuals, cached latents and text embeddings.

Owns the loop, mixed precision and exact resume. What is trained is a pluggable choice (``TARGETS``) so baselines
can reuse the loop; the recipe's settings live in ``train_config``, checkpoints in ``checkpoints``, signal holding
in ``interrupts``, what a step is fed (conditioning, cached latents, targets) in ``train_inputs``, what both loops
do alike around their steps (resume, divergence, validation images, the run's record) in ``train_run``; sampling
and files elsewhere.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoints
from .checks import writable_folder
from .fast_step import clip_and_norm
from .interrupts import deferred_interrupt, terminate_as_interrupt
from .base_only import adapters_off, freeu_off
from .residuals import Residuals, get_residuals, only_residuals, remove_residuals, residual_names
from .targets import LORA_MODULES, TARGETS
# what a step is fed, re-exported: prkit.train stays their import path
# what both loops do alike around their steps; diverged_message and record_run re-exported (prkit.train's paths)
from .train_run import diverged_message, record_run, resume, validation_images  # noqa: F401
from .train_inputs import (  # noqa: F401
    PREDICTION_TYPES, _Cache, _expand, encode_images, encode_text, sdxl_time_ids, training_scheduler)
# the recipe's settings and results, re-exported: prkit.train stays their import path
# what a pipeline must be to train on, re-exported
from .train_checks import (  # noqa: F401
    _check_none_merged, _check_not_empty, _check_not_offloaded, _check_parts, _check_precision, _check_text_to_image)
from .train_config import (  # noqa: F401
    TrainConfig, TrainingDiverged, TrainingWriteError, TrainResult, _check_resolution, _check_validation,
    _precision, _public, default_learning_rate, training_prompt, training_template)

log = logging.getLogger(__name__)


_OWN_SETTINGS = ("fused", "capturable", "foreach", "differentiable")  # how this loop's AdamW runs, not what it learnt


def load_optimizer(optimizer, state: dict, learning_rate: float, source, weight_decay: float | None = None) -> None:
    """Restore the optimizer of a checkpoint at this run's learning rate and weight decay (the checkpoint's may be
    others: a changed default or ``--lr``); says so when they differ. The optimizer keeps its own way of running
    (a fast-loop checkpoint written on CUDA is fused and capturable; the eager loop, or a CPU, resumes it as plain
    AdamW), with the step counters where that way wants them."""
    own = [{k: g[k] for k in _OWN_SETTINGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            saved = optimizer.state.get(p, {})
            if "step" in saved:
                saved["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).detach().to(
                    p.device if on_device else "cpu")
    for key, value in (("lr", learning_rate), ("weight_decay", weight_decay)):
        if value is None:
            continue
        saved = {float(g[key]) for g in optimizer.param_groups if key in g}
        if saved and saved != {float(value)}:
            log.warning("%s was trained at %s %s; resuming at this run's %s", source,
                        "learning rate" if key == "lr" else "weight decay",
                        ", ".join(f"{v:g}" for v in sorted(saved)), f"{value:g}")
        for group in optimizer.param_groups:
            group[key] = value


def train_residuals(pipe, concept, config: TrainConfig | None = None, *, name: str = "default",
                    progress: bool = True, **overrides) -> TrainResult:
    """Personalize ``pipe`` on ``concept``: train a residual set (or another target), the base frozen.

    Args:
        pipe: an SD/SDXL pipeline (``prkit.load_pipeline``).
        concept: a ``prkit.data.Concept`` (images, token, class_word).
        config: the recipe; keyword ``overrides`` replace single fields (``steps=300``).
        name: the residual set's name on the UNet.
    Returns:
        a TrainResult with the trained set, the per-step losses and the wall time.
    Raises:
        TrainingWriteError (an OSError) where a checkpoint cannot be written: the set trained so far stays on the
        model under ``name`` and the message says how to save it before the next call replaces it.
    """
    config = config or TrainConfig()
    config = replace(config, **overrides) if overrides else config
    _check_validation(config)  # pointing at the caller's line
    from .data import check_concept_words  # load_concept's rule, for a Concept made by hand

    check_concept_words(getattr(concept, "token", None), getattr(concept, "class_word", None))
    if config.prompt_template is None:  # resolved once, so that the file records it
        config = replace(config, prompt_template=training_template(config, concept))
    if config.checkpoint_dir:  # before any work that its checkpoints would keep
        writable_folder(checkpoints.checkpoint_file(config).parent, "checkpoint_dir")
    if config.learning_rate is None:
        config = replace(config, learning_rate=default_learning_rate(pipe, config.target, config.batch_size))
    unet = pipe.unet
    _check_resolution(pipe, concept)  # both loops (the fast one too), pointing at the caller's line
    _check_not_offloaded(unet)
    _check_parts(pipe)
    _check_not_empty(pipe)
    _check_text_to_image(pipe)
    _check_none_merged(unet, name)
    training_scheduler(pipe)  # its refusals (an EDM, flow-matching or continuous-time sampler) before any change
    _check_precision(config, unet)
    unfinished = _unfinished(unet)
    left = unfinished.pop(name, None)
    if isinstance(left, weakref.ref):
        if name in residual_names(unet) and left() is _first_factor(get_residuals(unet, name)):
            remove_residuals(unet, name)  # the very set a failed or interrupted call left: replaced
    elif left is not None:  # a baseline stopped early (stop_after) comes off: this call resumes it
        left.remove()
    made: list = []  # the target the loop adds to the model
    modules = [m for m in (unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None),
                           pipe.vae) if m is not None]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    wants_fast = config.fast or (config.fast is None and unet.device.type == "cuda")
    text_grad = getattr(TARGETS[config.target], "needs_text_encoder", False)
    if config.fast and text_grad:
        log.warning("fast=%r is ignored for target=%r: its text encoder trains, and the fast loop keeps the text "
                    "encoded once; training with the eager loop", config.fast, config.target)
    if config.stop_after is not None and config.stop_after < config.steps and not config.checkpoint_dir:
        log.warning("stop_after=%d without checkpoint_dir: the stopped run cannot be continued (the next call "
                    "starts over); pass checkpoint_dir=... to resume it later", config.stop_after)
    if config.stop_after is not None and config.stop_after < config.steps and not config.resume:
        log.warning("stop_after=%d with resume=False: every call starts over and stops at step %d; continue the "
                    "stopped run with resume=True", config.stop_after, config.stop_after)
    if config.checkpoint_dir and not config.resume:  # starting over: the earlier run's state must not be resumed
        aside = checkpoints.set_aside(checkpoints.checkpoint_file(config), "replaced")  # by a later call
        if aside is not None:
            log.warning("resume=False: this run starts over; the checkpoint it would have resumed is kept as %s",
                        aside)
    try:
        # grad on even inside the caller's no_grad/inference_mode; only this run's set active (others stay; a merged
        # one is refused here, before anything is added); SIGTERM checkpoints as Ctrl-C does
        with terminate_as_interrupt(), torch.inference_mode(False), torch.enable_grad(), \
                only_residuals(unet, [name]), freeu_off(unet), \
                adapters_off([m for m in modules if m is not pipe.vae
                              and (m is not unet or config.target not in LORA_MODULES)]):
            # loaded LoRAs are off while training (not on the UNet for a peft LoRA target: peft's switch is per layer,
            # not per adapter, and it would take the adapter being trained off too; adding it makes it the only one
            # active there); the text encoders' are off for every target
            if wants_fast and not text_grad:  # the fast loop encodes the text once
                from .fast import FastConfig, train_fast

                switches = config.fast if isinstance(config.fast, FastConfig) else None
                result = train_fast(pipe, concept, config, name=name, progress=progress, fast=switches,
                                    register=made.append)
            else:
                result = _train_eager(pipe, concept, config, name, progress, made.append)
        handle = getattr(result, "residuals", None)  # (a stand-in loop's result may have none)
        if hasattr(handle, "after_training"):  # DreamBooth: its fp32 master weights in the base's dtypes,
            handle.after_training()  # which the pipeline's latents and text embeddings are in
        if getattr(result, "completed", True) is False:  # stopped early (stop_after): the next call with this name
            # resumes it; a baseline's handle is kept itself (it alone can take the baseline off the model)
            unfinished[name] = weakref.ref(_first_factor(handle)) if isinstance(handle, Residuals) else handle
        return result
    except BaseException as err:
        kept = None
        for target in made:  # a residual set stays with its last good weights (nothing is lost) until the next call
            if isinstance(target, Residuals):  # with this name replaces it; other targets come off the model
                unfinished[target.name] = weakref.ref(_first_factor(target))
                kept = target.name
            else:
                target.remove()
        if kept is not None and getattr(err, "prkit_checkpoint", None) is not None:  # a checkpoint not written
            raise _kept_on_the_model(err, kept, config) from err
        raise
    finally:
        for p, was in flags:
            p.requires_grad_(was)
        if checkpointing and not unet.is_gradient_checkpointing:
            unet.enable_gradient_checkpointing()


def _kept_on_the_model(err: OSError, name: str, config) -> TrainingWriteError:
    """``err`` (a checkpoint that could not be written), saying that the set ``name`` stays on the model with the
    weights it had trained and that the next call replaces it: the caller saves it first."""
    ckpt = checkpoints.checkpoint_file(config)
    again = (f"resuming from {ckpt}, the last checkpoint written" if ckpt is not None and config.resume
             and ckpt.is_file() else "starting over: no checkpoint holds this run")
    # word for word as cli_output.EVAL_WORDS rewords it for prkit eval (whose model ends with the command)
    text = (f"{err.strerror or err}. The residual set {name!r} stays on the model with the weights it had trained: "
            f"save it where there is room (prkit.save_residuals(prkit.get_residuals(pipe.unet, {name!r}), path)) "
            f"before calling train_residuals again, which replaces it, {again}")
    return TrainingWriteError.of(err, text)


def _unfinished(unet) -> dict:
    """The residual sets on ``unet`` whose training failed or was interrupted (name -> a weak reference to the set's
    first factor, so a set loaded or added later under the same name is never taken for it), and the baselines
    stopped early (name -> the handle): the next ``train_residuals`` call with the same name replaces such a set or
    removes such a baseline (resuming from its checkpoint, if any)."""
    if not hasattr(unet, "_prkit_unfinished"):
        unet._prkit_unfinished = {}
    return unet._prkit_unfinished


def _first_factor(residuals: Residuals):
    return next(iter(residuals.factors().values()), None)


def _train_eager(pipe, concept, config: TrainConfig, name: str, progress: bool, register) -> TrainResult:
    start = time.perf_counter()
    unet = pipe.unet
    device = unet.device
    for module in (unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None), pipe.vae):
        if module is not None:
            module.requires_grad_(False)
    target = TARGETS[config.target](pipe, concept, config, name)
    register(target)
    params = [p for p in target.parameters()]
    for p in params:
        p.data = p.data.float()  # fp32 master weights even on a half-precision base
        p.requires_grad_(True)
    scheduler = training_scheduler(pipe)
    prompt = training_prompt(config, concept)
    cache = _Cache(pipe, concept, prompt, config.flip)
    prior = _Cache(pipe, config.prior_images, f"a photo of a {concept.class_word}", config.flip) \
        if config.prior_images is not None else None
    cond = _expand(cache.cond, config.batch_size)
    text_grad = getattr(target, "needs_text_encoder", False)
    prior_cond = _expand(prior.cond, config.batch_size) if prior else None

    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    amp = _precision(config, device, unet.dtype)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None  # on: CUDA only
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = checkpoints.checkpoint_file(config)
    stamp = checkpoints.fingerprint(pipe, concept, config, amp) if ckpt is not None else None
    # held: the step whose state ckpt holds, once this call restored or wrote it; finished: nothing left (or stopped
    # already), so the run's own seconds, not this call's set-up added
    step, losses, before, finished, stopped, held = resume(ckpt, stamp, target, optimizer, scaler, gen, config)
    start -= before  # the run's seconds count its earlier calls too
    # on where asked, unless the owner already checkpoints (with a function of its own, kept); back as it was after
    undo_checkpointing = None
    if config.gradient_checkpointing and not getattr(unet, "is_gradient_checkpointing", False):
        from .fast_patches import patch_gradient_checkpointing  # here: it imports Triton, which prkit.train need not

        undo_checkpointing = patch_gradient_checkpointing(unet, rng_free=False)
    was_training = unet.training
    unet.train()
    validation: dict[int, list] = {}
    bar = tqdm(total=config.steps, initial=step, desc="personalizing", disable=not progress)
    completed = not stopped
    step_start = gen.get_state()  # an interrupt before the current step completes resumes from here
    try:
        while step < config.steps and not stopped:
            if text_grad:  # the identifier's embedding trains: its conditioning is recomputed with grad
                cond = _expand(encode_text(pipe, prompt, cache.size, grad=True), config.batch_size)
            loss = _step(unet, cache, cond, prior, prior_cond, config, scheduler, gen, device, amp)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(diverged_message(value, step + 1, ckpt, config, amp))
            with deferred_interrupt():  # the update and the step count it belongs to: both or neither
                grad = _backward(loss, optimizer, scaler, params, config.max_grad_norm)
                if grad is not None:  # refused, as a non-finite loss is: the next step's loss would be NaN
                    raise TrainingDiverged(diverged_message(grad, step + 1, ckpt, config, amp,
                                                            f"the gradient of a finite loss ({value:.4g})"))
                step += 1
                step_start = gen.get_state()
                losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)  # drawn by the update: one write per step
            bar.update(1)
            if ckpt is not None and config.checkpoint_every and (step % config.checkpoint_every == 0
                                                                 or step == config.steps):
                checkpoints.save(ckpt, stamp, target, optimizer, scaler, gen, step, losses,
                                 time.perf_counter() - start)
                held = step
            if config.validate_every and step % config.validate_every == 0 and config.validation_prompts:
                validation[step] = validation_images(pipe, target, concept, config)
                unet.train()
            if config.stop_after is not None and step >= config.stop_after and step < config.steps:
                if ckpt is not None:
                    checkpoints.save(ckpt, stamp, target, optimizer, scaler, gen, step, losses,
                                     time.perf_counter() - start)
                    held = step
                completed = False
                break
    except KeyboardInterrupt:
        if ckpt is not None:
            gen.set_state(step_start)  # undo the unfinished step's draws: exact resume
            checkpoints.save(ckpt, stamp, target, optimizer, scaler, gen, step, losses,
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
        if undo_checkpointing is not None:
            undo_checkpointing()
        for p in params:
            p.requires_grad_(False)
    seconds = before if finished else time.perf_counter() - start
    record_run(target, pipe, config, seconds)
    return TrainResult(target, losses, seconds, step, completed, validation, ckpt if held == step else None)


def _in_dtype(cond: dict, dtype: torch.dtype) -> dict:
    """The conditioning's floating tensors in ``dtype`` (without autocast, a UNet trained in fp32 master weights
    on a half-precision pipeline, DreamBooth's, gets text embeddings in the pipeline's dtype)."""
    def cast(value):
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    return cast(cond)


def _step(unet, cache, cond, prior, prior_cond, config, scheduler, gen, device, amp) -> torch.Tensor:
    if amp is None:
        cond = _in_dtype(cond, unet.dtype)
        prior_cond = _in_dtype(prior_cond, unet.dtype) if prior_cond is not None else None
    noisy, steps, target = cache.batch(config.batch_size, gen, scheduler, device)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        pred = unet(noisy.to(unet.dtype), steps, **cond).sample
    loss = F.mse_loss(pred.float(), target.float())
    if prior is not None:
        noisy, steps, target = prior.batch(config.batch_size, gen, scheduler, device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            pred = unet(noisy.to(unet.dtype), steps, **prior_cond).sample
        loss = loss + config.prior_weight * F.mse_loss(pred.float(), target.float())
    return loss


def _backward(loss, optimizer, scaler, params, max_grad_norm) -> float | None:
    """One update from ``loss``; returns None, or the gradients' norm where it is NaN or infinite without a grad
    scaler (which skips such a step itself): the update is then refused, the parameters and AdamW's moments keep
    their values."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    norm = clip_and_norm(params, max_grad_norm, want=scaler is None)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        if norm is not None and not math.isfinite(norm := float(norm)):
            optimizer.zero_grad(set_to_none=True)
            return norm
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return None
