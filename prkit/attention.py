"""Cross-attention capture: the only module that touches diffusers attention internals.

``capture_attention(unet, ...)`` swaps a processor onto every ``attn2`` that computes the
cross-attention probabilities explicitly (77 keys: cheap) and reduces them at once to per-block
concept maps and, optionally, small per-token maps for visualisation. ``attn1`` keeps its own
(fused SDPA) processor. The original processors come back on exit, also on error. An ``attn2`` processor it cannot
stand in for (IP-Adapter's) is refused before anything is installed.

While a CUDA graph of a LAG forward is captured (``CaptureState.on_block_ready`` set), a block's concept maps and
its mask are computed on a second stream that forks at ``attn2`` and joins at ``proj_out``: the small map, median
and compare kernels become a parallel branch of the graph, overlapping the block's attention and feed-forward.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention_store import AttentionStore  # noqa: F401 - re-exported: prkit.attention.AttentionStore
from .residuals import original_module
from .streams import side_stream

SIDE_STREAM = True  # LAG's per-block mask work on a second CUDA stream in graphs (False: inline, current stream)


class CaptureState:
    """Shared state between the ``attn2`` processors and whoever reads the maps (LAG, the store).

    concept_weights: (P, T, S) weights over token positions for S concepts of P conditional prompts.
    cfg: whether the batch is [unconditional; conditional] (a bool, or a callable of the forward's batch size read
        at run time).
    """

    def __init__(self, concept_weights: torch.Tensor | None = None, cfg: bool | Callable[[], bool] = False,
                 store: AttentionStore | None = None):
        self.concept_weights = concept_weights
        self.cfg = cfg
        self.store = store
        self.step = -1
        self.block_hw: dict[str, tuple[int, int]] = {}  # block -> (h, w) of its input grid in this forward
        self.sums: dict[str, torch.Tensor] = {}  # block -> (B, N, S) summed over the block's layers
        self.counts: dict[str, int] = {}
        self.doubled: dict[str, bool] = {}  # block -> sums hold only the conditional rows (fused CUDA path)
        self._values: dict[tuple, torch.Tensor] = {}  # fused path: token weights laid out as SDPA values
        self.listeners: list[Callable[[], None]] = []  # called at each UNet forward (step start)
        self.layer_counts: dict[str, int] = {}  # block -> its attn2 layers (set by capture_attention)
        self.on_block_ready: dict[str, Callable[[], None]] = {}  # block -> run once its maps are complete (LAG)
        self._side: torch.cuda.Stream | None = None  # the second stream of the CUDA path
        self._pending: list[tuple[torch.Tensor, ...]] = []  # inputs the side stream reads, held until joined
        self._cfg_now: bool | None = None  # is_cfg() of the current forward

    def is_cfg(self, batch: int | None = None) -> bool:
        """Whether this forward's batch is [unconditional; conditional]: read once per UNet forward (a step callback
        may switch guidance off between steps), outside torch.compile's tracing (the flag lives on the pipeline).
        A callable flag is given ``batch`` (the forward's rows; LAG's watched pipeline checks it)."""
        if self._cfg_now is None:
            self._cfg_now = self._read_cfg(batch)
        return self._cfg_now

    @torch.compiler.disable
    def _read_cfg(self, batch: int | None) -> bool:
        return bool(self.cfg(batch)) if callable(self.cfg) else bool(self.cfg)

    def spatial(self, block: str, tokens: int) -> tuple[int, int]:
        """(h, w) of ``block``'s grid, whose attention has ``tokens`` query positions.

        Read from the block's own input (``capture_attention`` records it as the block starts), not guessed from
        the token count: the UNet's downsampling rounds odd sizes up (n -> ceil(n / 2)), so the latent's aspect
        ratio does not carry over exactly (a 24x10 latent has a 6x3 level, whose 18 tokens a square-root guess
        reads as 7x2).
        """
        hw = self.block_hw.get(block)
        if hw is None or hw[0] * hw[1] != tokens:
            raise RuntimeError(f"no grid of {tokens} positions was recorded for block {block!r} (recorded: {hw}); "
                               "its attention must run inside the block's forward within capture_attention")
        return hw

    def begin_step(self) -> None:
        self.step += 1
        self._cfg_now = None
        self.block_hw.clear()
        self.sums.clear()
        self.counts.clear()
        self.doubled.clear()
        for listener in self.listeners:
            listener()

    def concept_map(self, block: str) -> torch.Tensor | None:
        """(B, N, S) head- and layer-averaged concept maps of ``block`` in this forward pass."""
        if block not in self.sums:
            return None
        maps = self.sums[block] / self.counts[block]
        return torch.cat([maps, maps]) if self.doubled.get(block) else maps

    def fused_map(self, block: str) -> tuple[torch.Tensor, bool] | None:
        """The fused path's (Bc, N, S) head- and layer-sums of ``block`` and whether they serve both CFG halves."""
        if block not in self.doubled:
            return None
        return self.sums[block], self.doubled[block]

    def wants_probs(self) -> bool:
        """Whether this step needs the full probabilities (the store keeps per-token maps of it)."""
        store = self.store
        return store is not None and (store.steps is None or self.step in store.steps)

    def _rows(self, weights: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
        """The (P, T, S) concept weights for ``rows`` conditional rows attending to ``tokens`` text positions."""
        if tokens != weights.shape[1]:
            raise ValueError(f"the UNet's text has {tokens} token positions, but LAG's masks are made for "
                             f"{weights.shape[1]} (the tokenizer's model_max_length): embeddings of several windows "
                             "(long-prompt weighting, compel) do not line up with the prompt's tokens; sample with "
                             f"prompts of at most {weights.shape[1]} tokens (one window), or lag=False")
        prompts = weights.shape[0]
        if rows == prompts:
            return weights
        if rows % prompts:
            raise RuntimeError(f"attention batch of {rows} conditional rows does not fit {prompts} prompts")
        return weights.repeat_interleave(rows // prompts, dim=0)  # diffusers' num_images_per_prompt order

    def record(self, block: str, layer: int, probs: torch.Tensor, spatial: tuple[int, int]) -> None:
        """Reduce probabilities (B, heads, N, T) of one attn2 call right away."""
        batch = probs.shape[0]
        cond = probs[batch // 2:] if self.is_cfg(batch) and batch % 2 == 0 else probs
        if self.concept_weights is not None:
            # (Bc, T, S) on cond's device
            weights = self._rows(self.concept_weights, cond.shape[0], cond.shape[-1]).to(cond)
            maps = torch.einsum("bhnt,bts->bns", cond, weights) / cond.shape[1]  # (Bc, N, S)
            if cond.shape[0] != batch:
                maps = torch.cat([maps, maps])  # the conditional mask serves both CFG halves
            maps = maps.float()
            if layer == 0 or block not in self.sums:
                self.sums[block], self.counts[block] = maps, 1
            else:
                self.sums[block] = self.sums[block] + maps
                self.counts[block] += 1
        store = self.store
        if store is not None and (store.steps is None or self.step in store.steps):
            self._store(block, cond, spatial)

    def record_fused(self, block: str, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """Concept maps of one attn2 call as a second, small SDPA: softmax(q k^T * scale) @ token weights.

        While a CUDA graph is captured and a consumer waits (``on_block_ready``), the work runs on the side stream
        and the consumer is called there after the block's last layer; ``join`` makes the current stream wait.

        Args:
            query: (B, heads, N, d) and key: (B, heads, T, d) of the call; only conditional rows are used.
        """
        if self.concept_weights is None:
            return
        side = self._side_stream(query) if self.on_block_ready else None
        if side is None:  # inline: the consumer computes its masks when it first asks (at proj_out)
            self._record_fused(block, layer, query, key, scale)
            return
        ready = self.on_block_ready.get(block) if layer + 1 == self.layer_counts.get(block, 1) else None
        side.wait_stream(torch.cuda.current_stream(query.device))
        # freed only after the join, so the current stream cannot reuse their memory while the side stream reads
        # them (a block of several layers, SDXL's, holds every layer's query and key until its proj_out)
        self._pending.append((query, key))
        with torch.cuda.stream(side):
            self._record_fused(block, layer, query, key, scale)
            if ready is not None:
                ready()

    def _side_stream(self, query: torch.Tensor) -> torch.cuda.Stream | None:
        """The side stream, while a CUDA graph is being captured (eager, the stream switches cost more host time
        than the overlap saves: measured on an H100, BENCHMARKS.md)."""
        if not SIDE_STREAM or not query.is_cuda or not torch.cuda.is_current_stream_capturing():
            return None
        if self._side is None or self._side.device != query.device:
            self._side = side_stream(query.device, "lag")
        return self._side

    def join(self) -> None:
        """Make the current stream wait for the side stream's work so far (a no-op when none is pending)."""
        if not self._pending:
            return
        torch.cuda.current_stream(self._side.device).wait_stream(self._side)
        self._pending.clear()

    def _record_fused(self, block: str, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        batch, heads, _, dim = query.shape
        doubled = self.is_cfg(batch) and batch % 2 == 0
        if doubled:
            query, key = query[batch // 2:], key[batch // 2:]
        rows, tokens, concepts = query.shape[0], key.shape[2], self.concept_weights.shape[-1]
        if concepts <= dim:
            cache_key = (rows, heads, tokens, dim, query.dtype, query.device)
            values = self._values.get(cache_key)
            if values is None:  # (Bc, h, T, d): the S concept columns, zeros after them
                values = query.new_zeros(rows, heads, tokens, dim)
                values[..., :concepts] = self._rows(self.concept_weights, rows, tokens).to(query)[:, None]
                self._values[cache_key] = values
            maps = F.scaled_dot_product_attention(query, key, values, scale=scale)[..., :concepts]
        else:
            weights = self._rows(self.concept_weights, rows, tokens).to(query)[:, None]  # (Bc, 1, T, S)
            maps = ((query @ key.transpose(-1, -2)) * scale).softmax(-1) @ weights
        maps = maps.sum(1, dtype=torch.float32)  # (Bc, N, S), summed over heads
        if layer == 0 or block not in self.sums:
            self.sums[block], self.counts[block], self.doubled[block] = maps, heads, doubled
        else:
            self.sums[block] = self.sums[block] + maps
            self.counts[block] += heads

    @torch.no_grad()
    def _store(self, block: str, cond: torch.Tensor, spatial: tuple[int, int]) -> None:
        store = self.store
        maps = cond.mean(1)  # (Bc, N, T)
        if store.tokens is not None:
            outside = [t for t in store.tokens if not -maps.shape[-1] <= t < maps.shape[-1]]
            if outside:
                raise ValueError(f"AttentionStore(tokens=...) has positions {outside} outside the prompt's "
                                 f"{maps.shape[-1]} token positions (0-{maps.shape[-1] - 1}); take them from "
                                 "prkit.prompt_tokens or token_positions")
            maps = maps[..., store.tokens]
        h, w = spatial
        maps = store.pooled(maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], h, w).float())
        key = (block, self.step)
        count = store.layers.get(key, 0) + 1  # a running mean over the block's transformer layers (SDXL: up to 10)
        store.layers[key] = count
        maps = maps.cpu()
        store.maps[key] = maps if count == 1 else store.maps[key] + (maps - store.maps[key]) / count


class CaptureProcessor:
    """An ``attn2`` processor computing softmax(QK^T/sqrt(d)) explicitly and handing it to a CaptureState."""

    def __init__(self, state: CaptureState, block: str, layer: int):
        self.state = state
        self.block = block
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4 is not None:
            hidden_states = hidden_states.view(*shape4[:2], -1).transpose(1, 2)
        batch, tokens_q, _ = hidden_states.shape
        query, key, value = _heads(attn, hidden_states, encoder_hidden_states)
        if hidden_states.is_cuda and attention_mask is None and not self.state.wants_probs():
            # CUDA path: the concept maps through a second small SDPA (forked first, so that on the side stream
            # it overlaps this one), the output through the fused SDPA
            self.state.record_fused(self.block, self.layer, query, key, attn.scale)
            out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        else:
            # (B, h, N, T) in float32, as diffusers' upcast attention (SD2.x): float16 logits overflow; also under a
            # caller's torch.autocast, which would run these matmuls (and the maps' einsum) in half precision again
            with torch.autocast(hidden_states.device.type, enabled=False):
                scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
                if attention_mask is not None:
                    mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
                    scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1])
                probs = scores.softmax(dim=-1)  # maps from fp32 probabilities: half-precision rounding ties
                side = tuple(shape4[2:]) if shape4 is not None else self.state.spatial(self.block, tokens_q)
                self.state.record(self.block, self.layer, probs, side)  # them at the median: masks lose positions
            out = probs.to(value.dtype) @ value
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1])))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor if attn.rescale_output_factor != 1 else out


