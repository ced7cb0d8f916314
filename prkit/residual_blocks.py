"""Where residual layers live on a UNet: the ``proj_out`` of each transformer block (compiled UNets included),
the residual layer wrapped around it (also under a peft LoRA loaded later), and putting the wrapped module back."""

from __future__ import annotations

from torch import nn

from .residual_layer import ResidualProjection


def original_module(unet: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``unet._orig_mod``), or ``unet`` itself: block names never carry the
    compiled wrapper's ``_orig_mod.`` prefix, so files move between compiled and plain UNets."""
    return getattr(unet, "_orig_mod", unet)


def find_projections(unet: nn.Module) -> dict[str, nn.Module]:
    """Map block name -> its ``proj_out`` module, for every Transformer2DModel in ``unet`` (compiled or not).

    Returns:
        ``{"down_blocks.0.attentions.0": proj_out, ...}`` in module order (wrapped or not).
    """
    found = {}
    for name, module in original_module(unet).named_modules():
        proj = getattr(module, "proj_out", None)
        if proj is not None and hasattr(module, "transformer_blocks") and hasattr(module, "proj_in"):
            found[name] = proj
    return found


def wrapped_layers(unet: nn.Module) -> dict[str, ResidualProjection]:
    """Block name -> ResidualProjection for the blocks that are currently wrapped (also under a LoRA loaded later)."""
    found = {k: residual_layer(v) for k, v in find_projections(unet).items()}
    return {k: v for k, v in found.items() if v is not None}


def residual_layer(proj: nn.Module) -> ResidualProjection | None:
    """The residual layer of a ``proj_out``: itself, the base layer of a peft LoRA put on it later, or None."""
    if isinstance(proj, ResidualProjection):
        return proj
    base = getattr(proj, "base_layer", None)
    return base if isinstance(base, ResidualProjection) else None


def _put_back(unet: nn.Module, block: str, layer: ResidualProjection) -> None:
    """Replace the residual layer of ``block`` by the module it wrapped (under a LoRA's wrapper where one is)."""
    parent = original_module(unet).get_submodule(block)
    if parent.proj_out is layer:
        parent.proj_out = layer.unwrapped()
    else:
        parent.proj_out.base_layer = layer.unwrapped()
