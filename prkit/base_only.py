"""What ``train_residuals`` switches off while it trains, and back on after, so that the residuals learn against the
base model their file names: loaded LoRA adapters and diffusers' FreeU."""

from __future__ import annotations

import contextlib
import logging

from torch import nn

from .residuals import original_module

log = logging.getLogger(__name__)


@contextlib.contextmanager
def adapters_off(modules: list[nn.Module]):
    """Within the block, every active peft adapter (a LoRA loaded with ``pipe.load_lora_weights``) in ``modules`` is
    switched off, and back on after: residuals train against the base model, as their file says. A LoRA fused into
    the weights (``pipe.fuse_lora()``) is part of the base weights and stays."""
    layers = [m for root in modules for m in root.modules()
              if isinstance(getattr(type(m), "disable_adapters", None), property) and hasattr(m, "enable_adapters")]
    switched = [m for m in layers if not m.disable_adapters and getattr(m, "active_adapters", None)]
    if switched:
        log.warning(
            "the LoRA adapters loaded on this pipeline are off while the residuals train (they train against the "
            "base model) and back on afterwards")
    try:
        for layer in switched:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in switched:
            layer.enable_adapters(True)


FREEU_KEYS = ("s1", "s2", "b1", "b2")


@contextlib.contextmanager
def freeu_off(unet: nn.Module):
    """Within the block diffusers' FreeU (``pipe.enable_freeu``: a sampling-time reweighting of the decoder's
    features) is off, and back as it was after: residuals train against the base model, as their file says."""
    blocks = list(getattr(original_module(unet), "up_blocks", []))
    saved = [{key: getattr(block, key, None) for key in FREEU_KEYS} for block in blocks]
    on = any(value is not None for values in saved for value in values.values())
    if on:
        log.warning("FreeU is off while the residuals train (they train against the base model) and back on afterwards")
    try:
        for block in blocks if on else []:
            for key in FREEU_KEYS:
                setattr(block, key, None)
        yield
    finally:
        for block, values in zip(blocks if on else [], saved):
            for key, value in values.items():
                setattr(block, key, value)
