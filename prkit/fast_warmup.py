"""The fast loop's warm-up: a process's first training step pays one-time costs for every kernel it launches
(cuDNN plans and attention compiles, Triton's cache key and kernel loads, lazily loaded CUDA modules: ~1.5 s for
SD1.5 on an H100). The latents are encoded in a background thread from the start (beside the prompt's encoding);
before the first step, ``warm_up_while_encoding`` pays the costs once per thread, UNet and shapes: by capturing the
step's CUDA graph once the latents are encoded (``capture_first``), or with a throwaway forward + backward beside
the encoding where the step is not captured first (capture_first off, cuDNN's benchmark mode, no graph wanted);
where that capture fails, the throwaway runs after it, then one eager step and the capture. The numbers of training
are unchanged; only when the costs are paid moves.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from . import kernels
from .fast_plans import plan_ahead
from .fast_patches import uses_channels_last

_WARMED: set[tuple] = set()  # keys of what this process has warmed up: not again
_CAPTURE_FIRST_FAILED: set[tuple] = set()  # keys whose capture before any eager step failed: not tried again
_THREAD = threading.local()


class _ThreadToken:
    """Stands for one thread in the keys, compared by identity. threading.get_ident() is handed to a new thread once
    an old one has ended, and the new thread (which has none of the old one's cuDNN plans) was taken as warmed, or as
    failing to capture. A token lives as long as its thread or a key that holds it, so no other thread gets it."""

    __slots__ = ("__weakref__",)


def _thread_token() -> _ThreadToken:
    token = getattr(_THREAD, "token", None)
    if token is None:
        token = _THREAD.token = _ThreadToken()
    return token


def _forget(unet_ref: weakref.ref) -> None:
    """Called when a keyed UNet is collected: its keys go (they could match no other UNet, and would stay)."""
    for memory in (_WARMED, _CAPTURE_FIRST_FAILED):
        for entry in [k for k in list(memory) if k[1] is unet_ref]:
            memory.discard(entry)


def wanted(fast, device: torch.device) -> bool:
    """Whether the loop warms up before its first step (``FastConfig.warm_up``; None: on CUDA)."""
    return device.type == "cuda" if fast.warm_up is None else fast.warm_up


def key(pipe, concept, config, params, fast, amp) -> tuple:
    """What decides the kernels a training step launches: thread, UNet, shapes, precision and switches.

    The UNet is keyed by a weak reference, not its id(): a UNet collected after its warm-up and a new one given its
    address had the same key, and the new one was taken as warmed (or as failing to capture). References to the same
    live UNet compare and hash equal (a module compares by identity); a dead one equals only itself, and its keys
    leave the memories when the UNet is collected. The reference does not keep the UNet alive. The thread is keyed
    by a token of its own (``_thread_token``), not by its id, which a later thread may be given."""
    unet = pipe.unet
    checkpointing = config.gradient_checkpointing or getattr(unet, "is_gradient_checkpointing", False)  # as run
    return (_thread_token(), weakref.ref(unet, _forget), config.batch_size, concept.images[0].size, unet.dtype, amp,
            tuple(p.shape for p in params), repr(fast), checkpointing,
            config.prior_images.images[0].size if config.prior_images is not None else None)


def needed(warm_key: tuple, fast, device: torch.device) -> bool:
    return wanted(fast, device) and warm_key not in _WARMED


def capture_first(fast, warm_key: tuple) -> bool:
    """Whether the step is captured before any eager step (``FastConfig.capture_first``): not under cuDNN's benchmark
    mode, set by ``cudnn_benchmark`` or by the caller (it times kernels, which a capture cannot), nor where it failed
    for the same thread, UNet and shapes before (each failed capture keeps its memory pool reserved)."""
    return (fast.capture_first and not fast.cudnn_benchmark and not torch.backends.cudnn.benchmark
            and warm_key not in _CAPTURE_FIRST_FAILED)


def capture_first_failed(warm_key: tuple) -> None:
    _CAPTURE_FIRST_FAILED.add(warm_key)


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


class Encoder:
    """The fast loop's background thread for the latents' encoding (``_Cache(latents_in=...)``): made at first use,
    joined when the run ends, also when it fails, so that no encoding outlives the call."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None

    def executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="prkit-latents")
        return self._pool

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, kind, *exc) -> None:
        if self._pool is not None:  # a run that failed: what has not started encoding is not started
            self._pool.shutdown(wait=True, cancel_futures=kind is not None)


def warm_up_while_encoding(stepper, caches, triton_ready, warm_key: tuple, plan: bool = True) -> None:
    """Pay the process's one-time kernel costs before the first step (``stepper.prepare()``) while the caches'
    latents are encoded in the background thread they were handed, which started before the prompt's encoding.

    It runs in the thread that runs the steps (PyTorch keeps cuDNN plans per thread). A capture
    (``stepper.capture_first``) waits for the latents first: beside another thread's encoding, that encoder's memory
    sat beside the graph's pool (a first recipe reserved 5.43 GB against 5.03 GB, one H200), and a retry after an
    out-of-memory error in that thread would empty the allocator's cache during the capture, which it refuses. The
    eager warm-up runs beside the encoding. The encoder's error, if any, is raised here. ``triton_ready``: the thread
    ``prepare_triton`` started, or None. ``plan``: before a capture, plan ahead (``fast_plans.plan_ahead``) while
    the latents encode.
    """
    if plan and stepper.capture_first:
        plan_ahead(stepper.unet, stepper.slots, stepper.autocast)
    if triton_ready is not None:
        triton_ready.join()
    if stepper.capture_first:
        for cache in caches:
            cache.encode_latents()
    stepper.prepare()
    for cache in caches:
        cache.encode_latents()
    _WARMED.add(warm_key)
