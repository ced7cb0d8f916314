"""Patches that run a diffusers UNet channels-last with prkit's Triton kernels: GroupNorm (+ SiLU) in NHWC, the
feed-forwards' GEGLU in one kernel each way, transformer outputs left in NHWC, and up blocks whose skip
concatenation hands out dense gradients. Each patch computes what the module it replaces computes (up to rounding)
and its undo leaves the model as it found it; ``fast_patches.fast_modules`` applies them.
"""

from __future__ import annotations

import types
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import group_norm_nhwc as nhwc
from .kernels.geglu import geglu


def _set_forward(modules: list, forward):
    """Give each module (none patched yet) this bound forward; returns the undo."""
    modules = [m for m in modules if "forward" not in m.__dict__]
    for module in modules:
        module.forward = types.MethodType(forward, module)

    def undo():
        for module in modules:
            module.__dict__.pop("forward", None)
    return undo


def plain_resnets(unet: nn.Module) -> list:
    """diffusers' ResnetBlock2Ds of the plain kind (no up/down sampling, no output rescale, default time norm)."""
    from diffusers.models.resnet import ResnetBlock2D

    return [m for m in unet.modules() if type(m) is ResnetBlock2D and "forward" not in m.__dict__
            and m.upsample is None and m.downsample is None and m.output_scale_factor == 1
            and m.time_embedding_norm == "default"]


def _norm_act(norm: nn.Module, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """act(norm(x)), as one NHWC kernel where the norm is a frozen GroupNorm, the activation SiLU and x NHWC."""
    if (type(norm) is nn.GroupNorm and type(act) is nn.SiLU
            and nhwc.usable(x, norm.num_groups, norm.weight, norm.bias)):
        return nhwc.group_norm_nhwc(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True)
    return act(norm(x))


def _nhwc_group_norm_forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    if nhwc.usable(x, self.num_groups, self.weight, self.bias):
        return nhwc.group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps)
    return nn.GroupNorm.forward(self, x)


def _nhwc_norm_silu_forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """The UNet's conv_norm_out with its conv_act (SiLU) folded in (conv_act is an Identity meanwhile)."""
    if nhwc.usable(x, self.num_groups, self.weight, self.bias):
        return nhwc.group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps, silu=True)
    return F.silu(nn.GroupNorm.forward(self, x))


