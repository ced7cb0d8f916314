"""Model patches of the fast path: frozen convolutions that keep no input for backward, residual wrappers applied
as one merged weight, diffusers' plain blocks without their no-op rescales, and ``fast_modules``, which applies
the ones a ``FastConfig`` switches on. Each patch must compute what the module it replaces computes (up to
rounding) and undo must leave the model as it found it; no training state or loop logic lives here.
"""

from __future__ import annotations

import contextlib
import types
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .fast import FastConfig


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose weight and bias need no gradient: backward needs only the weight, so the input is not kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        ctx.args = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, stride, padding, dilation, groups)
        return grad_input, None, None, None, None, None, None


def _frozen_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if (frozen and x.requires_grad and torch.is_grad_enabled() and self.padding_mode == "zeros"
            and not isinstance(self.padding, str) and not torch.is_autocast_enabled(x.device.type)):
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return type(self).forward(self, x)


def patch_frozen_convs(model: nn.Module):
    """Make every frozen ``Conv2d`` of ``model`` keep no input for backward; returns the undo function."""
    patched = []
    for module in model.modules():
        if type(module) is nn.Conv2d and "forward" not in module.__dict__:
            module.forward = types.MethodType(_frozen_conv_forward, module)
            patched.append(module)

    def undo():
        for module in patched:
            module.__dict__.pop("forward", None)
    return undo


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
    base = self.base_layer
    if delta is None:
        return base(x)
    weight = (base.weight.float() + delta.view(base.weight.shape)).to(base.weight.dtype)
    if self.is_conv:
        return base._conv_forward(x, weight, base.bias)
    return F.linear(x, weight, base.bias)


def patch_merged_lowrank(unet: nn.Module):
    """Apply each residual wrapper as one merged weight during training; returns the undo function."""
    from .residuals import wrapped_layers

    layers = [layer for layer in wrapped_layers(unet).values() if "forward" not in layer.__dict__]
    for layer in layers:
        layer.forward = types.MethodType(_merged_forward, layer)

    def undo():
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return undo


def _lean_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for the plain case, without the `/ output_scale_factor` of 1.0."""
    hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:
        hidden = hidden + temb
    hidden = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden))))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return input_tensor + hidden


class _LeanAttnProcessor:
    """AttnProcessor2_0 for plain self/cross attention, without its no-op `/ 1.0` rescale."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def patch_lean_blocks(unet: nn.Module):
    """Skip diffusers' no-op rescales in plain resnets and attention layers; returns the undo function."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    resnets = [m for m in unet.modules() if type(m) is ResnetBlock2D and "forward" not in m.__dict__
               and m.upsample is None and m.downsample is None and m.output_scale_factor == 1
               and m.time_embedding_norm == "default"]
    for module in resnets:
        module.forward = types.MethodType(_lean_resnet_forward, module)
    original = unet.attn_processors
    lean = _LeanAttnProcessor()
    plain = {}
    for key, proc in original.items():
        attn = unet.get_submodule(key.rsplit(".", 1)[0])
        simple = (type(proc) is AttnProcessor2_0 and attn.spatial_norm is None and attn.group_norm is None
                  and attn.norm_q is None and attn.norm_k is None and not attn.norm_cross
                  and not attn.residual_connection and attn.rescale_output_factor == 1 and attn.scale_qk)
        plain[key] = lean if simple else proc
    unet.set_attn_processor(plain)

    def undo():
        unet.set_attn_processor(original)
        for module in resnets:
            module.__dict__.pop("forward", None)
    return undo


def _checkpoint(module, *args):
    # the UNet draws no random numbers in training (dropout 0), so no RNG state is saved: graph-capturable
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


@contextlib.contextmanager
def fast_modules(unet: nn.Module, fast: FastConfig, gradient_checkpointing: bool = False):
    """Within the block the UNet runs the fast configuration; everything is put back on exit."""
    undo = []
    try:
        if fast.channels_last and unet.device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
            undo.append(lambda: unet.to(memory_format=torch.contiguous_format))
        if fast.frozen_conv:
            undo.append(patch_frozen_convs(unet))
        if fast.merged_lowrank:
            undo.append(patch_merged_lowrank(unet))
        if fast.lean_blocks:
            undo.append(patch_lean_blocks(unet))
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing(_checkpoint)
            undo.append(unet.disable_gradient_checkpointing)
        if fast.sdpa_backends and unet.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                     "math": "MATH"}
            backends = [getattr(SDPBackend, names[n]) for n in fast.sdpa_backends]
            try:
                context = sdpa_kernel(backends, set_priority=True)
            except TypeError:  # torch < 2.6 has no priority order: keep torch's own choice
                context = contextlib.nullcontext()
            context.__enter__()
            undo.append(lambda: context.__exit__(None, None, None))
        if fast.cudnn_benchmark:
            previous = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            undo.append(partial(setattr, torch.backends.cudnn, "benchmark", previous))
        yield
    finally:
        for fn in reversed(undo):
            fn()
