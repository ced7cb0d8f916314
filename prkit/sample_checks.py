"""Sampling's last check: a call whose latents or decoded images hold NaN or inf is refused, not handed on as black
images (diffusers' PIL conversion casts NaN to 0 with no more than a numpy warning, and ``prkit sample`` wrote them).

Seen with DPM-Solver++ at as many steps as the model has training timesteps: its linspace timesteps repeat one (500
of 1000), the solver divides by the zero step between them, and the latents end as NaN. Other schedulers, steps or
precisions can overflow too, so the output is checked, not the arguments: one reduction per decode, none per step.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch


class NonFiniteImages(RuntimeError):
    """A sampling call made NaN or inf latents or pixels (black images); none are returned. Training's validation
    catches it and goes on: a run is not lost to one sample."""


@contextlib.contextmanager
def finite_output(pipe, steps: int):
    """Within the block, each decode by ``pipe``'s VAE in this thread is checked as its decoder returns, before the
    pipeline converts the images: non-finite pixels are noted there, saying whether the latents (the ``steps``
    denoising steps) or the VAE made them, and handed on as zeros. Yields a check for what the call returns, which
    raises what was noted and checks what it returns as a tensor or array (output_type='latent': the latents, also
    where a step callback decoded a preview on the way, which once stood for the call's own decode). Raising in
    the decoder skipped the pipeline's own steps after it: SDXL casts a float16 VAE it upcast for the decode back
    after it, and was left with a float32 VAE that later float16 calls failed on.

    Raises:
        NonFiniteImages (a RuntimeError): the latents or the images are not finite.
    """
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    owner, problems = threading.get_ident(), []

    def after_decode(module, args, images):
        if threading.get_ident() != owner or not isinstance(images, torch.Tensor):
            return  # another pipeline's call on a shared VAE checks its own
        if not bool(torch.isfinite(images).all()):
            latents = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if latents is not None and bool(torch.isfinite(latents).all()):
                problems.append(_vae_message(pipe, images.dtype))
            else:
                problems.append(_denoising_message(pipe, steps))
            return torch.nan_to_num(images, nan=0.0, posinf=0.0, neginf=0.0)  # converted without numpy's warning

    def check_returned(output) -> None:
        if problems:
            raise NonFiniteImages(problems[0])
        if not isinstance(output, (torch.Tensor, np.ndarray)):
            return  # checked at the decode (PIL images can no longer tell NaN from black)
        finite = torch.isfinite(output).all() if isinstance(output, torch.Tensor) else np.isfinite(output).all()
        if not bool(finite):
            raise NonFiniteImages(_denoising_message(pipe, steps))

    hook = decoder.register_forward_hook(after_decode) if isinstance(decoder, torch.nn.Module) else None
    try:
        yield check_returned
    finally:
        if hook is not None:
            hook.remove()


def _denoising_message(pipe, steps: int) -> str:
    scheduler = getattr(pipe, "scheduler", None)
    trained = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    near = f" (near its {trained} training timesteps a scheduler's timesteps can repeat)" if trained else ""
    return (f"generate: {steps} denoising steps of {type(scheduler).__name__} gave non-finite latents (NaN or inf), "
            f"which would be black images; none are returned. Sample with fewer steps{near}, or with another "
            "scheduler")


def _vae_message(pipe, dtype: torch.dtype) -> str:
    why = ("its weights hold NaN or inf" if dtype == torch.float32 else
           f"it overflows in {str(dtype).removeprefix('torch.')}: load the pipeline with dtype='fp32'")
    return (f"generate: the VAE ({type(pipe.vae).__name__}) decoded finite latents into non-finite pixels (NaN or inf), "
            f"which would be black images; none are returned: {why}")
