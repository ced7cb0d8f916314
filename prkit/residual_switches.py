"""Blocks that switch a UNet's residual sets on and off for a span and put every set's flag back after:
``residuals_disabled`` (the base model, or without one set) and ``only_residuals`` (exactly the sets named). Each
holds the UNet's lock (``unet_lock``), so blocks from several threads run one after the other. ``prkit.residuals``
re-exports them."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from torch import nn

from .residual_blocks import wrapped_layers
from .residual_layer import ResidualProjection
from .unet_lock import holding_unet_lock

if TYPE_CHECKING:
    from .residuals import Residuals


@contextlib.contextmanager
@holding_unet_lock  # another thread's block (generate's too) waits: it would switch the sets under this one
def residuals_disabled(unet: nn.Module, name: str | Residuals | None = None):
    """Within the block, the set ``name`` (a name or a handle on ``unet``; all sets when None) is switched off: the
    base model runs. A name that is not on ``unet`` raises KeyError (it would switch nothing off). Switched as
    ``disable()`` does: a merged set leaves the weights at once (a compiled forward never rewrites them). Blocks on
    one UNet from several threads (``generate`` and ``only_residuals`` too) run one after the other (``unet_lock``)."""
    from .residuals import _present  # (prkit.residuals imports this module at its end)

    name = _present(unet, name)
    layers = wrapped_layers(unet)
    saved = {(b, n): l.active[n] for b, l in layers.items() for n in l.sets if name is None or n == name}
    try:
        for (block, set_name) in saved:
            layers[block].set_active(set_name, False)
        yield
    finally:
        _restore_active(layers, saved)


def _restore_active(layers: dict[str, ResidualProjection], saved: dict[tuple[str, str], bool]) -> None:
    """Put back each (block, set)'s saved on/off flag, through ``set_active`` (merged weights follow at once); a set
    removed meanwhile is passed over."""
    for (block, set_name), was in saved.items():
        if set_name in layers[block].active:
            layers[block].set_active(set_name, was)


def merged_sets(unet: nn.Module, besides: set[str] = frozenset()) -> list[str]:
    """The names of the sets merged into ``unet``'s base weights, other than ``besides``, sorted: switching them off
    cannot reach them there."""
    return sorted({n for layer in wrapped_layers(unet).values() for n in layer.merged if n not in besides})


@contextlib.contextmanager
@holding_unet_lock  # another thread's block (generate's too) waits: it would switch the sets under this one
def only_residuals(unet: nn.Module, names: list[str | Residuals] | None):
    """Within the block, exactly the sets in ``names`` are active (None or []: none, the base model). Blocks on one
    UNet from several threads (``generate`` calls too) run one after the other (``unet_lock``).

    Args:
        names: set names, or ``Residuals`` handles, which must live on ``unet`` (a bare name may also be a set
            that is added inside the block, as training does).
    Raises:
        ValueError: a handle's set is not on ``unet`` (``check_on_unet``); or a set not in ``names`` is merged into
            the base weights, where switching it off cannot reach.
    """
    from .residuals import Residuals, check_on_unet  # (prkit.residuals imports this module at its end)

    check_on_unet(unet, [n for n in names or [] if isinstance(n, Residuals)])
    layers = wrapped_layers(unet)
    wanted = {n.name if isinstance(n, Residuals) else n for n in names or []}
    merged = merged_sets(unet, besides=wanted)
    if merged:
        raise ValueError(f"residual set(s) {merged} are merged into the base weights, so they would paint into every "
                         "image and be trained into any other set: unmerge() them first, or pass them in residuals=")
    saved = {(b, n): l.active[n] for b, l in layers.items() for n in l.sets}
    try:
        for (block, set_name) in saved:
            layers[block].set_active(set_name, set_name in wanted)
        yield
    finally:
        _restore_active(layers, saved)
