"""The attention store: per-token cross-attention maps (and LAG's masks) kept for visualisation.

Filled by ``attention.capture_attention`` (each capture starts it fresh); read by the notebooks and ``viz``. Holds
data and its reductions only: nothing here touches diffusers or the UNet.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionStore:
    """Per-token cross-attention maps kept for visualisation.

    maps[(block, step)] is a float32 CPU tensor (B_cond, T, h, w), head-averaged, for the token positions
    ``tokens`` (None: all). A block's (h, w) is its own grid, area-averaged down so that the long side is at most
    ``max_resolution`` with the aspect ratio kept (an 8x32 grid under a cap of 8 is stored as 2x8, not squashed to
    8x8). masks[(block, step)] (B_cond, h, w, S) are LAG's masks on the same (h, w) as the maps: binary at native
    size, the masked fraction of each cell where pooled.

    Each capture that fills the store (one ``generate`` call, one ``capture_attention`` or ``lag_sampling``
    block) starts it fresh: maps, masks and layer counts of an earlier capture are cleared when it begins, so
    reusing one store never averages unrelated runs. Copy what you want to keep before the next call.
    """

    tokens: list[int] | None = None  # token positions to keep (None: every position)
    max_resolution: int = 16  # the long side of stored maps and masks; larger grids are area-averaged down to it
    steps: list[int] | None = None  # UNet evaluations to keep (None: all): one per denoising step for first-order
    # samplers (DDIM, DPM-Solver++, Euler), two for Heun's and KDPM2's second-order steps
    maps: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    masks: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # LAG masks (B, h, w, S), if LAG ran
    layers: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)  # layers averaged into maps[key]

    def __post_init__(self):
        self.tokens = _whole_numbers(self.tokens, "tokens", "token positions, e.g. from prkit.prompt_tokens")
        self.steps = _whole_numbers(self.steps, "steps", "UNet evaluations to keep, e.g. [0, 10, 24]")
        size = self.max_resolution
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:  # 0 pooled every map to one number
            raise ValueError(f"AttentionStore.max_resolution must be a whole number >= 1 (the long side of stored "
                             f"maps, e.g. 16), got {size!r}")

    def clear(self) -> None:
        """Forget every map, mask and layer count (a new capture begins)."""
        self.maps.clear()
        self.masks.clear()
        self.layers.clear()

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps (B, C, h, w) area-averaged so that the long side is at most ``max_resolution``, aspect kept."""
        h, w = maps.shape[-2:]
        if max(h, w) <= self.max_resolution:
            return maps
        scale = self.max_resolution / max(h, w)
        return F.adaptive_avg_pool2d(maps, (max(1, round(h * scale)), max(1, round(w * scale))))

    def blocks(self) -> list[str]:
        return sorted({b for b, _ in self.maps}, key=_block_order)

    def num_steps(self) -> int:
        return 1 + max((s for _, s in self.maps), default=-1)

    def get(self, block: str, step: int | None = None) -> torch.Tensor:
        """Maps of one block at one step (None: averaged over all kept steps): (B, T, h, w)."""
        found = {s: m for (b, s), m in self.maps.items() if b == block}
        if not found:
            raise KeyError(f"no maps stored for block {block!r}; stored: {self.blocks()}")
        if step is None:
            return torch.stack(list(found.values())).mean(0)
        if step not in found:
            raise KeyError(f"step {step} of block {block!r} was not kept; kept steps: {sorted(found)}")
        return found[step]

    def save(self, path) -> None:
        """Write maps and masks to ``path`` (torch.save), keyed 'block@step'."""
        torch.save({"maps": {f"{b}@{s}": m for (b, s), m in self.maps.items()},
                    "masks": {f"{b}@{s}": m for (b, s), m in self.masks.items()}, "tokens": self.tokens}, path)

    def aggregate(self, size: int | tuple[int, int] | None = None, step: int | None = None) -> torch.Tensor:
        """DAAM-style aggregate over blocks (and steps): each block's maps upsampled and averaged.

        Args:
            size: (h, w) of the result, or its long side (the aspect of the finest stored maps is kept, so a
                non-square image's maps stay non-square); None: ``max_resolution``.
        Returns:
            (B, T, h, w).
        """
        if not self.maps:
            raise ValueError("the attention store is empty: fill it by sampling with generate(..., store=store) or "
                             "inside capture_attention(pipe, store=store)")
        maps = {b: self.get(b, step) for b in self.blocks()}
        if not isinstance(size, (tuple, list)):
            long = size or self.max_resolution
            h, w = max((m.shape[-2:] for m in maps.values()), key=lambda hw: hw[0] * hw[1])
            size = (max(1, round(h * long / max(h, w))), max(1, round(w * long / max(h, w))))
        upsampled = [F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False) for m in maps.values()]
        return torch.stack(upsampled).mean(0)


def _whole_numbers(value, name: str, what: str) -> list[int] | None:
    """``value`` (None, or an iterable of whole numbers) as a list; anything else is refused now, naming the field,
    not at the first UNet forward with a TypeError ('int' is not iterable) or a float silently cut to an index."""
    if value is None:
        return None
    try:
        numbers = list(value)
        if any(isinstance(n, bool) for n in numbers):
            raise TypeError
        return [operator.index(n) for n in numbers]
    except TypeError:
        raise ValueError(f"AttentionStore.{name} must be None or a list of whole numbers ({what}), got "
                         f"{value!r}") from None


def _block_order(block: str) -> tuple[int, int, int]:
    kind = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(block.split(".")[0], 3)
    digits = [int(p) for p in block.split(".") if p.isdigit()] + [0, 0]
    return kind, digits[0], digits[1]