def _heads(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """Query (B, h, N, d), key and value (B, h, T, d) of one attention call, as diffusers' processors make them."""
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _split_processor_key(key: str) -> tuple[str, int] | None:
    """'down_blocks.0.attentions.0.transformer_blocks.3.attn2.processor' -> ('down_blocks.0.attentions.0', 3)."""
    if not key.endswith("attn2.processor") or ".transformer_blocks." not in key:
        return None
    block, rest = key.split(".transformer_blocks.", 1)
    return block, int(rest.split(".", 1)[0])


# diffusers' processors of plain attention, which CaptureProcessor computes the same way; any other (IP-Adapter's,
# Custom Diffusion's, ...) adds keys or weights of its own that a replacement would silently drop or fail on
REPLACEABLE_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0", "SlicedAttnProcessor",
                          "XFormersAttnProcessor", "AttnProcessorNPU", "XLAFlashAttnProcessor2_0")


def _check_replaceable(processors: dict) -> None:
    """Refuse, before anything is installed, an ``attn2`` whose processor CaptureProcessor cannot stand in for."""
    for key, proc in processors.items():
        kind = type(proc)
        if _split_processor_key(key) and not (kind.__name__ in REPLACEABLE_PROCESSORS
                                              and kind.__module__.startswith("diffusers.")):
            raise ValueError(f"{key} is {kind.__name__}, a processor prkit cannot replace: LAG and attention capture "
                             "(store=) support diffusers' plain attention processors "
                             f"({', '.join(REPLACEABLE_PROCESSORS)}), not IP-Adapter or other processors that add "
                             "keys of their own; sample with lag=False and no store, or unload the adapter first "
                             "(pipe.unload_ip_adapter())")


