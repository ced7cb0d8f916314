"""Model patches of the fast path: frozen convolutions that keep no input for backward, residual wrappers applied
as one merged weight, diffusers' plain blocks without their no-op rescales, and ``fast_modules``, which applies the
ones a ``FastConfig`` switches on (the channels-last and kernel patches live in ``fast_nhwc``). Each patch must compute what the module it replaces computes (up to
rounding) and undo must leave the model as it found it; no training state or loop logic lives here.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .fast_nhwc import _set_forward, lean_resnet_forward, patch_channels_last, patch_fused_geglu, plain_resnets
from .kernels import triton

if TYPE_CHECKING:
    from .fast import FastConfig


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose weight and bias need no gradient: backward needs only the weight, so the input is not kept.

    Backward hands cuDNN an unfilled stand-in for the input, laid out like the input was: torch's
    ``conv2d_input`` passes a zero-stride one, whose NCHW reading makes the gradient NCHW in a channels-last
    UNet, and every NHWC op after it copies it back (measured: 3.5 ms of a 35 ms SD1.5 step on an H100).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        ctx.args = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        if not ctx.channels_last:
            grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, stride, padding, dilation, groups)
            return grad_input, None, None, None, None, None, None
        stand_in = torch.empty(ctx.input_shape, dtype=grad.dtype, device=grad.device,
                               memory_format=torch.channels_last)  # allocated, never read (no input grad mask)
        grad_input = torch.ops.aten.convolution_backward(
            grad, stand_in, weight, None, _pair(stride), _pair(padding), _pair(dilation), False, [0, 0], groups,
            (True, False, False))[0]
        return grad_input, None, None, None, None, None, None


def _frozen_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if (frozen and x.requires_grad and torch.is_grad_enabled() and self.padding_mode == "zeros"
            and not isinstance(self.padding, str) and not torch.is_autocast_enabled(x.device.type)):
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return type(self).forward(self, x)


def patch_frozen_convs(model: nn.Module):
    """Make every frozen ``Conv2d`` of ``model`` keep no input for backward; returns the undo function."""
    return _set_forward([m for m in model.modules() if type(m) is nn.Conv2d], _frozen_conv_forward)


def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
    """ResidualProjection.forward with the active sets folded into one weight (training: no masks)."""
    if self.mask_source is not None:
        return type(self).forward(self, x)
    delta = None
    for name, lowrank in self.sets.items():
        if not self.active[name] or name in self.merged or self.scales[name] == 0:
            continue
        part = lowrank.up @ lowrank.down  # (C, C) fp32
        part = part * self.scales[name] if self.scales[name] != 1 else part
        delta = part if delta is None else delta + part
    if delta is None:
        return self.base_forward(x)
    if not self.plain_projection():  # the wrapped module's own call (hooks, its own forward), the sets' sum beside it
        delta = delta.to(x.dtype).view(self.weight.shape)
        return self.base_forward(x) + (F.conv2d(x, delta) if self.is_conv else F.linear(x, delta))
    return self.base_forward(x, (self.weight.float() + delta.view(self.weight.shape)).to(self.weight.dtype))


def patch_merged_lowrank(unet: nn.Module):
    """Apply each residual wrapper as one merged weight during training; returns the undo function."""
    from .residuals import wrapped_layers

    return _set_forward(list(wrapped_layers(unet).values()), _merged_forward)


def _plain_attention(attn) -> bool:
    """Whether ``attn`` computes plain attention: no spatial or group norm, no q/k norms, no cross norm (what
    AttnProcessor2_0 then does is projections, SDPA, output projection, optional residual and rescale)."""
    return (attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
            and not attn.norm_cross)


def _attend(attn, hidden_states: torch.Tensor, context: torch.Tensor, sdpa=None):
    """AttnProcessor2_0's core on a plain attention layer and 3-D tokens: projections, ``sdpa`` (torch's when None)
    over the heads ((B, h, N, d) each), output projection; without its residual and rescale (the caller's)."""
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = (sdpa or F.scaled_dot_product_attention)(query, key, value)
    return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)))


