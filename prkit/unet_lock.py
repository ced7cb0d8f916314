"""One lock per UNet for what switches its residual sets and attention processors for a block: ``only_residuals``,
``residuals_disabled`` and ``lag_sampling`` (and so ``generate``, whose whole call is an ``only_residuals`` block). From
several threads on one UNet they run one after the other: a second thread's block switched the sets under the running
one, and restored the running one's selection as its 'before' (with LAG, it failed with 'attention capture is already
installed').

Re-entrant: ``generate`` holds it (in ``only_residuals``) while it enters ``lag_sampling``, training holds it (in
``only_residuals``) while its validation calls ``generate``, and a step callback's own ``generate`` on the UNet runs
nested in its thread. The threads prkit starts (the fast loop's latents and planned backwards) take it nowhere.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref

from torch import nn

from .residual_blocks import original_module

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # UNet -> its lock
_LOCKS_LOCK = threading.Lock()


def unet_lock(unet: nn.Module) -> threading.RLock:
    """The lock of ``unet`` (its torch.compile wrapper's too)."""
    unet = original_module(unet)
    with _LOCKS_LOCK:
        lock = _LOCKS.get(unet)
        if lock is None:
            lock = _LOCKS[unet] = threading.RLock()
    return lock


def holding_unet_lock(generator_function):
    """Make a context manager's generator function hold the lock of its first argument's UNet (a pipeline's
    ``unet``, or a UNet) for its whole block, checks included; something that is no module is left to the function
    to refuse."""

    @functools.wraps(generator_function)
    def locked(pipe_or_unet, *args, **kwargs):
        unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
        with unet_lock(unet) if isinstance(unet, nn.Module) else contextlib.nullcontext():
            yield from generator_function(pipe_or_unet, *args, **kwargs)

    return locked
