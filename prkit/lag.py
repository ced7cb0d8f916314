"""LAG: localized attention-guided sampling.

Each residual set is applied only where the cross-attention of its concept's tokens (identifier +
class word, all sub-tokens) says the concept is, per block and per denoising step; the base model
paints everything else. The masks come from the same UNet forward (attn2 runs before proj_out), so
LAG adds no UNet evaluation. Works through any diffusers SD/SDXL pipeline call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .checks import check_flag
from .attention import AttentionStore, CaptureState, capture_attention
from .lag_tokens import (  # noqa: F401 (re-exported: prkit.lag stays their import path)
    concept_weights, encoded_text, prompt_tokens, second_prompt_weights, token_positions, word_index)
from .lag_watch import pipeline_cfg, watched_pipeline  # noqa: F401 (pipeline_cfg: prkit.lag stays its import path)
from .residual_layer import ResidualProjection
from .residuals import Residuals, check_on_unet, wrapped_layers
from .unet_lock import holding_unet_lock

THRESHOLDS = ("median", "mean", "otsu", "fixed", "soft")
LAYOUT_MASKS = True  # fused CUDA path: masks laid out like each set's middle (False: bool rows, broadcast)
MEDIAN_KERNEL = "median"  # fused CUDA path: "median" or "sort" (the same cut; median measured faster on an H100)


@dataclass
class LAGConfig:
    """How concept maps become masks."""

    threshold: str | Callable[[torch.Tensor], torch.Tensor] = "median"  # or mean/otsu/fixed/soft or fn((B,N))->(B,N)
    value: float = 0.5  # the cut for "fixed", on the per-image min-max normalized map
    include_class: bool = True  # sum the class word's map with the identifier's (METHOD default)

    def __post_init__(self):  # said when the config is made, not at the first UNet forward of a sampling call
        if not callable(self.threshold) and self.threshold not in THRESHOLDS:
            raise ValueError(f"LAGConfig.threshold {self.threshold!r} is unknown; use one of {', '.join(THRESHOLDS)} "
                             "or a callable (B, N) maps -> (B, N) masks")
        value = self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"LAGConfig.value must be a number in [0, 1] (the cut on the min-max normalized map), "
                             f"got {value!r}")
        check_flag(self.include_class, "LAGConfig.include_class")


def _normalize(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=1, keepdim=True)
    high = maps.amax(dim=1, keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-12)


def _otsu(maps: torch.Tensor, bins: int = 64) -> torch.Tensor:
    # NaN maps (a UNet whose output is NaN anyway) made an index of -2**63, and scatter_add_ stopped the sampling
    # with an out-of-bounds error; as bin 0 (no host check: the masks are made inside captured graphs too)
    norm = torch.nan_to_num(_normalize(maps), nan=0.0, posinf=1.0, neginf=0.0)
    idx = (norm * (bins - 1)).round().long()  # (B, N)
    hist = torch.zeros(maps.shape[0], bins, device=maps.device).scatter_add_(1, idx, torch.ones_like(norm))
    prob = hist / hist.sum(1, keepdim=True)
    levels = torch.linspace(0, 1, bins, device=maps.device)
    w0 = prob.cumsum(1)
    mu0 = (prob * levels).cumsum(1)
    between = (mu0[:, -1:] * w0 - mu0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    return (idx > between.argmax(1, keepdim=True)).float()  # class 0: bins up to the cut, whole


def make_mask(maps: torch.Tensor, config: LAGConfig) -> torch.Tensor:
    """Turn concept maps (B, N) into masks (B, N) in [0, 1] with the configured threshold."""
    method = config.threshold
    if callable(method):
        mask = method(maps)
        if not isinstance(mask, torch.Tensor) or mask.shape != maps.shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"LAGConfig.threshold {getattr(method, '__name__', method)!r} returned {got} for maps "
                             f"of shape {tuple(maps.shape)} (images x positions); it must return a mask of that "
                             "shape, values in [0, 1]")
        return mask.float()
    maps = maps.float()  # float32 masks from every method (otsu's float32 histogram refused half maps)
    if method == "median":
        return (maps > maps.median(dim=1, keepdim=True).values).float()
    if method == "mean":
        return (maps > maps.mean(dim=1, keepdim=True)).float()
    if method == "otsu":
        return _otsu(maps)
    if method == "fixed":
        return (_normalize(maps) > config.value).float()
    if method == "soft":
        return _normalize(maps)
    raise ValueError(f"unknown LAG threshold {method!r}; use one of {THRESHOLDS} or a callable")


class _MaskSource:
    """Per-layer callback: the mask of one residual set at this block in this forward pass.

    ``prepare`` makes the masks of all sets at once: while a CUDA graph is captured, the CaptureState calls it on
    its side stream right after the block's last attn2 (``on_block_ready``); otherwise the first ``__call__`` of
    the step does. With the layer given, the fused path's masks come laid out like each set's rank-r middle
    (``layout_mask``).
    """

    def __init__(self, state: CaptureState, block: str, index: dict[str, int], config: LAGConfig,
                 layer: ResidualProjection | None = None):
        self.state, self.block, self.index, self.config, self.layer = state, block, index, config, layer
        self.cache: tuple[int, torch.Tensor, dict[str, torch.Tensor]] | None = None  # step, masks, laid-out masks
        self.stored = -1  # the last step whose masks went to the store

    def prepare(self) -> None:
        fused, laid_out = self._fused_masks(), {}
        if fused is not None:
            masks, batch = fused
            if self.layer is not None:
                laid_out = {name: self.layer.layout_mask(masks[..., s], batch, name)
                            for name, s in self.index.items() if name in self.layer.sets}
        else:
            maps = self.state.concept_map(self.block)  # (B, N, S)
            if maps is None:
                raise RuntimeError(f"no cross-attention map was captured for {self.block} before its proj_out")
            masks = torch.stack([make_mask(maps[..., s], self.config) for s in range(maps.shape[-1])], -1)
        self.cache = (self.state.step, masks, laid_out)

    def __call__(self, name: str) -> torch.Tensor | None:
        if name not in self.index:
            return None  # a set without LAG applies everywhere
        step = self.state.step
        self.state.join()  # masks made on the side stream are ready for the current one from here on
        if self.cache is None or self.cache[0] != step:
            self.prepare()
        _, masks, laid_out = self.cache
        store = self.state.store
        if self.stored != step and store is not None and (store.steps is None or step in store.steps):
            self.stored = step
            cond = masks[masks.shape[0] // 2:] if self.state.is_cfg() and masks.shape[0] % 2 == 0 else masks
            h, w = self.state.spatial(self.block, cond.shape[1])
            grid = cond.reshape(cond.shape[0], h, w, -1).permute(0, 3, 1, 2).float()  # (Bc, S, h, w)
            store.masks[(self.block, step)] = store.pooled(grid).permute(0, 2, 3, 1).cpu()  # on the maps' (h, w)
        return laid_out[name] if name in laid_out else masks[..., self.index[name]]

    def _fused_masks(self) -> tuple[torch.Tensor, int] | None:
        """Bool masks (Bc, N, S) of the conditional rows from the fused CUDA path's sums (they serve every CFG
        half) and the batch they serve; median/mean cuts need no averaging first."""
        found = self.state.fused_map(self.block)
        if found is None or self.config.threshold not in ("median", "mean"):
            return None
        sums, doubled = found  # (Bc, N, S)
        if self.config.threshold == "mean":
            cut = sums.mean(dim=1, keepdim=True)
        elif MEDIAN_KERNEL == "sort":
            cut = sums.sort(dim=1).values[:, (sums.shape[1] - 1) // 2:(sums.shape[1] + 1) // 2]
        else:
            cut = sums.median(dim=1, keepdim=True).values  # the lower median, as the sort's middle pick
        return sums > cut, sums.shape[0] * (2 if doubled else 1)


@contextlib.contextmanager
@holding_unet_lock  # another thread's block (generate's too) waits: it failed on this one's capture
def lag_sampling(pipe_or_unet, residuals: Residuals | Sequence[Residuals], prompts: str | Sequence[str], *,
                 tokenizer=None, config: LAGConfig | None = None, cfg: bool | None = None,
                 store: AttentionStore | None = None, prompts_2: str | Sequence[str] | None = None):
    """Within the block, each residual set in ``residuals`` is applied only under its concept's mask. Blocks on one
    UNet from several threads (``generate`` calls too) run one after the other (``unet_lock``).

    Args:
        pipe_or_unet: a diffusers SD/SDXL pipeline (its unet and tokenizer are used) or a bare UNet.
        residuals: one or several residual sets on this very UNet, each with ``token`` (and ideally ``class_word``).
        prompts: the conditional prompt(s) that will be sampled, in pipeline order (as written: a pipeline's
            textual-inversion rewrite is applied here as in its ``encode_prompt``).
        tokenizer: needed when a bare UNet is given.
        config: threshold settings (median by default).
        cfg: whether batches are [uncond; cond]; None reads the pipeline's own flag at run time (a bare UNet has
            none: give it).
        store: optionally also keep per-token maps for visualisation.
        prompts_2: SDXL's second prompt(s), when the pipeline is called with a ``prompt_2`` of its own: the
            concept's words there are looked at too (the identifier is required in ``prompts`` only).
    Yields:
        the CaptureState, whose maps can be inspected.
    Raises:
        ValueError: a set is not on this UNet (removed, or on another one), is merged, or has no identifier in a
            prompt; an attn2 processor cannot be replaced (IP-Adapter).
    """
    if config is not None and not isinstance(config, LAGConfig):
        raise TypeError(f"config must be a prkit.LAGConfig (e.g. LAGConfig(threshold='otsu')), got {config!r}")
    config = config or LAGConfig()
    sets = [residuals] if isinstance(residuals, (Residuals, str)) else list(residuals)  # a name: refused whole
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:  # the masks' rows come from the prompts: none would fail at the first UNet call
        raise ValueError("lag_sampling needs the prompt(s) that will be sampled (their concept words place the "
                         "masks), got none")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    check_on_unet(unet, sets)
    merged = [r.name for r in sets if r.merged]
    if merged:
        raise ValueError(f"residual set(s) {merged} are merged into the base weights, where no mask can reach them: "
                         "unmerge() them for LAG sampling (merge is for sampling without LAG)")
    # an SDXL refiner has only its second text encoder, which then reads the prompt
    tokenizer = tokenizer or getattr(pipe_or_unet, "tokenizer", None) or getattr(pipe_or_unet, "tokenizer_2", None)
    if tokenizer is None:
        raise ValueError("lag_sampling needs a tokenizer: pass tokenizer=... (a bare UNet, or a pipeline without "
                         "one)")
    watch = contextlib.nullcontext()
    if hasattr(pipe_or_unet, "unet") and hasattr(pipe_or_unet, "encode_prompt"):
        watch = watched_pipeline(pipe_or_unet, prompts, prompts_2)
    elif cfg is None:  # read as False, a [uncond; cond] batch got masks from the negative prompt and other prompts'
        raise ValueError("lag_sampling with a bare UNet needs cfg=: True where its batches are [unconditional; "
                         "conditional] (classifier-free guidance), False where every row is conditional; a UNet has "
                         "no flag of its own to read it from")
    weights = concept_weights(tokenizer, prompts, sets, config.include_class, encoded_text(pipe_or_unet, tokenizer))
    if prompts_2 is not None and getattr(pipe_or_unet, "tokenizer", True) is not None:  # a refiner ignores prompt_2
        second = second_prompt_weights(pipe_or_unet, prompts_2, len(prompts), sets, config.include_class)
        if second.shape != weights.shape:
            raise ValueError(f"the two tokenizers give {weights.shape[1]} and {second.shape[1]} positions; SDXL's "
                             "text encoders must agree on the sequence length")
        weights = torch.maximum(weights, second)
    index = {r.name: s for s, r in enumerate(sets)}
    layers = wrapped_layers(unet)
    hooks = []
    with watch as pipeline_flag:
        state = CaptureState(weights, pipeline_flag if cfg is None else cfg, store)
        with capture_attention(unet, state):
            try:
                for block, layer in layers.items():
                    layer.mask_source = _MaskSource(state, block, index, config, layer if LAYOUT_MASKS else None)
                    state.on_block_ready[block] = layer.mask_source.prepare
                # a block's side-stream work rejoins by the block's end at the latest (also when no set consumed its
                # mask, or the block raised: an unjoined fork would fail a graph capture with a misleading error)
                hooks = [unet.get_submodule(block).register_forward_hook(lambda *_: state.join(), always_call=True)
                         for block in state.layer_counts]
                yield state
            finally:
                for hook in hooks:
                    hook.remove()
                state.on_block_ready.clear()
                for layer in layers.values():
                    layer.mask_source = None
