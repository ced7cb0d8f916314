"""The residual layer: ``LowRank`` factors (dW = up @ down) and ``ResidualProjection``, the wrapper around one
``proj_out`` that adds each named set's low-rank branch, optionally under a mask, and can merge a set into the base
weight. It knows one layer only: finding the projections of a UNet, adding/removing sets across it and the
``Residuals`` handle live in ``residuals``; where masks come from is LAG's business (``lag``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LowRank(nn.Module):
    """One residual set's factors: dW = up @ down, up (C, r), down (r, C)."""

    def __init__(self, channels: int, rank: int, generator: torch.Generator | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, channels, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(channels, rank, device=device, dtype=dtype))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(channels)  # kaiming_uniform(a=sqrt(5)), as nn.Linear and peft's lora_A
            if generator is None:
                self.down.uniform_(-bound, bound)
            else:
                noise = torch.rand(self.down.shape, generator=generator, dtype=torch.float32)
                self.down.copy_((noise * 2 - 1) * bound)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) as a module call, so that hooks on this module run first: accelerate's sequential CPU offload
        keeps the factors on the meta device between calls and brings them in through its hook."""
        return self.down, self.up

    def delta_weight(self) -> torch.Tensor:
        """The dense (C, C) update this set adds to the base weight."""
        return self.up @ self.down


class ResidualProjection(nn.Module):
    """A ``proj_out`` (1x1 Conv2d or Linear) with residual sets: base(x) + sum_s scale_s * mask_s * up_s(down_s(x)).

    ``ResidualProjection(proj_out, block_name)`` makes a ``ResidualConv2d`` or a ``ResidualLinear``: a subclass of
    the wrapped layer's own class that shares its weight and bias Parameters, so whatever takes a Conv2d or Linear
    still takes it (a peft/diffusers LoRA loaded afterwards wraps it and adds its own branch on top; the state dict
    keeps the layer's own keys, plus the sets'). ``original`` is the wrapped module object; ``remove_residuals``
    puts it back. It is not a submodule and deliberately not called ``base_layer``: peft unwraps every
    ``base_layer`` it finds, and would drop the residuals with a LoRA.
    ``mask_source`` (set by LAG) returns, for a set name, a (B, N) mask over the block's positions, a bool
    (rows, N) one, a mask laid out like the set's middle (``layout_mask``), or None.
    """

    is_conv: bool
    plain: type  # the layer class a subclass wraps

    def __new__(cls, base_layer: nn.Module = None, block_name: str = "", *args, **kwargs):
        if base_layer is not None and not isinstance(base_layer, nn.Module) and cls is not ResidualProjection:
            # a layer's own arguments, as peft passes them to type(layer) for its LoRA factors: the plain layer
            return cls.plain(base_layer, block_name, *args, **kwargs)
        if cls is ResidualProjection:  # the factory: the subclass that matches the wrapped layer
            if isinstance(base_layer, ResidualProjection):
                raise TypeError(f"{block_name}.proj_out already holds residual sets; add a set to it instead")
            if isinstance(base_layer, nn.Conv2d):
                cls = ResidualConv2d
            elif isinstance(base_layer, nn.Linear):
                cls = ResidualLinear
            else:
                kind = f"{type(base_layer).__module__}.{type(base_layer).__qualname__}"  # peft's lora.Conv2d is no Conv2d
                raise TypeError(f"{block_name}.proj_out is a {kind}; expected a torch.nn.Conv2d or torch.nn.Linear")
        return super().__new__(cls)

    def __init__(self, base_layer: nn.Module, block_name: str):
        nn.Module.__init__(self)  # not Conv2d/Linear.__init__: the weight and bias are the wrapped layer's own
        if self.is_conv:
            if base_layer.kernel_size != (1, 1) or base_layer.groups != 1:
                raise TypeError(f"{block_name}.proj_out is a {base_layer.kernel_size} conv; only 1x1 is supported")
            channels_in, channels_out = base_layer.in_channels, base_layer.out_channels
            names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")
        else:
            channels_in, channels_out = base_layer.in_features, base_layer.out_features
            names = ("in_features", "out_features")
        if channels_in != channels_out:
            raise TypeError(f"{block_name}.proj_out maps {channels_in}->{channels_out}; expected a square projection")
        if torch.nn.utils.parametrize.is_parametrized(base_layer):
            raise TypeError(f"{block_name}.proj_out has parametrizations (torch.nn.utils.parametrize); remove them "
                            "first (parametrize.remove_parametrizations(layer, 'weight')), then add the residuals")
        for attr in names:
            setattr(self, attr, getattr(base_layer, attr))
        # the same Parameter objects: merging writes the wrapped layer's weight
        self.register_parameter("weight", base_layer.weight)
        self.register_parameter("bias", base_layer.bias)
        self.train(base_layer.training)
        self.__dict__["original"] = base_layer  # not registered: its parameters are already ours
        self.block_name = block_name
        self.channels = channels_in
        self.sets = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.active: dict[str, bool] = {}
        self.merged: dict[str, float] = {}  # name -> the scale it was merged at, while merged
        # the base weight before the first merge; a non-persistent buffer, so .to()/.cpu() move it with the model
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.register_buffer("_written_weight", None, persistent=False)  # the weight as the last merge wrote it
        self._merged_from: tuple = ()  # the merged factors' storage and version counters at the last write
        self.mask_source: Callable[[str], torch.Tensor | None] | None = None

    def unwrapped(self) -> nn.Module:
        """The wrapped module object, holding this layer's current weight and bias Parameters (a dtype or device
        conversion that made new ones reached only this layer)."""
        return self._synced().train(self.training)

    def _synced(self) -> nn.Module:
        original = self.__dict__["original"]
        if original.weight is not self.weight or original.bias is not self.bias:
            original.register_parameter("weight", self.weight)
            original.register_parameter("bias", self.bias)
        return original

    def plain_projection(self) -> bool:
        """Whether the wrapped module is a bare Conv2d/Linear (no hooks, no forward of its own), so that a weight
        with the sets folded in (``base_forward(x, weight)``) computes exactly what its own call would."""
        original = self.__dict__["original"]
        return (type(original) is self.plain and not original._forward_hooks and not original._forward_pre_hooks
                and "forward" not in original.__dict__ and "_diffusers_hook" not in original.__dict__)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The projection without the sets: the wrapped module itself, so its own forward and hooks run (a quantized
        Linear, diffusers' layerwise casting); with ``weight``, a plain conv/linear with that weight instead."""
        if weight is None:
            return self._synced()(x)
        if self.is_conv:
            return self._conv_forward(x, weight, self.bias)
        return F.linear(x, weight, self.bias)

    def _set_dtype(self) -> torch.dtype:
        """The dtype of new sets and of laid-out masks: the weight's, but fp32 where it is stored in a 1-byte dtype
        (diffusers' layerwise casting keeps it in float8 between calls)."""
        dtype = self.weight.dtype
        return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32

    def add_set(self, name: str, rank: int, generator: torch.Generator | None = None) -> LowRank:
        self.sets[name] = LowRank(self.channels, rank, generator, device=self._set_device(), dtype=self._set_dtype())
        self.scales[name] = 1.0
        self.active[name] = True
        return self.sets[name]

    def _set_device(self) -> torch.device:
        """Where new sets live: the weight's device, or, where accelerate's sequential CPU offload keeps the weight on
        the meta device between calls, the device its hook computes on (a set added then has no hook of its own)."""
        if self.weight.device.type != "meta":
            return self.weight.device
        for module in (self, self.__dict__["original"]):
            device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if device is not None:
                return torch.device(device)
        return torch.device("cpu")

    def remove_set(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        del self.sets[name]
        self.scales.pop(name)
        self.active.pop(name)

    def layout_mask(self, mask: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        """A (rows, N) mask laid out like set ``name``'s rank-r middle for a batch of ``batch`` (the rows repeat
        per group of ``rows``, as the conditional mask serves both CFG halves): (B, r, N) for conv projections,
        (B, N, r) for linear ones, in the layer's dtype. The middle times it is one contiguous elementwise kernel
        (a broadcast bool mask takes a strided one, measured ~3x slower on an H100)."""
        rows, tokens = mask.shape
        rank = self.sets[name].rank
        full = mask.to(self._set_dtype()).repeat(batch // rows, 1)  # (B, N)
        if self.is_conv:
            return full[:, None, :].expand(batch, rank, tokens).contiguous()
        return full[:, :, None].expand(batch, tokens, rank).contiguous()

    def _branch(self, x: torch.Tensor, lowrank: LowRank, mask: torch.Tensor | None = None) -> torch.Tensor:
        """up(mask * down(x)); mask: None, bool (rows, N), or laid out like the middle (``layout_mask``)."""
        down, up = (factor.to(x.device, x.dtype) for factor in lowrank())
        if self.is_conv:  # x: (B, C, H, W)
            middle = F.conv2d(x, down[:, :, None, None])  # (B, r, H, W)
            if mask is not None:
                middle = middle * mask.to(middle.dtype).view(middle.shape) if mask.dim() == 3 else \
                    _mask_rows(middle, mask, True)
            return F.conv2d(middle, up[:, :, None, None])
        middle = F.linear(x, down)  # (B, N, r); x: (B, N, C)
        if mask is not None:
            middle = middle * mask.to(middle.dtype) if mask.dim() == 3 else _mask_rows(middle, mask, False)
        return F.linear(middle, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a merged set whose factors changed, or that was disabled or enabled, since it was written is written again
        # (not under torch.compile, which cannot trace data_ptr(): a compiled model keeps the weights merged before)
        if self.merged and not torch.compiler.is_compiling() and self._factor_versions() != self._merged_from:
            with torch.no_grad():
                self._write_merged()
        out = self.base_forward(x)
        for name, lowrank in self.sets.items():
            if not self.active[name] or name in self.merged or self.scales[name] == 0:
                continue
            if lowrank.down.dtype.itemsize == 1 or "_diffusers_hook" in self.__dict__:
                self._check_storage(name, lowrank)
            mask = self.mask_source(name) if self.mask_source is not None else None  # see the class docstring
            # LAG's fused CUDA path hands a bool (rows, N) mask or one laid out like the middle (3-D): applied to
            # the rank-r middle, r/C the size of delta (a per-pixel mask commutes with the 1x1 up-projection)
            fused = mask is not None and (mask.dtype == torch.bool or mask.dim() == 3)
            delta = self._branch(x, lowrank, mask if fused else None)
            if mask is not None and not fused:
                mask = mask.to(delta.dtype)
                delta = delta * (mask.view(x.shape[0], 1, *x.shape[2:]) if self.is_conv else mask.unsqueeze(-1))
            out = out + self.scales[name] * delta if self.scales[name] != 1 else out + delta
        return out

    def _check_storage(self, name: str, lowrank: LowRank) -> None:
        """Refuse factors kept in a 1-byte dtype: diffusers' layerwise casting, which stores a Conv2d/Linear and all
        it holds in float8 between calls, took this layer, so the sets' values are already rounded."""
        hooks = self.__dict__.get("_diffusers_hook")
        if lowrank.down.dtype.itemsize == 1 or (hooks is not None and hooks.get_hook("layerwise_casting")):
            raise RuntimeError(
                f"residual set {name!r} of {self.block_name} is stored in float8 by diffusers' enable_layerwise_casting, "
                "which rounded its values. Load the residuals again after enabling layerwise casting with "
                "skip_modules_classes=(prkit.residual_layer.ResidualProjection,), or enable it before adding or "
                "loading residuals (the proj_out weights are cast then, the residual sets are not)")

    @torch.no_grad()
    def set_active(self, name: str, active: bool) -> None:
        """Switch set ``name`` on or off; a merged one is written into or out of the weight now (a forward would)."""
        self.active[name] = active
        if name in self.merged and self.weight.device.type != "meta":
            self._write_merged()

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold the set into the base weight (no masks apply to a merged set)."""
        if name in self.merged:
            return
        self._check_weight_here("merge", name)
        if self._unmerged_weight is None:
            self._unmerged_weight = self.weight.detach().clone()
        self.merged[name] = self.scales[name]
        self._write_merged()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Take the set out of the base weight; once no set is merged the base weight is bit-exact again."""
        if name not in self.merged:
            return
        self._check_weight_here("unmerge")
        del self.merged[name]
        self._write_merged()

    def _check_weight_here(self, what: str, name: str = "") -> None:
        if what == "merge" and not self.weight.dtype.is_floating_point:
            raise RuntimeError(
                f"cannot merge residual set {name!r} into {self.block_name}.proj_out: its weight is stored as "
                f"{self.weight.dtype} (a quantized layer, which dequantizes in its own forward), so a merged delta "
                "would be rounded into it and the layer would compute something else. Sample the set unmerged (it "
                "applies as it is), or merge into a model loaded without quantization")
        if self.weight.device.type == "meta":
            raise RuntimeError(
                f"cannot {what} residual sets on {self.block_name}: its weight is offloaded (accelerate's sequential "
                "CPU offload keeps it on the meta device between calls), so the write would be lost. Sample the sets "
                f"unmerged (generate applies them as they are), or {what} before enabling offloading")

    def _write_merged(self) -> None:
        """base weight = the unmerged weight + every merged set's delta, summed in fp32 (float64 for a float64
        weight) and rounded once: merging and unmerging several sets in any order never drifts from what a fresh
        merge gives. A disabled set is left out (as peft does), until it is enabled again."""
        weight, original = self.weight, self._unmerged_weight
        written = self._written_weight
        acc = torch.promote_types(weight.dtype, torch.float32)  # never below the weight's own precision
        if written is not None and not torch.equal(weight, written.to(weight.device)):
            # changed by someone else since the last write (peft's fuse_lora / unfuse_lora on a LoRA above): keep that
            original = (original.to(weight.device, acc) + weight.to(acc) - written.to(weight.device, acc)
                        ).to(weight.dtype)
            self._unmerged_weight = original
        self._merged_from = self._factor_versions()
        if not self.merged:
            weight.copy_(original)
            self._unmerged_weight = self._written_weight = None
            return
        total = original.to(weight.device, acc)  # the model may have moved since the first merge
        for name, scale in ((n, s) for n, s in self.merged.items() if self.active[n]):
            total = total + scale * self.sets[name].delta_weight().to(acc).view(weight.shape)
        weight.copy_(total.to(weight.dtype))
        self._written_weight = weight.detach().clone()

    def _factor_versions(self) -> tuple:
        """What tells whether a merged set's factors changed: their storage and in-place version counters, and
        whether the set is enabled."""
        factors = [p for name in self.merged for p in (self.sets[name].down, self.sets[name].up)]
        if any(p.device.type == "meta" for p in factors):  # offloaded between calls (accelerate): the merged weight
            return self._merged_from                        # it keeps was written before, and training refuses it
        return tuple((name, self.active[name], p.data_ptr(), p._version) for name in self.merged
                     for p in (self.sets[name].down, self.sets[name].up))


class ResidualConv2d(ResidualProjection, nn.Conv2d):
    """A 1x1 ``Conv2d`` proj_out with residual sets (SD1.x); see ``ResidualProjection``."""

    is_conv, plain = True, nn.Conv2d


class ResidualLinear(ResidualProjection, nn.Linear):
    """A ``Linear`` proj_out with residual sets (SD2.x, SDXL); see ``ResidualProjection``."""

    is_conv, plain = False, nn.Linear


def _mask_rows(middle: torch.Tensor, mask: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """middle * mask for a bool mask (rows, N); fewer rows than the batch (CFG's conditional rows) serve each group.

    middle: (B, r, H, W) for conv projections, (B, N, r) for linear ones.
    """
    rows, batch = mask.shape[0], middle.shape[0]
    tail = (1, *middle.shape[2:]) if is_conv else (middle.shape[1], 1)
    grouped = middle.view(batch // rows, rows, *middle.shape[1:]) * mask.view(1, rows, *tail)
    return grouped.reshape(middle.shape)
