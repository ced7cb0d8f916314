"""Sampling: images from a pipeline with chosen residual sets, with or without LAG.

A thin layer over the standard pipeline call; LAG itself lives in ``lag.py``.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import numbers
import threading
import weakref
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .attention import AttentionStore
from .attention import CaptureState, capture_attention
from .checks import check_flag
from .graphs import graphed_unet
from .lag import LAGConfig, lag_sampling, pipeline_cfg
from .residuals import Residuals, get_residuals, only_residuals, original_module
from .sample_checks import finite_output


@dataclass
class SampleConfig:
    """Sampler defaults."""

    steps: int = 25  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance
    negative_prompt: str | None = None


def generate(pipe, prompt: str | Sequence[str], residuals: Residuals | str | Sequence[Residuals | str] | None = None,
             *, lag: bool = True, seed: int | None = 0, num_images: int = 1, steps: int | None = None,
             guidance_scale: float | None = None, negative_prompt: str | Sequence[str] | None = None,
             lag_config: LAGConfig | None = None, store: AttentionStore | None = None,
             config: SampleConfig | None = None, fast: bool | None = None, **pipe_kwargs):
    """Generate images with exactly the given residual sets active (none: the base model).

    Args:
        pipe: a loaded SD/SDXL pipeline.
        prompt: one prompt or a list; each yields ``num_images`` images.
        residuals: a set, several sets (multi-concept), or None for the base model; each must live on
            ``pipe.unet`` (a removed set, or one on another pipeline, is refused: it would sample something else).
            A set's name stands for the set of that name on ``pipe.unet``.
        lag: apply each set only under its concept's attention mask (no extra UNet evaluations).
        seed: seeds the generator, so the same call gives the same images (None: other images each call).
        store: an AttentionStore to fill with per-token maps (works with lag on or off); cleared first.
        fast: replay the UNet as a CUDA graph within the call (``prkit.graphs``); None: on for CUDA unless
            a store or step callbacks need Python at every step.
        **pipe_kwargs: passed to the pipeline call (height, width, output_type, callbacks, ...).
    Returns:
        the list of images (PIL unless ``output_type`` says otherwise).
    Raises:
        NonFiniteImages (a RuntimeError): the latents or the decoded images hold NaN or inf (``sample_checks``),
            which PIL would have made black images; none are returned.

    Calls on one UNet from several threads run one after the other (``unet_lock``): each switches the UNet's
    sets and attention processors for its whole call. A call from a step callback of a call with LAG or a store is
    refused (RuntimeError): it would run through that call's attention capture.
    """
    config = config or SampleConfig()
    if lag_config is not None and not isinstance(lag_config, LAGConfig):
        raise TypeError(f"lag_config must be a prkit.LAGConfig (e.g. LAGConfig(threshold='otsu')), got {lag_config!r}")
    if store is not None and not isinstance(store, AttentionStore):
        raise TypeError(f"store must be a prkit.AttentionStore to fill (store=AttentionStore()), got {store!r}")
    check_flag(lag, "generate: lag")  # lag='False' (a string) is truthy: it sampled with LAG
    check_flag(fast, "generate: fast", " or None")
    sets = _sets(pipe, residuals)
    _check_prompt(prompt, pipe_kwargs)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    steps, num_images = _diffusers_names(pipe_kwargs, steps, num_images)
    _check_pipe_kwargs(pipe, pipe_kwargs)
    sides = [pipe_kwargs.get(k) for k in ("height", "width")]
    if sides.count(None) == 1:  # diffusers drops a lone side (both become native): the other side is native
        from .pipeline import native_resolution

        side = "width" if sides[0] is not None else "height"
        pipe_kwargs[side] = native_resolution(pipe)
    for arg, value in (("steps", steps), ("num_images", num_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"generate: {arg} must be a whole number >= 1, got {value!r}")
    # numpy integers (np.int64(25) from a sweep) as Python's, as seed takes them
    steps, num_images = (None if v is None else int(v) for v in (steps, num_images))
    device = execution_device(pipe)
    generator = pipe_kwargs.pop("generator", None)  # the caller's own generator wins over seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"generate: seed must be a whole number (or None: new images each call), got {seed!r}")
    if generator is None and seed is not None:  # None: diffusers draws from torch's global generator
        generator = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(int(seed))
    negative = negative_prompt if negative_prompt is not None else config.negative_prompt
    if isinstance(negative, str):  # diffusers wants one per prompt when the prompts are a list
        negative = [negative] * len(prompts)
    elif negative is not None:  # and a list, as the prompts are (it refuses a tuple: "should be the same type")
        negative = list(negative)
    if negative is not None and not _call_takes(pipe, "negative_prompt"):  # LCM's: its **kwargs would drop it
        given = "negative_prompt=" if negative_prompt is not None else "config= (its SampleConfig.negative_prompt)"
        raise TypeError(f"generate: {type(pipe).__name__}'s call takes no negative_prompt and would ignore the one "
                        f"{given} gives; leave it out for this pipeline")
    for key in ("prompt_2", "negative_prompt_2"):  # SDXL's second texts: one per prompt, as the negative above
        if isinstance(pipe_kwargs.get(key), str):
            pipe_kwargs[key] = [pipe_kwargs[key]] * len(prompts)
    if _CAPTURING.get(original_module(pipe.unet)) == threading.get_ident():  # from a step callback of that call
        raise RuntimeError("generate: called while another generate call samples this UNet with LAG or store= (from "
                           "one of its step callbacks?): that call's attention capture would take this call's UNet "
                           "evaluations as its own steps (its masks, its store); sample after it returns, or give it "
                           "lag=False and no store")
    if lag and sets:
        context = lag_sampling(pipe, sets, prompts, config=lag_config, store=store,
                               prompts_2=pipe_kwargs.get("prompt_2"))
    elif store is not None:
        context = capture_attention(pipe.unet, CaptureState(cfg=pipeline_cfg(pipe), store=store))
    else:
        context = contextlib.nullcontext()
    if fast and store is not None:  # refused on every device, so a notebook behaves the same on CPU and GPU
        raise ValueError("generate: store= needs Python at every denoising step, which a CUDA graph replay skips "
                         "(its maps would stop after the first step); pass fast=None or fast=False with store=")
    if fast is None:
        fast = device.type == "cuda" and store is None and not any(k.startswith("callback") for k in pipe_kwargs)
    steps = steps if steps is not None else config.steps
    # only_residuals holds the UNet's lock (unet_lock) for the whole call: another thread's call waits. no_grad, as
    # diffusers' own call: inference_mode handed out inference tensors, which refuse in-place updates and autograd
    with only_residuals(pipe.unet, sets), context, torch.no_grad(), \
            graphed_unet(pipe.unet, enabled=fast), finite_output(pipe, steps) as check_returned, \
            _capturing(pipe.unet, not isinstance(context, contextlib.nullcontext)):
        out = pipe(prompts, num_inference_steps=steps,
                   guidance_scale=config.guidance_scale if guidance_scale is None else guidance_scale,
                   negative_prompt=negative, num_images_per_prompt=num_images, generator=generator, **pipe_kwargs)
        images = out[0] if isinstance(out, tuple) else out.images  # return_dict=False: (images, ...)
        check_returned(images)
    return images


# UNet -> the thread whose generate call samples it through an attention capture (another thread's call waits on the
# UNet's lock; a call in that very thread comes from one of its step callbacks)
_CAPTURING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _capturing(unet, on: bool):
    """Within the block, ``unet`` is marked as sampled through an attention capture by this thread (``on``)."""
    unet = original_module(unet)
    if on:
        _CAPTURING[unet] = threading.get_ident()
    try:
        yield
    finally:
        if on:
            _CAPTURING.pop(unet, None)


def _sets(pipe, residuals) -> list[Residuals]:
    """The handles to sample: ``residuals`` as given, a name (not split into letters) the set of that name on
    ``pipe.unet``."""
    given = [] if residuals is None else [residuals] if isinstance(residuals, (Residuals, str)) else residuals
    given = list(given) if isinstance(given, Iterable) else [given]
    from .targets import FullUNetTarget, PeftTarget, TokenTarget

    baseline = next((r for r in given if isinstance(r, (PeftTarget, TokenTarget, FullUNetTarget))), None)
    if baseline is not None:
        raise ValueError(f"generate: residuals= got a baseline's handle ({type(baseline).__name__}), not a residual "
                         "set: a baseline is on the model itself until its remove(), so generate(pipe, prompt, None) "
                         "samples with it (LAG masks residual sets only)")
    if not all(isinstance(r, (Residuals, str)) for r in given):
        raise ValueError("generate: residuals= takes a Residuals handle (result.residuals, prkit.load_residuals(...)), "
                         f"a set's name, a list of them, or None, got {type(residuals).__name__}")
    return [get_residuals(pipe.unet, r) if isinstance(r, str) else r for r in given]


def _check_prompt(prompt, pipe_kwargs: dict) -> None:
    """generate samples prompts given as text: LAG and the store find the concept's tokens in it."""
    embeds = [k for k in ("prompt_embeds", "pooled_prompt_embeds") if pipe_kwargs.get(k) is not None]
    if embeds:
        raise ValueError(
            f"generate takes the prompt as text, not {embeds[0]}= (LAG finds the concept's tokens in the text). With "
            "precomputed embeddings (prompt weighting), call the pipeline yourself: inside "
            "prkit.lag_sampling(pipe, sets, prompts) for LAG, where prompts are the texts the embeddings encode "
            "token for token, or inside prkit.only_residuals(pipe.unet, sets) without it")
    ok = isinstance(prompt, str) or (isinstance(prompt, Sequence) and len(prompt) > 0
                                     and all(isinstance(p, str) for p in prompt))
    if not ok:
        raise ValueError(f"generate: prompt must be a string or a non-empty list of strings, got {prompt!r}")


