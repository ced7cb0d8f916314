"""Which pipeline call LAG is masking: ``lag_sampling`` watches the pipeline's ``encode_prompt`` (the prompts it
encodes must be those the masks were made for) and reads its guidance flag live, checked against the UNet's batch."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch


def pipeline_cfg(pipe) -> Callable[[int | None], bool]:
    """A callable reading, during a pipeline call, whether it runs classifier-free guidance (the UNet batch it is
    given, as every CaptureState flag callable is, goes unused)."""
    def cfg(batch: int | None = None) -> bool:
        try:
            return bool(pipe.do_classifier_free_guidance)
        except AttributeError:
            return False
    return cfg


def _as_list(prompts) -> list | None:
    return None if prompts is None else [prompts] if isinstance(prompts, str) else list(prompts)


def _same_rows(given: list, wanted: list) -> bool:
    """Whether two prompt lists give every batch row the same prompt once each is repeated per prompt (diffusers'
    num_images_per_prompt order) to a common length: ['p'] and ['p', 'p'] do, ['p', 'q'] and ['q', 'p'] do not."""
    n = math.lcm(len(given), len(wanted))
    return [p for p in given for _ in range(n // len(given))] == [p for p in wanted for _ in range(n // len(wanted))]


@contextlib.contextmanager
def watched_pipeline(pipe, prompts: list[str] | None, prompts_2: list[str] | str | None = None):
    """Within the block, ``pipe.encode_prompt`` checks that the prompts the pipeline encodes are ``prompts`` (and
    SDXL's ``prompt_2``, ``prompts_2``, where both are given), which the masks were made for; yields a callable
    telling whether the running call uses classifier-free guidance, read live from ``pipe`` (a step callback may
    switch it off mid-run), which refuses a UNet call that ``pipe`` did not prepare: another pipeline built from
    the same components (``StableDiffusionImg2ImgPipeline(**pipe.components)``) has its own flag, which the
    masks cannot see. Such a call is caught where ``pipe`` never encoded a prompt in the block, and after a call
    of ``pipe`` where the UNet's batch does not fit ``pipe``'s last encoding (its rows, doubled under guidance)."""
    import inspect

    original = pipe.encode_prompt
    signature = inspect.signature(original)
    own = pipe.__dict__.get("encode_prompt")  # an instance attribute of the caller's own, put back afterwards
    seen: list[int | None] = []  # per encode_prompt call: the rows it returned (None when not a tensor)
    live = pipeline_cfg(pipe)

    def encode_prompt(*args, **kwargs):
        given = signature.bind_partial(*args, **kwargs).arguments
        for name, wanted in (("prompt", prompts), ("prompt_2", prompts_2)):
            text = _as_list(given.get(name))
            if wanted is not None and text is not None and not _same_rows(text, _as_list(wanted)):
                raise ValueError(
                    f"the pipeline is encoding {name}={text!r}, but LAG's masks were made for {_as_list(wanted)!r}: "
                    f"pass the same prompts to lag_sampling as to the pipeline call (prkit.generate does both)")
        out = original(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) and out else out
        seen.append(first.shape[0] if isinstance(first, torch.Tensor) else None)
        return out

    def cfg(batch: int | None = None) -> bool:
        other = ("Give lag_sampling the pipeline you call (a pipeline built from the same components, such as an "
                 "img2img one, is another object), or pass cfg=True/False")
        if not seen:
            raise RuntimeError("lag_sampling(pipe, ...): the UNet ran without pipe encoding a prompt, so LAG cannot "
                               f"tell whether this call uses classifier-free guidance. {other}")
        guided, rows = live(), seen[-1]
        if batch is not None and rows is not None and batch != rows * (2 if guided else 1):
            raise RuntimeError(
                f"lag_sampling(pipe, ...): the UNet ran a batch of {batch} rows, but pipe's last call encoded {rows} "
                f"prompt rows {'with' if guided else 'without'} classifier-free guidance ({rows * (2 if guided else 1)}"
                f" rows): another pipeline object is running, or this pipeline batches its guidance otherwise "
                f"(InstructPix2Pix, PAG), which LAG does not support. {other}")
        return guided


    pipe.encode_prompt = encode_prompt
    try:
        yield cfg
    finally:
        if own is not None:
            pipe.encode_prompt = own
        else:
            del pipe.encode_prompt