class _LeanAttnProcessor:
    """AttnProcessor2_0 for plain self/cross attention, without its no-op `/ 1.0` rescale. A call with a mask or a
    4-D (B, C, H, W) input goes to AttnProcessor2_0 itself (the lean path attends to every token of 3-D inputs)."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.standard = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if (attention_mask is not None or kwargs.get("encoder_attention_mask") is not None
                or hidden_states.dim() != 3):
            # diffusers hands the encoder's mask in as attention_mask; AttnProcessor2_0 has no encoder_attention_mask
            # argument (an unpatched layer drops one given by name, as here)
            kwargs.pop("encoder_attention_mask", None)
            return self.standard(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return _attend(attn, hidden_states, hidden_states if encoder_hidden_states is None else encoder_hidden_states)


def patch_lean_blocks(unet: nn.Module):
    """Skip diffusers' no-op rescales in plain resnets and attention layers; returns the undo function."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    undo_resnets = _set_forward(plain_resnets(unet), lean_resnet_forward)
    original = unet.attn_processors
    lean = _LeanAttnProcessor()
    plain = {}
    for key, proc in original.items():
        attn = unet.get_submodule(key.rsplit(".", 1)[0])
        simple = (type(proc) is AttnProcessor2_0 and _plain_attention(attn) and not attn.residual_connection
                  and attn.rescale_output_factor == 1 and attn.scale_qk)
        plain[key] = lean if simple else proc
    unet.set_attn_processor(plain)

    def undo():
        unet.set_attn_processor(original)
        undo_resnets()
    return undo


def _checkpoint(module, *args):
    # the UNet draws no random numbers in training (dropout 0), so no RNG state is saved: graph-capturable
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


def patch_gradient_checkpointing(unet: nn.Module, rng_free: bool = True):
    """Checkpoint the UNet's blocks with ``_checkpoint`` (no RNG state: graph-capturable), or with ``rng_free=False``
    diffusers' own function; returns the undo, which gives each block back its own setting and function (an owner's
    ``enable_gradient_checkpointing(fn)`` stays on, with ``fn``; diffusers' own disable would turn it off and its
    enable would swap the function)."""
    blocks = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
    before = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func")) for m in blocks]
    if rng_free:
        unet.enable_gradient_checkpointing(_checkpoint)
    else:
        unet.enable_gradient_checkpointing()

    def undo():
        for module, enabled, fn in before:
            module.gradient_checkpointing = enabled
            if fn is None:
                module.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                module._gradient_checkpointing_func = fn
    return undo


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}  # FastConfig.sdpa_backends' names -> torch's SDPBackend members


