"""Personalized residuals: a low-rank side branch on every transformer block's ``proj_out``.

Owns adding/removing the wrapper layer (``residual_layer``), enabling/disabling, merging, scales and several
named residual sets on one UNet (the blocks that switch them for a span: ``residual_switches``). It does not know
about attention maps (``lag.py`` sets masks) or files (``files.py``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterator

import torch
from torch import nn

# re-exported: the layer classes have always been importable from here
from .residual_layer import LowRank, ResidualProjection  # noqa: F401
# re-exported: prkit.residuals stays their import path
from .residual_config import (  # noqa: F401
    ResidualConfig, check_set_name, check_word, finite_scale, plain_rank, rank_for, usable_set_name)
from .residual_blocks import _put_back, find_projections, original_module, residual_layer, wrapped_layers  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"


class _Word:
    """A concept word of a residual set (token, class_word), kept on the set's UNet: every handle on the set
    (get_residuals, the set an interrupted run left) reads and sets the same one."""

    def __set_name__(self, owner, key: str) -> None:
        self.key = key

    def __get__(self, handle, owner=None):
        if handle is None:
            return self
        return _words(handle.unet).get(handle.name, {}).get(self.key)

    def __set__(self, handle, value: str | None) -> None:
        check_word(value, f"residual set {handle.name!r}", self.key)
        _words(handle.unet).setdefault(handle.name, {})[self.key] = value


class Residuals:
    """A handle on one named residual set living inside a UNet.

    Attributes:
        name: the set's name (several sets may live on one UNet).
        token, class_word: the concept words (used by LAG and saved in files).
        meta: the set's metadata (``save`` records its base model, training config, base-model revision and wall
            time); like the words, kept on the UNet, so every handle on the set shares it.
    """

    def __init__(self, unet: nn.Module, name: str, token: str | None = None, class_word: str | None = None):
        self.unet = unet
        self.name = name
        if token is not None:
            self.token = token
        if class_word is not None:
            self.class_word = class_word

    token = _Word()
    class_word = _Word()

    @property
    def meta(self) -> dict:
        return _words(self.unet).setdefault(self.name, {}).setdefault("meta", {})

    @meta.setter
    def meta(self, value: dict) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"residual set {self.name!r}: meta must be a dict (free-form metadata saved with the "
                            f"file), got {type(value).__name__}")
        _words(self.unet).setdefault(self.name, {})["meta"] = value

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

    def _check_factors_here(self, what: str) -> None:
        """Refuse reading or writing factors that accelerate's sequential CPU offload keeps on the meta device between
        calls: a write would be lost, and a read has no data (saving failed with 'Cannot copy out of meta tensor')."""
        if any(t.device.type == "meta" for lowrank in self.factors().values() for t in (lowrank.down, lowrank.up)):
            raise RuntimeError(
                f"cannot {what} residual set {self.name!r}: the UNet is offloaded (accelerate's sequential CPU offload "
                f"keeps the set's factors on the meta device between calls); {what} it before enabling offloading, or "
                "after pipe.remove_all_hooks()")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<block>.down": (r, C), "<block>.up": (C, r)}`` detached tensors."""
        self._check_factors_here("read")
        out = {}
        for block, lowrank in self.factors().items():
            out[f"{block}.down"] = lowrank.down.detach()
            out[f"{block}.up"] = lowrank.up.detach()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (as ``state_dict`` gives it) into the set; every key and shape is checked first, so a
        state that does not fit (KeyError for a missing factor, ValueError for a shape) leaves the set as it was."""
        self._check_factors_here("write")
        pairs = []
        for block, lowrank in self.factors().items():
            for part in ("down", "up"):
                key = f"{block}.{part}"
                if key not in state:
                    raise KeyError(f"{key}: the state holds no factor of block {block!r} ({part}); give a state of a "
                                   "set with the same blocks (Residuals.state_dict())")
                src, dst = state[key], getattr(lowrank, part)
                if src.shape != dst.shape:
                    raise ValueError(f"{key}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
                pairs.append((src, dst))
        for src, dst in pairs:
            dst.copy_(src.to(dst.dtype))

    @property
    def scale(self) -> float:
        return next(iter(self.layers().values())).scales[self.name]

    @scale.setter
    def scale(self, value: float) -> None:
        value = finite_scale(value, f"residual set {self.name!r}")
        for layer in self.layers().values():
            if self.name in layer.merged:
                raise RuntimeError(f"unmerge residual set {self.name!r} before changing its scale")
            layer.scales[self.name] = value

    def enable(self) -> None:
        for layer in self.layers().values():
            layer.set_active(self.name, True)

    def disable(self) -> None:
        for layer in self.layers().values():
            layer.set_active(self.name, False)

    @property
    def enabled(self) -> bool:
        return all(layer.active[self.name] for layer in self.layers().values())

    def merge(self) -> None:
        """Fold the set into the base weights (fast sampling without LAG); ``unmerge`` restores them."""
        layers = self.layers().values()
        for layer in layers:  # every layer checked first: a refusal leaves no layer merged
            if self.name not in layer.merged:
                layer._check_weight_here("merge", self.name)
        for layer in layers:
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

    def save(self, path, *, base_model: str | None = None, config: dict | None = None, dtype=torch.float32):
        """Write this set to a ``.safetensors`` file (``prkit.files.save_residuals``: ``base_model`` and ``config``
        recorded, ``dtype`` of the tensors); returns the path."""
        from .files import save_residuals

        return save_residuals(self, path, base_model=base_model, config=config, dtype=dtype)

    def __repr__(self) -> str:
        try:
            count = f"{self.num_parameters():,} parameters in {len(self.layers())} layers"
        except RuntimeError:
            count = "removed"
        return f"Residuals(name={self.name!r}, token={self.token!r}, class_word={self.class_word!r}, {count})"


def _words(unet: nn.Module) -> dict[str, dict]:
    """Set name -> {"token", "class_word", "meta"} of the sets on ``unet`` (kept on the original of a compiled
    UNet)."""
    unet = original_module(unet)
    if "_prkit_words" not in unet.__dict__:
        unet.__dict__["_prkit_words"] = {}
    return unet.__dict__["_prkit_words"]


def add_residuals(unet: nn.Module, rank: float | int | dict[str, int] = 0.05, name: str = DEFAULT_NAME, *,
                  token: str | None = None, class_word: str | None = None, seed: int | None = None,
                  config: ResidualConfig | None = None) -> Residuals:
    """Wrap every transformer block's ``proj_out`` and add a residual set named ``name`` (under a LoRA already loaded
    on a ``proj_out``, the wrapper goes beneath it: both apply, and either can be removed later).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any SD1.x / SD2.x / SDXL layout).
        rank: fraction of channels (default 0.05: r = round(0.05 * C)), a fixed int rank, or block -> rank.
        name: set name; several sets can live on one UNet (multi-concept).
        token, class_word: the concept's words (LAG finds them in prompts).
        seed: seeds the random factor so the same call gives the same init.
    Returns:
        a ``Residuals`` handle. The UNet's output is unchanged until the set is trained.
    """
    if config is not None and ((rank != 0.05 and rank != config.rank) or (seed is not None and seed != config.seed)):
        raise ValueError(f"add_residuals: rank={rank!r}, seed={seed!r} and config={config!r} disagree; pass rank and "
                         "seed either directly or through config")
    config = config or ResidualConfig(rank=rank, seed=seed)
    check_set_name(name)
    check_word(token, "add_residuals", "token")
    check_word(class_word, "add_residuals", "class_word")
    projections = find_projections(unet)
    if not projections:
        raise ValueError("this model has no transformer blocks with a proj_out; is it a UNet2DConditionModel?")
    if isinstance(config.rank, dict):  # a misspelt block's rank was left unused without a word
        unknown = [block for block in config.rank if block not in projections]
        if unknown:
            raise ValueError(f"add_residuals: rank names block(s) this UNet does not have: "
                             f"{', '.join(map(repr, unknown))}; give a rank for each of its blocks, by these names: "
                             f"{', '.join(map(repr, projections))}")
    layers = {block: residual_layer(proj) for block, proj in projections.items()}
    if any(name in layer.sets for layer in layers.values() if layer is not None):
        raise ValueError(f"a residual set named {name!r} is already on this UNet; pick another name or remove it")
    root = original_module(unet)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    clamped: list[str] = []
    try:
        for block, proj in projections.items():
            if layers[block] is not None:
                proj = layers[block]
            elif hasattr(proj, "base_layer"):  # a LoRA (peft) already on proj_out: the residuals go under it
                proj.base_layer = ResidualProjection(proj.base_layer, block)
                proj = proj.base_layer
            else:
                proj = ResidualProjection(proj, block)
                root.get_submodule(block).proj_out = proj
            rule = config.rank
            if isinstance(config.rank, dict):  # each block's rank reads like rank= (a fraction or a whole rank)
                if block not in config.rank:
                    raise ValueError(f"no rank given for block {block!r}")
                rule = config.rank[block]
            try:
                layer_rank = rank_for(proj.channels, rule)
            except ValueError as err:
                per_block = ValueError(f"{err} (the rank given for block {block!r})")
                raise (err if rule is config.rank else per_block) from None
            if layer_rank < rule >= 1:
                clamped.append(f"{block} ({proj.channels})")
            proj.add_set(name, layer_rank, generator)
    except Exception:  # a failed add leaves the UNet as it was
        for block, layer in wrapped_layers(unet).items():
            if name in layer.sets:
                layer.remove_set(name)
            if not layer.sets:
                _put_back(unet, block, layer)
        raise
    if clamped:
        given = "a rank given per block" if isinstance(config.rank, dict) else f"rank {config.rank}"
        warnings.warn(f"{given} exceeds the channels of {len(clamped)} block(s), which get their full "
                      f"rank instead: {', '.join(clamped[:4])}{' ...' if len(clamped) > 4 else ''}", stacklevel=2)
    _words(unet).pop(name, None)  # a new set: nothing of a set of that name removed before
    residuals = Residuals(unet, name, token, class_word)
    residuals.meta["rank_rule"] = config.rank if not isinstance(config.rank, dict) else "per-layer"
    return residuals


def remove_residuals(unet: nn.Module, name: str | Residuals | None = None) -> None:
    """Remove the set ``name`` (a name or a handle on ``unet``; all sets when None); a wrapper left with no set is
    replaced by its base layer.

    The base layers put back are the very module objects that were wrapped.
    """
    name = _present(unet, name)
    layers = wrapped_layers(unet)
    for block, layer in layers.items():
        for set_name in list(layer.sets):
            if name is None or set_name == name:
                layer.remove_set(set_name)
        if not layer.sets:
            _put_back(unet, block, layer)
    words = _words(unet)
    for set_name in list(words):
        if name is None or set_name == name:
            del words[set_name]


def residual_names(unet: nn.Module) -> list[str]:
    """Names of the residual sets on ``unet``."""
    names: list[str] = []
    for layer in wrapped_layers(unet).values():
        names.extend(n for n in layer.sets if n not in names)
    return names


def get_residuals(unet: nn.Module, name: str = DEFAULT_NAME) -> Residuals:
    """A handle on an existing set, with the words it was added, trained or loaded with."""
    return Residuals(unet, _present(unet, name))


def _present(unet: nn.Module, name: str | Residuals | None) -> str | None:
    """The name of a set on ``unet`` given by name or by handle (None stays None); KeyError when it is not there."""
    if isinstance(name, Residuals):
        check_on_unet(unet, [name])
        name = name.name
    if name is not None and name not in residual_names(unet):
        raise KeyError(f"no residual set named {name!r} on this UNet; present: {residual_names(unet)}")
    return name


def check_on_unet(unet: nn.Module, sets: list[Residuals]) -> None:
    """Make sure each handle in ``sets`` is a set living on ``unet`` itself.

    Why: sets are selected by name, so a handle whose set was removed would select nothing (the base model would
    sample in its place), and one made on another UNet would select nothing or this UNet's own set of that name.

    Raises:
        ValueError: a set lives on another UNet, or is no longer on this one.
    """
    for residuals in sets:
        if not isinstance(residuals, Residuals):
            raise ValueError(f"expected a Residuals handle, got {residuals!r}: prkit.get_residuals(unet, "
                             f"{residuals!r}) gives the handle of a set on a UNet")
        # the same module, also where one side is its torch.compile wrapper (which keeps it as ``_orig_mod``)
        if original_module(residuals.unet) is not original_module(unet):
            own = residuals.name in residual_names(unet)
            here = " (the set of that name on this UNet is a different one)" if own else ""
            raise ValueError(f"residual set {residuals.name!r} lives on another UNet, not on this pipeline's{here}: "
                             "save it (residuals.save(path)) and load it onto this pipeline's UNet with "
                             "load_residuals(pipe, path), or sample with the pipeline it was made on")
        if residuals.name not in residual_names(unet):
            raise ValueError(f"residual set {residuals.name!r} is no longer on this UNet (removed with "
                             f"remove_residuals?); present: {residual_names(unet)}. Load it onto this pipeline's "
                             "UNet again with load_residuals(pipe, path), or pass residuals=None for the base model")


# the blocks that switch sets on and off for a span (re-exported: prkit.residuals stays their import path)
from .residual_switches import only_residuals, residuals_disabled  # noqa: E402,F401
