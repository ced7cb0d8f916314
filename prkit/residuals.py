"""Personalized residuals: a low-rank side branch on every transformer block's ``proj_out``.

Owns the wrapper layer, adding/removing it, enabling/disabling, merging, scales and several named
residual sets on one UNet. It does not know about attention maps (``lag.py`` sets masks) or files
(``files.py``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_NAME = "default"


@dataclass
class ResidualConfig:
    """How residuals are shaped."""

    rank: float | int | dict[str, int] = 0.05  # fraction of channels (float < 1), fixed int, or block -> rank
    init: str = "kaiming"  # the random factor's init; the other factor starts at zero
    seed: int | None = None  # seeds the random factor (None: torch's global generator)


def rank_for(channels: int, rank: float | int) -> int:
    """Resolve a rank rule to an integer rank for a layer of ``channels`` channels."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank <= 0:
        raise ValueError(f"rank must be a positive fraction (e.g. 0.05) or an int, got {rank!r}")
    if isinstance(rank, float) and rank < 1:
        return max(1, int(round(rank * channels)))
    return min(int(rank), channels)


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

    def delta_weight(self) -> torch.Tensor:
        """The dense (C, C) update this set adds to the base weight."""
        return self.up @ self.down


class ResidualProjection(nn.Module):
    """Wraps a ``proj_out`` (1x1 Conv2d or Linear): base(x) + sum_s scale_s * mask_s * up_s(down_s(x)).

    ``base_layer`` is the original module object; ``remove_residuals`` puts it back.
    ``mask_source`` (set by LAG) returns, for a set name, a (B, N) mask over the block's positions, a bool
    (rows, N) one, a mask laid out like the set's middle (``layout_mask``), or None.
    """

    def __init__(self, base_layer: nn.Module, block_name: str):
        super().__init__()
        if isinstance(base_layer, nn.Conv2d):
            if base_layer.kernel_size != (1, 1) or base_layer.groups != 1:
                raise TypeError(f"{block_name}.proj_out is a {base_layer.kernel_size} conv; only 1x1 is supported")
            self.is_conv = True
            channels_in, channels_out = base_layer.in_channels, base_layer.out_channels
        elif isinstance(base_layer, nn.Linear):
            self.is_conv = False
            channels_in, channels_out = base_layer.in_features, base_layer.out_features
        else:
            raise TypeError(f"{block_name}.proj_out is {type(base_layer).__name__}; expected Conv2d or Linear")
        if channels_in != channels_out:
            raise TypeError(f"{block_name}.proj_out maps {channels_in}->{channels_out}; expected a square projection")
        self.base_layer = base_layer
        self.block_name = block_name
        self.channels = channels_in
        self.sets = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.active: dict[str, bool] = {}
        self.merged: dict[str, torch.Tensor] = {}  # name -> original base weight, while merged
        self.mask_source: Callable[[str], torch.Tensor | None] | None = None

    def add_set(self, name: str, rank: int, generator: torch.Generator | None = None) -> LowRank:
        weight = self.base_layer.weight
        self.sets[name] = LowRank(self.channels, rank, generator, device=weight.device, dtype=weight.dtype)
        self.scales[name] = 1.0
        self.active[name] = True
        return self.sets[name]

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
        full = mask.to(self.base_layer.weight.dtype).repeat(batch // rows, 1)  # (B, N)
        if self.is_conv:
            return full[:, None, :].expand(batch, rank, tokens).contiguous()
        return full[:, :, None].expand(batch, tokens, rank).contiguous()

    def _branch(self, x: torch.Tensor, lowrank: LowRank, mask: torch.Tensor | None = None) -> torch.Tensor:
        """up(mask * down(x)); mask: None, bool (rows, N), or laid out like the middle (``layout_mask``)."""
        down, up = lowrank.down.to(x.dtype), lowrank.up.to(x.dtype)
        if self.is_conv:  # x: (B, C, H, W)
            middle = F.conv2d(x, down[:, :, None, None])  # (B, r, H, W)
            if mask is not None:
                middle = middle * mask.view(middle.shape) if mask.dim() == 3 else _mask_rows(middle, mask, True)
            return F.conv2d(middle, up[:, :, None, None])
        middle = F.linear(x, down)  # (B, N, r); x: (B, N, C)
        if mask is not None:
            middle = middle * mask if mask.dim() == 3 else _mask_rows(middle, mask, False)
        return F.linear(middle, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name, lowrank in self.sets.items():
            if not self.active[name] or name in self.merged or self.scales[name] == 0:
                continue
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

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold the set into the base weight (no masks apply to a merged set)."""
        if name in self.merged:
            return
        weight = self.base_layer.weight
        self.merged[name] = weight.detach().clone()
        delta = self.scales[name] * self.sets[name].delta_weight().to(torch.float32)
        weight.copy_((weight.to(torch.float32) + delta.view(weight.shape)).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Restore the exact base weight saved by ``merge``."""
        original = self.merged.pop(name, None)
        if original is not None:
            self.base_layer.weight.copy_(original)


def _mask_rows(middle: torch.Tensor, mask: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """middle * mask for a bool mask (rows, N); fewer rows than the batch (CFG's conditional rows) serve each group.

    middle: (B, r, H, W) for conv projections, (B, N, r) for linear ones.
    """
    rows, batch = mask.shape[0], middle.shape[0]
    tail = (1, *middle.shape[2:]) if is_conv else (middle.shape[1], 1)
    grouped = middle.view(batch // rows, rows, *middle.shape[1:]) * mask.view(1, rows, *tail)
    return grouped.reshape(middle.shape)


def find_projections(unet: nn.Module) -> dict[str, nn.Module]:
    """Map block name -> its ``proj_out`` module, for every Transformer2DModel in ``unet``.

    Returns:
        ``{"down_blocks.0.attentions.0": proj_out, ...}`` in module order (wrapped or not).
    """
    found = {}
    for name, module in unet.named_modules():
        proj = getattr(module, "proj_out", None)
        if proj is not None and hasattr(module, "transformer_blocks") and hasattr(module, "proj_in"):
            found[name] = proj
    return found


def wrapped_layers(unet: nn.Module) -> dict[str, ResidualProjection]:
    """Block name -> ResidualProjection for the blocks that are currently wrapped."""
    return {k: v for k, v in find_projections(unet).items() if isinstance(v, ResidualProjection)}


class Residuals:
    """A handle on one named residual set living inside a UNet.

    Attributes:
        name: the set's name (several sets may live on one UNet).
        token, class_word: the concept words (used by LAG and saved in files).
        meta: free-form metadata saved with the file (base model, training config, ...).
    """

    def __init__(self, unet: nn.Module, name: str, token: str | None = None, class_word: str | None = None):
        self.unet = unet
        self.name = name
        self.token = token
        self.class_word = class_word
        self.meta: dict = {}

    def layers(self) -> dict[str, ResidualProjection]:
        """Block name -> wrapper holding this set."""
        layers = {k: v for k, v in wrapped_layers(self.unet).items() if self.name in v.sets}
        if not layers:
            raise RuntimeError(f"residual set {self.name!r} is no longer on this UNet (was it removed?)")
        return layers

    def factors(self) -> dict[str, LowRank]:
        return {k: v.sets[self.name] for k, v in self.layers().items()}

    def parameters(self) -> Iterator[nn.Parameter]:
        for lowrank in self.factors().values():
            yield from lowrank.parameters()

    def num_parameters(self) -> int:
        """Number of trainable residual parameters in this set."""
        return sum(p.numel() for p in self.parameters())

    def ranks(self) -> dict[str, int]:
        return {k: v.rank for k, v in self.factors().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<block>.down": (r, C), "<block>.up": (C, r)}`` detached tensors."""
        out = {}
        for block, lowrank in self.factors().items():
            out[f"{block}.down"] = lowrank.down.detach()
            out[f"{block}.up"] = lowrank.up.detach()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for block, lowrank in self.factors().items():
            for part in ("down", "up"):
                src = state[f"{block}.{part}"]
                dst = getattr(lowrank, part)
                if src.shape != dst.shape:
                    raise ValueError(f"{block}.{part}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))

    @property
    def scale(self) -> float:
        return next(iter(self.layers().values())).scales[self.name]

    @scale.setter
    def scale(self, value: float) -> None:
        for layer in self.layers().values():
            if self.name in layer.merged:
                raise RuntimeError(f"unmerge residual set {self.name!r} before changing its scale")
            layer.scales[self.name] = float(value)

    def enable(self) -> None:
        for layer in self.layers().values():
            layer.active[self.name] = True

    def disable(self) -> None:
        for layer in self.layers().values():
            layer.active[self.name] = False

    @property
    def enabled(self) -> bool:
        return all(layer.active[self.name] for layer in self.layers().values())

    def merge(self) -> None:
        """Fold the set into the base weights (fast sampling without LAG); ``unmerge`` restores them."""
        for layer in self.layers().values():
            layer.merge(self.name)

    def unmerge(self) -> None:
        for layer in self.layers().values():
            layer.unmerge(self.name)

    @property
    def merged(self) -> bool:
        return any(self.name in layer.merged for layer in self.layers().values())

    def remove(self) -> None:
        """Take this set off the UNet (``remove_residuals(unet, name)``), as every training target's handle can."""
        remove_residuals(self.unet, self.name)

    def save(self, path, **metadata):
        """Write this set to a ``.safetensors`` file with metadata (see ``prkit.files``); returns the path."""
        from .files import save_residuals

        return save_residuals(self, path, **metadata)

    def __repr__(self) -> str:
        try:
            count = f"{self.num_parameters():,} parameters in {len(self.layers())} layers"
        except RuntimeError:
            count = "removed"
        return f"Residuals(name={self.name!r}, token={self.token!r}, class_word={self.class_word!r}, {count})"


def add_residuals(unet: nn.Module, rank: float | int | dict[str, int] = 0.05, name: str = DEFAULT_NAME, *,
                  token: str | None = None, class_word: str | None = None, seed: int | None = None,
                  config: ResidualConfig | None = None) -> Residuals:
    """Wrap every transformer block's ``proj_out`` and add a residual set named ``name``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any SD1.x / SD2.x / SDXL layout).
        rank: fraction of channels (default 0.05: r = round(0.05 * C)), a fixed int rank, or block -> rank.
        name: set name; several sets can live on one UNet (multi-concept).
        token, class_word: the concept's words (LAG finds them in prompts).
        seed: seeds the random factor so the same call gives the same init.
    Returns:
        a ``Residuals`` handle. The UNet's output is unchanged until the set is trained.
    """
    config = config or ResidualConfig(rank=rank, seed=seed)
    projections = find_projections(unet)
    if not projections:
        raise ValueError("this model has no transformer blocks with a proj_out; is it a UNet2DConditionModel?")
    if any(name in p.sets for p in projections.values() if isinstance(p, ResidualProjection)):
        raise ValueError(f"a residual set named {name!r} is already on this UNet; pick another name or remove it")
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    try:
        for block, proj in projections.items():
            if not isinstance(proj, ResidualProjection):
                proj = ResidualProjection(proj, block)
                parent = unet.get_submodule(block)
                parent.proj_out = proj
            if isinstance(config.rank, dict):
                if block not in config.rank:
                    raise ValueError(f"no rank given for block {block!r}")
                layer_rank = int(config.rank[block])
            else:
                layer_rank = rank_for(proj.channels, config.rank)
            proj.add_set(name, layer_rank, generator)
    except Exception:  # a failed add leaves the UNet as it was
        for block, layer in wrapped_layers(unet).items():
            if name in layer.sets:
                layer.remove_set(name)
            if not layer.sets:
                unet.get_submodule(block).proj_out = layer.base_layer
        raise
    residuals = Residuals(unet, name, token, class_word)
    residuals.meta["rank_rule"] = config.rank if not isinstance(config.rank, dict) else "per-layer"
    return residuals


def remove_residuals(unet: nn.Module, name: str | None = None) -> None:
    """Remove the set ``name`` (all sets when None); a wrapper left with no set is replaced by its base layer.

    The base layers put back are the very module objects that were wrapped.
    """
    layers = wrapped_layers(unet)
    if name is not None and not any(name in layer.sets for layer in layers.values()):
        raise KeyError(f"no residual set named {name!r} on this UNet; present: {residual_names(unet)}")
    for block, layer in layers.items():
        for set_name in list(layer.sets):
            if name is None or set_name == name:
                layer.remove_set(set_name)
        if not layer.sets:
            unet.get_submodule(block).proj_out = layer.base_layer


def residual_names(unet: nn.Module) -> list[str]:
    """Names of the residual sets on ``unet``."""
    names: list[str] = []
    for layer in wrapped_layers(unet).values():
        names.extend(n for n in layer.sets if n not in names)
    return names


def get_residuals(unet: nn.Module, name: str = DEFAULT_NAME) -> Residuals:
    """A handle on an existing set (token/class_word unknown unless loaded from a file)."""
    if name not in residual_names(unet):
        raise KeyError(f"no residual set named {name!r} on this UNet; present: {residual_names(unet)}")
    return Residuals(unet, name)


@contextlib.contextmanager
def residuals_disabled(unet: nn.Module, name: str | None = None):
    """Within the block, the set ``name`` (all sets when None) is switched off: the base model runs."""
    layers = wrapped_layers(unet)
    saved = {(b, n): l.active[n] for b, l in layers.items() for n in l.sets if name is None or n == name}
    try:
        for (block, set_name) in saved:
            layers[block].active[set_name] = False
        yield
    finally:
        for (block, set_name), was in saved.items():
            if set_name in layers[block].active:
                layers[block].active[set_name] = was


@contextlib.contextmanager
def only_residuals(unet: nn.Module, names: list[str] | None):
    """Within the block, exactly the sets in ``names`` are active (None or []: none, the base model)."""
    layers = wrapped_layers(unet)
    wanted = set(names or [])
    saved = {(b, n): l.active[n] for b, l in layers.items() for n in l.sets}
    try:
        for (block, set_name) in saved:
            layers[block].active[set_name] = set_name in wanted
        yield
    finally:
        for (block, set_name), was in saved.items():
            if set_name in layers[block].active:
                layers[block].active[set_name] = was