def _record_grid(state: CaptureState, block: str) -> Callable:
    """A forward pre-hook on a transformer block that records the (h, w) of its (B, C, h, w) input."""
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.ndim == 4:
            state.block_hw[block] = tuple(hidden.shape[-2:])
    return hook


@contextlib.contextmanager
def capture_attention(unet, state: CaptureState | None = None, *,
                      store: AttentionStore | None = None):
    """Install capturing processors on every ``attn2`` of ``unet`` for the duration of the block.

    The state's store, if any, is cleared as the capture begins (one capture, one run's maps).

    Args:
        unet: a pipeline (its UNet is captured, and under classifier-free guidance the store keeps the conditional
            rows only, read from the pipeline's call) or a diffusers UNet2DConditionModel alone (the store then keeps
            every row of the UNet's batch: under guidance [unconditional; conditional]).
        state: the CaptureState to fill (created when None; ``store`` is attached to it).
        store: an AttentionStore to fill with per-token maps for visualisation.
    Yields:
        the CaptureState (``state.store`` holds the maps afterwards).
    Raises:
        ValueError: an ``attn2`` has a processor prkit cannot replace (IP-Adapter's), or there is no ``attn2``.
    """
    if store is not None and not isinstance(store, AttentionStore):
        raise TypeError(f"store must be a prkit.AttentionStore to fill (store=AttentionStore()), got {store!r}")
    cfg = False
    if not isinstance(unet, nn.Module) and isinstance(getattr(unet, "unet", None), nn.Module):  # a pipeline
        from .lag_watch import pipeline_cfg

        if not hasattr(type(unet), "do_classifier_free_guidance"):
            raise ValueError(f"{type(unet).__name__} does not say whether it runs classifier-free guidance (no "
                             "do_classifier_free_guidance), so the store could not keep the prompt's rows only: "
                             "capture its UNet, capture_attention(pipe.unet, ...), whose store keeps every row "
                             "([unconditional; conditional] under guidance)")
        cfg, unet = pipeline_cfg(unet), unet.unet
    if getattr(unet, "_prkit_capture", None) is not None:
        raise RuntimeError("attention capture is already installed on this UNet; nest nothing, exit the first one")
    state = state or CaptureState(cfg=cfg, store=store)
    if store is not None:
        state.store = store
    original = unet.attn_processors
    _check_replaceable(original)
    processors = {}
    for key, proc in original.items():
        split = _split_processor_key(key)
        processors[key] = CaptureProcessor(state, *split) if split else proc
    if not any(isinstance(p, CaptureProcessor) for p in processors.values()):
        raise ValueError("this UNet has no cross-attention (attn2) layers to capture")
    blocks = [p for p in processors.values() if isinstance(p, CaptureProcessor)]
    state.layer_counts = {p.block: 1 + max(q.layer for q in blocks if q.block == p.block) for p in blocks}
    if state.store is not None:
        state.store.clear()
    root = original_module(unet)  # block names are those of the module a torch.compile wrapper holds
    hooks = [unet.register_forward_pre_hook(lambda *_: state.begin_step())]
    hooks += [root.get_submodule(block).register_forward_pre_hook(_record_grid(state, block), with_kwargs=True)
              for block in state.layer_counts]
    unet.set_attn_processor(processors)
    unet._prkit_capture = state
    try:
        yield state
    finally:
        state.join()
        for hook in hooks:
            hook.remove()
        unet.set_attn_processor(original)
        unet._prkit_capture = None
