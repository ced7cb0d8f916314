"""What the personalization loop trains: personalized residuals (ours) or a baseline's parameters.

Each target is a function ``(pipe, concept, config, name) -> handle`` whose handle has
``parameters()``, ``state_dict()``, ``load_state_dict()`` and ``num_parameters()``; the loop does
the rest. Baselines that need the text encoder in the loop (Textual Inversion, Custom Diffusion's
token) are not here yet.
"""

from __future__ import annotations

from typing import Callable

import torch

from .residuals import add_residuals

# peft module-name suffixes of each attention target (diffusers UNet naming)
LORA_MODULES = {
    "lora": ["to_q", "to_k", "to_v", "to_out.0"],  # diffusers DreamBooth-LoRA recipe: every attention
    "attn_kv": ["attn2.to_k", "attn2.to_v"],  # cross-attention K/V (Custom Diffusion's layers)
    "attn_out": ["attn1.to_out.0", "attn2.to_out.0"],  # attention output projections
}


class PeftTarget:
    """A peft LoRA adapter on the UNet, trained by the same loop."""

    def __init__(self, unet, name: str, modules: list[str], rank: int):
        from peft import LoraConfig

        self.unet, self.name = unet, name
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules),
                         adapter_name=name)
        self.token = self.class_word = None
        self.meta: dict = {}

    def named(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n and f".{self.name}." in n}

    def parameters(self):
        return iter(self.named().values())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.named().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in self.named().items():
            p.copy_(state[n])

    def remove(self) -> None:
        """Take the adapter off the UNet."""
        self.unet.delete_adapters(self.name)


def residual_target(pipe, concept, config, name: str):
    """Default target: personalized residuals on every proj_out."""
    return add_residuals(pipe.unet, config.rank, name, token=concept.token, class_word=concept.class_word,
                         seed=config.seed)


def lora_target(kind: str) -> Callable:
    """A peft LoRA target on the attention layers named by ``kind`` (rank: int, or 4 for fractions)."""
    def make(pipe, concept, config, name: str) -> PeftTarget:
        rank = config.rank if isinstance(config.rank, int) else 4
        torch.manual_seed(config.seed)
        target = PeftTarget(pipe.unet, name, LORA_MODULES[kind], rank)
        target.token, target.class_word = concept.token, concept.class_word
        return target
    return make


TARGETS: dict[str, Callable] = {"residuals": residual_target, **{k: lora_target(k) for k in LORA_MODULES}}
