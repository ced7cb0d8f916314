"""The peft LoRA baselines' target: a LoRA adapter on the UNet's attention layers (which ones: ``LORA_MODULES``),
its ranks (one, or per block or layer), and taking it off again, the user's own adapters left as they were.
Knows nothing of the loop; ``targets`` lists it with the other targets."""

from __future__ import annotations

import re
from collections import Counter

import torch

from .files import uncompiled
from .named_target import NamedParameters
from .residuals import original_module

# peft module-name suffixes of each attention target (diffusers UNet naming)
LORA_MODULES = {
    "lora": ["to_q", "to_k", "to_v", "to_out.0"],  # diffusers DreamBooth-LoRA recipe: every attention
    "attn_kv": ["attn2.to_k", "attn2.to_v"],  # cross-attention K/V (Custom Diffusion's layers)
    "attn_out": ["attn1.to_out.0", "attn2.to_out.0"],  # attention output projections
}


class PeftTarget(NamedParameters):
    """A peft LoRA adapter on the UNet, trained by the same loop."""

    def __init__(self, unet, name: str, modules: list[str], rank: int | dict[str, int]):
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.unet, self.name = unet, name
        _check_unfused(unet, "A LoRA target", modules)
        rank, pattern = _peft_ranks(unet, modules, rank)
        # the adapters each layer had on (add_adapter turns all but this one off; remove() puts them back)
        self.active = {key: list(m.active_adapters) for key, m in original_module(unet).named_modules()
                       if isinstance(m, BaseTunerLayer)}
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules,
                                    rank_pattern=pattern, alpha_pattern=pattern), adapter_name=name)
        self.token = self.class_word = None
        self.meta: dict = {}

    def named(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in original_module(self.unet).named_parameters()  # plain names, compiled or not
                if "lora_" in n and f".{self.name}." in n}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """``state`` into the adapter's factors, also one saved under another adapter name (a checkpoint of the run
        trained as ``name='a'``, resumed as ``'b'``: residual sets resume so, this failed as a key of ``'b'``) or
        from a compiled UNet before the names were plain ('_orig_mod.')."""
        state = {self._as_own(uncompiled(k)): v for k, v in state.items()}
        for n, p in self.named().items():
            p.copy_(state[n])

    def _as_own(self, key: str) -> str:
        """``key`` (``<layer>.lora_A.<adapter>.weight``) with this target's adapter name."""
        for part in (".lora_A.", ".lora_B."):
            layer, found, rest = key.partition(part)
            if found and "." in rest:
                return f"{layer}{part}{self.name}.{rest.rsplit('.', 1)[1]}"
        return key

    def remove(self) -> None:
        """Take the adapter off the UNet (out of the base weights first where ``pipe.fuse_lora()`` fused it: to float
        rounding, as diffusers' ``unfuse_lora``), and peft's wrapper off every layer that holds no other adapter
        (peft's ``delete_adapters`` leaves them: state-dict keys renamed to ``...base_layer.weight``)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        root = original_module(self.unet)
        if self.name not in (getattr(root, "peft_config", None) or {}):
            return  # removed already
        flags = [(p, p.requires_grad) for p in root.parameters()]  # peft's set_adapter flips the other adapters'
        for module in root.modules():  # pipe.fuse_lora() put it into the base weights, where peft's delete leaves it
            if isinstance(module, BaseTunerLayer) and self.name in getattr(module, "merged_adapters", ()):
                module.unmerge()  # (another adapter fused there is unfused with it: it applies unfused, if active)
        self.unet.delete_adapters(self.name)
        for key, module in list(root.named_modules()):
            if not isinstance(module, BaseTunerLayer) or not hasattr(module, "base_layer"):
                continue
            if any(len(getattr(module, attr, ())) for attr in module.adapter_layer_names):
                continue  # another adapter (a LoRA the user loaded) still lives here
            parent, _, child = key.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, child, module.get_base_layer())
        for key, module in root.named_modules():  # peft's delete_adapter turned the first other adapter on instead
            if isinstance(module, BaseTunerLayer) and key in self.active and module.active_adapters != self.active[key]:
                module.set_adapter(self.active[key])
        for p, was in flags:
            p.requires_grad_(was)
        if not getattr(root, "peft_config", None) and hasattr(root, "peft_config"):
            del root.peft_config
            root._hf_peft_config_loaded = False


def _check_unfused(unet, what: str, layers: list[str]) -> None:
    """Refuse training ``layers`` (attention layer names) where diffusers' fused projections (``fuse_qkv_projections``:
    to_qkv / to_kv) would route the attention past them: they would never train, nor count when sampling."""
    if not any(layer.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") for layer in layers):
        return
    fused = [n for n, m in original_module(unet).named_modules() if getattr(m, "fused_projections", False)
             and type(getattr(m, "processor", None)).__name__.startswith("Fused")]
    if fused:
        raise ValueError(f"{what} trains the attention's {', '.join(layers)} layers, but this UNet's "
                         f"attention projections are fused ({fused[0]!r} and {len(fused) - 1} more run through "
                         "to_qkv / to_kv, past them): call pipe.unfuse_qkv_projections() before training, and "
                         "fuse them again after it if you like")


def _peft_ranks(unet, modules: list[str], rank: int | dict[str, int]) -> tuple[int, dict[str, int]]:
    """peft's rank and ``rank_pattern`` (alpha alike: scale 1) for ``rank``: one int, or a dict whose keys name a block
    or layer of the UNet by its path or a prefix of it ("down_blocks.1", "mid_block.attentions.0"), the longest
    match ruling each layer; every layer needs one, and every key must hold a layer."""
    if not isinstance(rank, dict):
        return rank, {}
    from .residual_blocks import find_projections

    for key, value in rank.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rank given for {key!r}: a LoRA layer's rank is a whole rank >= 1, got {value!r}")
    names = [n for n, _ in original_module(unet).named_modules()]
    layers = [n for n in names if any(n == m or n.endswith(f".{m}") for m in modules)]  # as peft finds them
    held = {k: [n for n in layers if n == k or n.startswith(f"{k}.")] for k in rank}
    blocks = ", ".join(map(repr, find_projections(unet)))
    unknown = [k for k, found in held.items() if not found]
    if unknown:
        raise ValueError(f"rank names {', '.join(map(repr, unknown))}, which holds none of this LoRA target's layers "
                         f"({', '.join(modules)}); name them by block ({blocks}) or by a layer's path under one")
    ruling = {n: max((k for k, found in held.items() if n in found), key=len, default=None) for n in layers}
    missing = [n for n, k in ruling.items() if k is None]
    if missing:
        more = f" and {len(missing) - 1} more" if missing[1:] else ""
        raise ValueError(f"no rank for LoRA layer {missing[0]!r}{more}: give a rank for every block ({blocks}), or "
                         "for a prefix of them (e.g. 'up_blocks')")
    ranks = {n: rank[k] for n, k in ruling.items()}
    return Counter(ranks.values()).most_common(1)[0][0], {re.escape(n): r for n, r in ranks.items()}