def execution_device(pipe) -> torch.device:
    """Where ``pipe`` computes: its UNet's device, or under CPU offload (model, sequential or group) the device
    its offload hooks run the models on, as diffusers' own ``_execution_device`` reports it."""
    device = getattr(pipe, "_execution_device", None)
    return device if isinstance(device, torch.device) and device.type != "meta" else pipe.unet.device


def _call_params(pipe):
    """The parameters of ``pipe``'s call, or None where it has no signature to read."""
    try:
        return inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return None


def _call_takes(pipe, name: str) -> bool:
    """Whether ``pipe``'s call names the argument ``name`` (True where it has no signature to read)."""
    params = _call_params(pipe)
    return params is None or name in params


DEPRECATED_CALL_KWARGS = ("callback", "callback_steps")  # what diffusers' call still reads from its **kwargs


def _check_pipe_kwargs(pipe, pipe_kwargs: dict) -> None:
    """Refuse a keyword that neither generate nor the pipeline's call names: diffusers' call takes **kwargs and
    drops what it does not know, so a slip (``n_images=4``) sampled as if it had not been given."""
    params = _call_params(pipe)
    if params is None:  # no signature to read: the pipeline says for itself
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # a call without **kwargs refuses unknown names itself
    known = {n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD,
                                                          inspect.Parameter.VAR_POSITIONAL)}
    known |= set(DEPRECATED_CALL_KWARGS)
    unknown = [key for key in pipe_kwargs if key not in known]
    if unknown:
        own = [n for n in inspect.signature(generate).parameters if n not in ("pipe", "pipe_kwargs")]
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, own + sorted(known), n=1, cutoff=0.6)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"generate: {', '.join(hints)} is no argument of generate nor of "
                        f"{type(pipe).__name__}'s call, which would ignore it; generate's own: {', '.join(own)}")


def _diffusers_names(pipe_kwargs: dict, steps, num_images):
    """Take diffusers' spellings (num_inference_steps, num_images_per_prompt) for prkit's steps and num_images."""
    if "num_inference_steps" in pipe_kwargs:
        given = pipe_kwargs.pop("num_inference_steps")
        if steps is not None and steps != given:
            raise ValueError(f"generate: num_inference_steps={given!r} and steps={steps!r} disagree; pass steps only")
        steps = given
    if "num_images_per_prompt" in pipe_kwargs:
        given = pipe_kwargs.pop("num_images_per_prompt")
        if num_images not in (1, given):  # 1 is generate's default
            raise ValueError(f"generate: num_images_per_prompt={given!r} and num_images={num_images!r} disagree; "
                             "pass num_images only")
        num_images = given
    return steps, num_images