def lean_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for the plain case, without the `/ output_scale_factor` of 1.0, and each
    GroupNorm + SiLU as one NHWC kernel where ``_norm_act`` can (torch's two ops elsewhere)."""
    hidden = self.conv1(_norm_act(self.norm1, input_tensor, self.nonlinearity))
    if self.time_emb_proj is not None:
        if temb is None:  # diffusers' forward would fail at the projection too
            raise ValueError("this resnet adds a time embedding: call it with temb")
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:
        hidden = hidden + temb
    hidden = self.conv2(self.dropout(_norm_act(self.norm2, hidden, self.nonlinearity)))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return input_tensor + hidden


def _frozen(*modules) -> bool:
    """Plain frozen Conv2d/Linear layers with a bias kept in 16 or 32 bits: no hooks (diffusers' layerwise casting
    keeps weights in float8 between calls; the sum of two biases rounded there would not be the same sum)."""
    return all(type(m) in (nn.Conv2d, nn.Linear) and m.bias is not None and m.bias.dtype.itemsize >= 2
               and not any(p.requires_grad for p in m.parameters()) and not m._forward_hooks
               and not m._forward_pre_hooks and "_diffusers_hook" not in m.__dict__ for m in modules)


def fold_resnet_biases(resnets: list):
    """Move each frozen resnet's conv1 bias into its time projection's bias and its conv2 bias into its shortcut
    convolution's: the same sums (conv1(x) + b1 + temb = conv1'(x) + temb'), without the passes cuDNN's
    convolutions spend adding their biases afterwards (~36 of SD1.5's 73 per step). Returns the undo, which puts
    the very bias tensors back. Only for resnets that always add the time embedding (``lean_resnet_forward``)."""
    saved = []

    def undo():
        for module, bias in reversed(saved):
            module.bias = bias
        saved.clear()

    def move(source: nn.Module, target: nn.Module):
        saved.append((source, source.bias))
        saved.append((target, target.bias))
        total = (target.bias.float() + source.bias.float()).to(target.bias.dtype)
        target.bias = nn.Parameter(total, requires_grad=False)
        source.bias = None

    try:
        for resnet in resnets:
            if resnet.time_emb_proj is not None and _frozen(resnet.conv1, resnet.time_emb_proj):
                move(resnet.conv1, resnet.time_emb_proj)
            if resnet.conv_shortcut is not None and _frozen(resnet.conv2, resnet.conv_shortcut):
                move(resnet.conv2, resnet.conv_shortcut)
    except BaseException:
        undo()
        raise
    return undo


def _nhwc_transformer_output(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """Transformer2DModel's output without its `.contiguous()`: the tokens (B, H*W, C) already are the NHWC
    layout, so a conv proj_out reads them in place and a linear one's output is NHWC as it stands (diffusers
    copies both to NCHW)."""
    if self.use_linear_projection:
        hidden_states = self.proj_out(hidden_states)
        return hidden_states.reshape(batch_size, height, width, -1).permute(0, 3, 1, 2) + residual
    hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return self.proj_out(hidden_states) + residual


def _fused_geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return geglu(self.proj(hidden_states))


def patch_fused_geglu(unet: nn.Module):
    """diffusers' GEGLU feed-forward activations as one kernel each way (``kernels.geglu``); returns the undo."""
    from diffusers.models.activations import GEGLU

    return _set_forward([m for m in unet.modules() if type(m) is GEGLU], _fused_geglu_forward)


class _CatChannels(torch.autograd.Function):
    """``torch.cat([a, b], dim=1)`` whose backward hands each input a dense gradient. torch's hands out channel
    slices of the output's gradient, and every convolution and norm they reach copies the slice again (measured:
    ~60 layout copies, 3.6 ms of an SD1.5 step on an H100); here each slice is copied once."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.split = a.shape[1]
        return torch.cat([a, b], dim=1)

    @staticmethod
    def backward(ctx, grad):
        fmt = torch.channels_last if grad.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return grad[:, :ctx.split].contiguous(memory_format=fmt), grad[:, ctx.split:].contiguous(memory_format=fmt)


def _lean_up_block_forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                           cross_attention_kwargs=None, upsample_size=None, attention_mask=None,
                           encoder_attention_mask=None, *args, **kwargs):
    """diffusers' CrossAttnUpBlock2D / UpBlock2D forward with ``_CatChannels`` for the skip connections (the
    original runs where FreeU or gradient checkpointing is on)."""
    freeu = all(getattr(self, k, None) for k in ("s1", "s2", "b1", "b2"))
    if freeu or (torch.is_grad_enabled() and self.gradient_checkpointing):
        original = type(self).forward
        if hasattr(self, "attentions"):
            return original(self, hidden_states, res_hidden_states_tuple, temb, encoder_hidden_states,
                            cross_attention_kwargs, upsample_size, attention_mask, encoder_attention_mask)
        return original(self, hidden_states, res_hidden_states_tuple, temb, upsample_size)
    attentions = getattr(self, "attentions", None) or [None] * len(self.resnets)
    for resnet, attn in zip(self.resnets, attentions):
        hidden_states = _CatChannels.apply(hidden_states, res_hidden_states_tuple[-1])
        res_hidden_states_tuple = res_hidden_states_tuple[:-1]
        hidden_states = resnet(hidden_states, temb)
        if attn is not None:
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                 encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
    for upsampler in self.upsamplers or []:
        hidden_states = upsampler(hidden_states, upsample_size)
    return hidden_states


def _up_blocks(unet: nn.Module) -> list:
    from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D

    return [m for m in unet.modules() if type(m) in (CrossAttnUpBlock2D, UpBlock2D) and "forward" not in m.__dict__]


def patch_channels_last(unet: nn.Module):
    """NHWC activations end to end: weights in channels-last, GroupNorms (fused with the SiLU after them) as NHWC
    kernels, transformer outputs kept NHWC, skip connections concatenated with dense gradients. Without Triton only
    the memory format changes. Returns the undo."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    spatial = next((p for p in unet.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)
    before = torch.channels_last if spatial is not None and not spatial.is_contiguous() \
        and spatial.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    undo = [lambda: unet.to(memory_format=before)]  # as the caller had it (diffusers' tip: channels-last)

    def undo_all():
        for fn in reversed(undo):
            fn()
    try:  # a failure part-way (a weight that cannot change format, a patch that raises) leaves the UNet as it was
        unet.to(memory_format=torch.channels_last)
        if nhwc.triton is not None:  # without it only the memory format changes (slower: torch's norms convert back)
            resnets = [m for m in plain_resnets(unet) if type(m.nonlinearity) is nn.SiLU]
            undo.append(_set_forward(resnets, lean_resnet_forward))
            undo.append(fold_resnet_biases(resnets))
            undo.append(_set_forward(_up_blocks(unet), _lean_up_block_forward))
            act = getattr(unet, "conv_act", None)
            if type(act) is nn.SiLU and type(getattr(unet, "conv_norm_out", None)) is nn.GroupNorm:
                undo.append(_set_forward([unet.conv_norm_out], _nhwc_norm_silu_forward))
                unet.conv_act = nn.Identity()
                undo.append(partial(setattr, unet, "conv_act", act))
            undo.append(_set_forward([m for m in unet.modules() if type(m) is nn.GroupNorm],
                                     _nhwc_group_norm_forward))
            blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel) and m.is_input_continuous
                      and "_get_output_for_continuous_inputs" not in m.__dict__]
            undo.append(lambda: [m.__dict__.pop("_get_output_for_continuous_inputs", None) for m in blocks])
            for module in blocks:
                module._get_output_for_continuous_inputs = types.MethodType(_nhwc_transformer_output, module)
    except BaseException:
        undo_all()
        raise
    return undo_all
