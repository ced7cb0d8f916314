"""The fast loop's warm-up: a process's first training step pays one-time costs for every kernel it launches
(cuDNN plans and attention compiles, Triton's cache key and kernel loads, lazily loaded CUDA modules: ~1.5 s for
SD1.5 on an H100). Before the first step, ``warm_up_while_encoding`` pays them while a background thread encodes
the latents, once per thread, UNet and shapes: by capturing the step's CUDA graph (which needs no data), or with a
throwaway forward + backward where no graph is wanted or that capture fails. The numbers of training are
unchanged; only when the costs are paid moves.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import kernels
from .fast_patches import uses_channels_last

_WARMED: set[tuple] = set()  # keys of what this process has warmed up: not again


def wanted(fast, device: torch.device) -> bool:
    """Whether the loop warms up before its first step (``FastConfig.warm_up``; None: on CUDA)."""
    return device.type == "cuda" if fast.warm_up is None else fast.warm_up


def key(pipe, concept, config, params, fast, amp) -> tuple:
    """What decides the kernels a training step launches: thread, UNet, shapes, precision and switches."""
    unet = pipe.unet
    checkpointing = config.gradient_checkpointing or getattr(unet, "is_gradient_checkpointing", False)  # as run
    return (threading.get_ident(), id(unet), config.batch_size, concept.images[0].size, unet.dtype, amp,
            tuple(p.shape for p in params), repr(fast), checkpointing,
            config.prior_images.images[0].size if config.prior_images is not None else None)


def needed(warm_key: tuple, fast, device: torch.device) -> bool:
    return wanted(fast, device) and warm_key not in _WARMED


def prepare_triton(fast, device: torch.device):
    """Start Triton's per-process preparation in a background thread where the step launches prkit's kernels."""
    uses = device.type == "cuda" and (uses_channels_last(fast, device) or fast.fused_geglu)
    return kernels.prepare() if uses else None


def latent_shape(pipe, size: int | tuple[int, int]) -> tuple[int, int, int]:
    """(channels, height, width) of the VAE latents of ``size`` (a side, or (height, width)) images, from the VAE's
    config."""
    config = pipe.vae.config
    factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(config.block_out_channels) - 1)
    height, width = (size, size) if isinstance(size, int) else size
    return (config.latent_channels, height // factor, width // factor)


def warm_up_while_encoding(stepper, caches, triton_ready, warm_key: tuple) -> None:
    """Encode the caches' latents in a background thread while ``stepper`` warms up in this one.

    The warm-up (``stepper.prepare()``) runs here because PyTorch keeps cuDNN plans per thread (the steps run here
    too); the encoder's error, if any, is raised here. ``triton_ready``: the thread ``prepare_triton`` started, or None.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="prkit-latents") as pool:
        latents = pool.submit(lambda: [cache.encode_latents() for cache in caches])
        if triton_ready is not None:
            triton_ready.join()
        stepper.prepare()
        latents.result()
    _WARMED.add(warm_key)
