"""Plans ahead: a process's first training step waits on cuDNN building a plan for each new convolution and
attention shape, and PyTorch keeps those plans per thread (the forward's in the thread that runs the steps, the
backward's in autograd's device thread). While the latents still encode in their own thread, the thread that runs
the steps is idle: ``plan_ahead`` runs the step's frozen convolutions and attention layers there once, on zeros of
the shapes the step will give them, with a backward to their inputs (started from a helper thread, group by group,
so that autograd's device thread plans one group's backward while the next group's forward is planned), so that the
capture finds the plans built. Measured on one H200 (BENCHMARKS.md run 21): a fresh process's first SD1.5 recipe
5.32-5.74 s against 5.68-5.94 s without, the same losses.

Nothing of training changes: the calls read zeros, write only their own outputs, and no parameter's gradient is
made (gradients go to the zero inputs alone). The shapes come from the UNet's structure (``step_calls``: diffusers'
``UNet2DConditionModel``, as its forward runs); a UNet of another shape, or a call that fails, is passed over, and
the capture builds what was not planned, as it did before.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

log = logging.getLogger(__name__)


def _plain(module, kind=nn.Conv2d):
    """``module`` where it is a ``kind``, the layer a peft LoRA wraps (its ``base_layer``: the call the step makes
    inside the wrapper, which also runs with the adapters off) where that is one, else None."""
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, kind) else None


def _conv_out(res: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    return tuple((r + 2 * p - d * (k - 1) - 1) // s + 1
                 for r, p, d, k, s in zip(res, conv.padding, conv.dilation, conv.kernel_size, conv.stride))


def _transformer_calls(model, res) -> list[tuple]:
    calls = []
    for name in ("proj_in", "proj_out"):
        conv = _plain(getattr(model, name, None))
        if conv is not None:  # proj_out: a residual layer (a Conv2d) where it trains
            calls.append(("conv", conv, (conv.in_channels, *res)))
    tokens = res[0] * res[1]
    for block in getattr(model, "transformer_blocks", None) or []:
        for name, cross in (("attn1", False), ("attn2", True)):
            attn = getattr(block, name, None)
            to_q = _plain(getattr(attn, "to_q", None), nn.Linear)
            if to_q is not None and (getattr(attn, "is_cross_attention", cross) == cross):
                calls.append(("cross" if cross else "self", attn, (tokens, to_q.in_features)))
    return calls


def _block_calls(block, res) -> list[tuple] | None:
    """The convolution and attention calls of one down/mid/up block at resolution ``res``; None: a block of a kind
    this does not follow."""
    calls = []
    resnets = list(getattr(block, "resnets", None) or [])
    attentions = list(getattr(block, "attentions", None) or [])
    for resnet in resnets:
        if getattr(resnet, "up", False) or getattr(resnet, "down", False):
            return None
        for name in ("conv1", "conv2", "conv_shortcut"):
            conv = _plain(getattr(resnet, name, None))
            if conv is not None:
                calls.append(("conv", conv, (conv.in_channels, *res)))
    for attention in attentions:
        calls += _transformer_calls(attention, res)
    return calls


def step_calls(unet, size: tuple[int, int]) -> list[tuple]:
    """(kind, module, input shape without the batch) for the frozen convolutions and the attention layers of one
    forward of ``unet`` on ``size`` (height, width) latents, following ``UNet2DConditionModel.forward``: each down
    block's skips, the upsampler's target size taken from the skip where the size does not halve evenly. kind:
    "conv" (input (C, H, W)), "self" or "cross" (hidden states (tokens, C)). What cannot be followed ends the list
    early."""
    res = tuple(size)
    calls: list[tuple] = []
    conv_in = _plain(getattr(unet, "conv_in", None))
    down_blocks = getattr(unet, "down_blocks", None)
    if conv_in is None or down_blocks is None:
        return calls
    calls.append(("conv", conv_in, (conv_in.in_channels, *res)))
    res = _conv_out(res, conv_in)
    skips = [res]
    for block in down_blocks:
        more = _block_calls(block, res)
        if more is None:
            return calls
        calls += more
        skips += [res] * len(getattr(block, "resnets", None) or [])
        for down in getattr(block, "downsamplers", None) or []:
            conv = _plain(getattr(down, "conv", None))
            if conv is None:
                return calls
            if getattr(down, "use_conv", False) and getattr(down, "padding", None) == 0:  # padded right and below
                res = (res[0] + 1, res[1] + 1)  # first (diffusers' downsample_padding=0)
            calls.append(("conv", conv, (conv.in_channels, *res)))
            res = _conv_out(res, conv)
            skips.append(res)
    if getattr(unet, "mid_block", None) is not None:
        more = _block_calls(unet.mid_block, res)
        if more is None:
            return calls
        calls += more
    factor = 2 ** sum(1 for block in unet.up_blocks if getattr(block, "upsamplers", None))
    uneven = any(s % factor for s in size)
    for block in unet.up_blocks:
        more = _block_calls(block, res)
        if more is None:
            return calls
        calls += more
        del skips[len(skips) - len(getattr(block, "resnets", None) or []):]
        for up in getattr(block, "upsamplers", None) or []:
            conv = _plain(getattr(up, "conv", None))
            if conv is None or not skips:
                return calls
            res = skips[-1] if uneven else (2 * res[0], 2 * res[1])
            calls.append(("conv", conv, (conv.in_channels, *res)))
    conv_out = _plain(getattr(unet, "conv_out", None))
    if conv_out is not None:
        calls.append(("conv", conv_out, (conv_out.in_channels, *res)))
    return calls


def _distinct(calls: list[tuple]) -> list[tuple]:
    """One call per signature cuDNN plans by (what the module computes and the input's shape)."""
    seen, out = set(), []
    for kind, module, shape in calls:
        if kind == "conv":
            sig = (kind, type(module), module.in_channels, module.out_channels, module.kernel_size, module.stride,
                   module.padding, module.dilation, module.groups, module.bias is not None, shape)
        else:
            sig = (kind, module.heads, module.to_q.in_features, module.to_q.out_features, shape,
                   type(module.processor))
        if sig not in seen:
            seen.add(sig)
            out.append((kind, module, shape))
    return out


def plan_ahead(unet, slots, autocast: torch.dtype | None, budget_bytes: int = 1 << 26) -> int:
    """Run the step's distinct frozen convolutions and attention layers once on zeros, with a backward to their
    inputs: the forwards in the calling thread (the one that runs the steps), the backwards in autograd's device
    thread, called from a helper thread group by group (groups of at most ``budget_bytes`` of inputs), so that one
    group's backward is planned while the next group's forward is. cuDNN's plans and attention graphs, and the
    kernels' modules, are then ready for the capture. ``slots``: the step's (``_Slot``: noisy latents buffer,
    conditioning). Returns the number of forward calls made, once every backward has ended; any failure ends it
    quietly (the capture builds the rest, as without it)."""
    device = slots[0].noisy.device
    done = 0
    pool = ThreadPoolExecutor(1, thread_name_prefix="prkit-plans")
    pending = []
    try:
        calls = []
        for slot in slots:
            batch, _, height, width = slot.noisy.shape
            context = slot.cond.get("encoder_hidden_states")
            calls += [(kind, module, shape, batch, context) for kind, module, shape in
                      _distinct(step_calls(unet, (height, width)))]
        noisy = slots[0].noisy  # the step's layout: channels-last where the fast loop runs so
        memory_format = (torch.channels_last if noisy.dim() == 4 and not noisy.is_contiguous()
                         and noisy.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        dtype = unet.dtype
        seen = set()
        inputs, outputs, size = [], [], 0
        with _rng_kept(device), torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                                               enabled=autocast is not None, cache_enabled=False):
            for kind, module, shape, batch, context in calls:
                key = (kind, id(module), shape, batch)
                if key in seen or (kind == "cross" and context is None):
                    continue
                seen.add(key)
                x = torch.zeros((batch, *shape), dtype=dtype, device=device)
                if kind == "conv":
                    x = x.contiguous(memory_format=memory_format)
                x.requires_grad_(True)
                y = module(x, encoder_hidden_states=context) if kind == "cross" else module(x)
                inputs.append(x)
                outputs.append(y)
                size += x.numel() * x.element_size()
                done += 1
                if size >= budget_bytes:
                    pending.append(pool.submit(_backward, inputs, outputs))
                    inputs, outputs, size = [], [], 0
            if inputs:
                pending.append(pool.submit(_backward, inputs, outputs))
    except Exception as err:  # noqa: BLE001 - planning ahead is an optimization: the capture plans what is left
        log.debug("planning ahead stopped after %d calls: %s", done, err)
    except BaseException:  # an interrupt: the backwards not started yet are dropped, not waited out
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)  # no planning work may outlast the call (a capture follows)
    for future in pending:
        if future.exception() is not None:
            log.debug("planning ahead: a backward failed: %s", future.exception())
            break
    return done


def _rng_kept(device: torch.device):
    """The default generators (the CPU's and ``device``'s) put back as they were afterwards: a UNet with dropout
    (diffusers' ``dropout=``, a LoRA's) draws in the planned calls, and the step's draws must stay those of a run
    without them."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _backward(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
    grads = [torch.zeros_like(y) for y in outputs]
    torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
