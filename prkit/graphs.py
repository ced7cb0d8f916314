"""CUDA graphs for sampling: the UNet forward of one pipeline call captured once and replayed.

Owns ``graphed_unet(unet)``. Within the block, the first UNet call runs eagerly (warm-up), the second is
captured as a CUDA graph and every later call with the same shapes replays it: the per-step cost becomes the
GPU's, not Python's. Whatever Python decides at capture (active residual sets, scales, LAG's wiring) is frozen,
so a block must span one pipeline call with nothing changing those settings inside it. A no-op off CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .streams import side_stream

log = logging.getLogger(__name__)


def _signature(leaves) -> tuple:
    """What must match for a replay: every tensor's shape/dtype/device/strides and every other leaf's value."""
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(("t", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
        else:
            out.append(("v", type(leaf).__name__, repr(leaf)))
    return tuple(out)


class _GraphedForward:
    """Replaces ``unet.forward`` for the block: eager, then capture, then replays of one graph."""

    def __init__(self, unet: nn.Module, max_batch: int = 8):
        self.unet = unet
        self.max_batch = max_batch
        self.device = unet.device
        self.forward = type(unet).forward.__get__(unet)
        self.warm: tuple | None = None  # signature of the eager warm-up call
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature: tuple | None = None
        self.static_in: list = []
        self.static_out = None
        self.failed = False
        self.replays = 0

    def _prepare(self, args, kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        # a scalar timestep on the CPU would be copied to the GPU inside the graph: move it first
        leaves = [leaf.to(self.device) if isinstance(leaf, torch.Tensor) and leaf.device != self.device
                  and leaf.numel() == 1 else leaf for leaf in leaves]
        return leaves, spec

    def __call__(self, *args, **kwargs):
        if self.failed or kwargs.get("return_dict", True) is not False:
            return self.forward(*args, **kwargs)
        leaves, spec = self._prepare(args, kwargs)
        signature = (spec, _signature(leaves))
        if any(isinstance(leaf, torch.Tensor) and not leaf.is_cuda for leaf in leaves):
            return self.forward(*args, **kwargs)
        if isinstance(leaves[0], torch.Tensor) and leaves[0].shape[0] > self.max_batch:
            return self.forward(*args, **kwargs)  # big batches keep the GPU busy without a graph
        if self.graph is not None:
            if signature != self.signature:
                return self.forward(*args, **kwargs)
            return self._replay(leaves)
        if self.warm != signature:  # first call of these shapes: eager, as warm-up
            self.warm = signature
            return self.forward(*args, **kwargs)
        self._capture(leaves, spec, signature)
        if self.graph is None:
            return self.forward(*args, **kwargs)
        return self._replay(leaves)

    def _capture(self, leaves, spec, signature) -> None:
        self.static_in = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        s_args, s_kwargs = pytree.tree_unflatten(self.static_in, spec)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        stream = side_stream(self.device)
        stream.wait_stream(current)
        try:
            # torch.cuda.graph() would also empty the allocator's cache, which the VAE then pays for again
            with torch.cuda.stream(stream):
                graph.capture_begin()
                try:
                    out = self.forward(*s_args, **s_kwargs)
                finally:
                    graph.capture_end()
            current.wait_stream(stream)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager calls
            self.failed = True
            self.static_in = []
            warnings.warn(f"CUDA graph capture of the UNet failed ({type(err).__name__}: {err}); sampling eagerly",
                          RuntimeWarning, stacklevel=4)
            return
        self.graph, self.signature, self.static_out = graph, signature, out

    def _replay(self, leaves):
        for static, leaf in zip(self.static_in, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(leaf)
        self.graph.replay()
        self.replays += 1
        # the outputs are overwritten by the next replay: hand out copies (schedulers may keep them)
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.static_out)

    def close(self) -> None:
        self.graph = None
        self.static_in = []
        self.static_out = None


@contextlib.contextmanager
def graphed_unet(unet: nn.Module, enabled: bool = True, max_batch: int = 8):
    """Within the block, repeated UNet calls of one shape replay a CUDA graph (CUDA only; else a no-op).

    Args:
        unet: a diffusers UNet2DConditionModel on a CUDA device.
        enabled: False makes the block a no-op.
        max_batch: larger UNet batches (CFG doubles the images) run eagerly: they are GPU-bound already.
    Yields:
        the graph runner (``replays`` counts the graph replays), or None when not active.
    """
    if not enabled or unet.device.type != "cuda" or "forward" in unet.__dict__:
        yield None
        return
    runner = _GraphedForward(unet, max_batch)
    unet.forward = runner
    try:
        yield runner
    finally:
        unet.__dict__.pop("forward", None)
        log.debug("graphed UNet: %d replays%s", runner.replays, ", capture failed" if runner.failed else "")
        runner.close()