def _sdpa_order(names) -> contextlib.AbstractContextManager:
    """torch's SDPA backends in this priority order (names: cudnn, flash, efficient, math) within the block."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[n]) for n in names], set_priority=True)
    except TypeError:  # torch < 2.6 has no priority order: keep torch's own choice
        return contextlib.nullcontext()


def _cudnn_device(t: torch.Tensor) -> bool:
    return t.is_cuda


def _direct_cudnn_supported() -> bool:
    """Whether this torch has the cuDNN attention call ``_cudnn_self_attention`` makes (its 9-argument op and the
    7-argument SDPAParams came with torch 2.5-2.6; older ones switch the order around the call instead)."""
    from torch.nn.attention import sdpa_kernel

    return ("set_priority" in inspect.signature(sdpa_kernel).parameters
            and hasattr(torch.backends.cuda, "can_use_cudnn_attention"))


_DIRECT_CUDNN = _direct_cudnn_supported()


def _cudnn_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """SDPA through cuDNN's kernel called directly (torch's own choice where cuDNN cannot take the call: the next
    in its order then, as with cuDNN first)."""
    if not torch.backends.cuda.can_use_cudnn_attention(torch.backends.cuda.SDPAParams(query, key, value, None, 0.0,
                                                                                      False, False)):
        return F.scaled_dot_product_attention(query, key, value)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, grad, 0.0, False, False)[0]


def _cudnn_self_attention(attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """AttnProcessor2_0's self-attention with cuDNN's SDPA kernel called directly (``_cudnn_sdpa``). Calling the
    kernel, not switching torch's process-wide backend order around each call, keeps the order the run set
    (``fast_modules``) the same for other threads until the run ends (the latents' encoding may still run in its
    thread while the loop's modules are patched, and runs beside an eager warm-up)."""
    out = _attend(attn, hidden_states, hidden_states, _cudnn_sdpa)
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor if attn.rescale_output_factor != 1 else out


class _LongQueryAttention:
    """An attention processor whose self-attention calls with at least ``min_tokens`` query tokens prefer cuDNN's
    kernel.

    cuDNN's SDPA is the fastest here for the long self-attention (SD1.5's 64x64 blocks: 1.2 vs 2.1 ms forward +
    backward on an H200) but compiles each shape at run time, in each new process; limiting it to the few longest
    shapes keeps that compile short while most of the gain stays. Cross-attention (77 keys) keeps flash: giving it
    cuDNN too cost ~0.2 s more of a fresh process's first SD1.5 recipe for no measurable gain per step
    (BENCHMARKS.md run 16). diffusers' AttnProcessor2_0 (and the lean one) on plain attention layers is computed
    here with cuDNN's kernel called directly; another processor runs under torch's order switched for the call.

    diffusers' ``Attention.forward`` hands on only the ``cross_attention_kwargs`` that
    ``inspect.signature(processor.__call__)`` names (it drops the rest, with a warning), so the wrapper shows it the
    inner processor's parameters, as if unwrapped: an instance ``__call__`` carrying the inner's signature (the
    attribute read finds it before the class's; a bound method's signature would be its class function's, the same
    for every inner). The call itself, ``processor(...)``, goes through the class's ``__call__`` as before: no cost
    per call.
    """

    def __init__(self, inner, min_tokens: int):
        self.inner, self.min_tokens = inner, min_tokens
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.direct = _DIRECT_CUDNN and type(inner) in (AttnProcessor2_0, _LeanAttnProcessor)
        self._show_inner_signature()

    def _show_inner_signature(self) -> None:
        self.__call__ = partial(type(self).__call__, self)
        try:
            self.__call__.__signature__ = inspect.signature(self.inner.__call__)
        except (TypeError, ValueError):  # none to read (diffusers' own read fails too): the wrapper's own, as before
            pass

    def __getstate__(self) -> dict:  # copies and pickles rebuild the instance __call__ for themselves: the partial
        return {k: v for k, v in self.__dict__.items() if k != "__call__"}  # is bound to this wrapper, and its
        # signature holds the inner's default values (which need not copy or pickle)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._show_inner_signature()

    def __call__(self, attn, hidden_states, *args, **kwargs):
        context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (args[0] if args else None)
        if context is None and hidden_states.dim() == 3 and hidden_states.shape[1] >= self.min_tokens:
            plain_call = (not args[1:] or all(a is None for a in args[1:])) and all(
                v is None for k, v in kwargs.items() if k != "encoder_hidden_states")
            if self.direct and plain_call and _cudnn_device(hidden_states) and _plain_attention(attn):
                return _cudnn_self_attention(attn, hidden_states)
            with _sdpa_order(("cudnn", "flash", "efficient", "math")):
                return self.inner(attn, hidden_states, *args, **kwargs)
        return self.inner(attn, hidden_states, *args, **kwargs)


def patch_long_query_attention(unet: nn.Module, min_tokens: int):
    """Wrap every attention processor of ``unet`` in ``_LongQueryAttention``; returns the undo."""
    original = unet.attn_processors
    unet.set_attn_processor({key: _LongQueryAttention(proc, min_tokens) for key, proc in original.items()})
    return lambda: unet.set_attn_processor(original)


def backend_order(fast: FastConfig) -> tuple[str, ...]:
    """The SDPA backends a run enables, in priority order: ``sdpa_backends``, with cuDNN last where the long
    self-attention prefers it (``cudnn_attention_from``) and the list leaves it out (it calls cuDNN's kernel only
    where torch has it enabled; last, it serves no other call that an earlier backend can take)."""
    names = tuple(fast.sdpa_backends)
    if fast.cudnn_attention_from and "cudnn" not in names:
        names += ("cudnn",)
    return names


def uses_channels_last(fast: FastConfig, device: torch.device) -> bool:
    """Whether ``fast_modules`` runs the UNet channels-last (asked for, on CUDA, with Triton for the norms)."""
    return fast.channels_last and device.type == "cuda" and triton is not None


@contextlib.contextmanager
def fast_modules(unet: nn.Module, fast: FastConfig, gradient_checkpointing: bool = False):
    """Within the block the UNet runs the fast configuration; everything is put back on exit."""
    undo = []
    device = unet.device  # one read: diffusers walks the UNet's modules for each
    try:
        if uses_channels_last(fast, device):
            undo.append(patch_channels_last(unet))
        if fast.fused_geglu and device.type == "cuda" and triton is not None:
            undo.append(patch_fused_geglu(unet))
        if fast.frozen_conv:
            undo.append(patch_frozen_convs(unet))
        if fast.merged_lowrank:
            undo.append(patch_merged_lowrank(unet))
        if fast.lean_blocks:
            undo.append(patch_lean_blocks(unet))
        if gradient_checkpointing:
            undo.append(patch_gradient_checkpointing(unet))
        if fast.sdpa_backends and device.type == "cuda":
            context = _sdpa_order(backend_order(fast))
            context.__enter__()
            undo.append(lambda: context.__exit__(None, None, None))
            if fast.cudnn_attention_from and fast.sdpa_backends[0] != "cudnn":
                undo.append(patch_long_query_attention(unet, fast.cudnn_attention_from))
        if fast.cudnn_benchmark:
            previous = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            undo.append(partial(setattr, torch.backends.cudnn, "benchmark", previous))
        yield
    finally:
        for fn in reversed(undo):
            fn()
