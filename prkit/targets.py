"""What the personalization loop trains: personalized residuals (ours) or a baseline's parameters.

Each target is a callable ``(pipe, concept, config, name) -> handle`` whose handle has
``parameters()``, ``state_dict()``, ``load_state_dict()``, ``num_parameters()`` and ``remove()``; the
loop does the rest. A handle with ``needs_text_encoder = True`` trains the identifier's token
embedding, so the loop encodes the prompt with grad every step. ``RECIPES`` holds each target's
published defaults. Wrapped layers keep the original as ``base_layer``; ``remove()`` puts back the same objects.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .files import uncompiled
from .named_target import NamedParameters
from .peft_target import LORA_MODULES, PeftTarget, _check_unfused
from .residuals import add_residuals, original_module

def residual_target(pipe, concept, config, name: str):
    """Default target: personalized residuals on every proj_out."""
    return add_residuals(pipe.unet, config.rank, name, token=concept.token, class_word=concept.class_word,
                         seed=config.seed)


def lora_target(kind: str) -> Callable:
    """A peft LoRA target on the attention layers named by ``kind`` (rank: an int, a dict of block or layer path ->
    int, or 4 for a fraction)."""
    def make(pipe, concept, config, name: str) -> PeftTarget:
        rank = config.rank if isinstance(config.rank, (int, dict)) else 4
        device = next(pipe.unet.parameters()).device  # peft draws its gaussian start there
        # seeded for a reproducible start, without reseeding the caller's random streams (CPU and that GPU)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            target = PeftTarget(pipe.unet, name, LORA_MODULES[kind], rank)
        target.token, target.class_word = concept.token, concept.class_word
        return target
    return make


class _Row(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().float().clone())  # (D,) fp32 master


class TokenEmbedding(nn.Module):
    """A text encoder's token embedding whose identifier row is a separate trainable parameter.

    The table (``base_layer``) is never written, so every other row stays exactly as it was; the
    identifier's row is replaced by ``row`` wherever the token occurs. The row lives in a child module
    registered after the table: the encoder's first parameter stays the table's, so ``encoder.dtype`` (which
    diffusers casts prompt embeddings to) stays the model's half precision instead of the row's fp32.
    """

    def __init__(self, base_layer: nn.Embedding, token_id: int, init: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.token_id = int(token_id)
        self.trained = _Row(init)

    @property
    def row(self) -> nn.Parameter:
        """The identifier's trainable (D,) row."""
        return self.trained.weight

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (V, D), for code that reads the input embeddings' weight."""
        return self.base_layer.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(input_ids)  # (B, T, D)
        hit = (input_ids == self.token_id).unsqueeze(-1)  # (B, T, 1)
        return torch.where(hit, self.row.to(out.dtype), out)


class TrainableLinear(nn.Module):
    """A Linear layer whose weight trains as an fp32 copy; the original layer is kept untouched as ``base_layer``."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.weight = nn.Parameter(base_layer.weight.detach().float().clone())  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return F.linear(x, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _text_encoders(pipe) -> list[tuple[str, nn.Module, object]]:
    """(attribute, text encoder, its tokenizer) for each text encoder of the pipeline (two for SDXL)."""
    pairs = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    return [(te, getattr(pipe, te), getattr(pipe, tok)) for te, tok in pairs if getattr(pipe, te, None) is not None]


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


class TokenTarget(NamedParameters):
    """Textual Inversion: only the identifier's token embedding trains (one row per text encoder).

    Args of the constructor are the target's ``(pipe, concept, config, name)``; ``init`` picks the row's
    start: "class_word" (the mean embedding of the class word's tokens, TI's initializer word) or "token"
    (the identifier's own, rare-token embedding).
    """

    needs_text_encoder = True

    def __init__(self, pipe, concept, config, name: str, init: str = "class_word"):
        self.name, self.token, self.class_word = name, concept.token, concept.class_word
        self.meta: dict = {}
        self.encoders: dict[str, tuple[nn.Module, TokenEmbedding]] = {}
        try:
            for attr, encoder, tokenizer in _text_encoders(pipe):
                base = encoder.get_input_embeddings()
                if isinstance(base, TokenEmbedding):
                    raise ValueError(f"{attr} already has a trained token row; remove() that target first")
                ids = _token_ids(tokenizer, concept.token)
                if len(ids) != 1:
                    raise ValueError(f"identifier {concept.token!r} is {len(ids)} tokens for {attr}'s tokenizer; token "
                                     "targets train one embedding row: pick a single-token identifier such as 'sks'")
                start = base.weight[_token_ids(tokenizer, concept.class_word)].mean(0) if init == "class_word" \
                    else base.weight[ids[0]]
                wrapper = TokenEmbedding(base, ids[0], start)
                encoder.set_input_embeddings(wrapper)
                self.encoders[attr] = (encoder, wrapper)
        except Exception:
            self.remove()
            raise
        if not self.encoders:
            raise ValueError("this pipeline has no text encoder to hold the identifier's embedding")

    def named(self) -> dict[str, nn.Parameter]:
        return {f"{attr}.token_embedding.{self.token}": w.row for attr, (_, w) in self.encoders.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in self.named().items():
            p.copy_(state[n])

    def remove(self) -> None:
        """Put the original embedding modules back (the very same objects)."""
        for encoder, wrapper in self.encoders.values():
            if encoder.get_input_embeddings() is wrapper:
                encoder.set_input_embeddings(wrapper.base_layer)
        self.encoders = {}


class CustomDiffusionTarget(TokenTarget):
    """Custom Diffusion: every cross-attention K/V projection (attn2.to_k, attn2.to_v) trained fully, plus the
    identifier's token embedding (started from the identifier's own rare-token embedding)."""

    def __init__(self, pipe, concept, config, name: str):
        self.layers: dict[str, tuple[nn.Module, str, TrainableLinear]] = {}  # "<attn2 path>.to_k" -> parent, attr
        _check_unfused(pipe.unet, "Custom Diffusion", ["attn2.to_k", "attn2.to_v"])
        super().__init__(pipe, concept, config, name, init="token")
        try:
            for path, module in original_module(pipe.unet).named_modules():  # plain names, compiled or not
                if path.endswith("attn2") and hasattr(module, "to_k"):
                    for attr in ("to_k", "to_v"):
                        wrapper = TrainableLinear(getattr(module, attr))
                        setattr(module, attr, wrapper)
                        self.layers[f"{path}.{attr}"] = (module, attr, wrapper)
        except Exception:
            self.remove()
            raise
        if not self.layers:
            self.remove()
            raise ValueError("this UNet has no cross-attention (attn2) layers")

    def named(self) -> dict[str, nn.Parameter]:
        return {**super().named(), **{f"unet.{k}.weight": w.weight for k, (_, _, w) in self.layers.items()}}

    def remove(self) -> None:
        """Put the original K/V layers and embeddings back (the very same objects)."""
        for parent, attr, wrapper in self.layers.values():
            if getattr(parent, attr) is wrapper:
                setattr(parent, attr, wrapper.base_layer)
        self.layers = {}
        super().remove()


# UNet -> its latest DreamBooth target (dead, or with no params once removed)
_DREAMBOOTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FullUNetTarget(NamedParameters):
    """DreamBooth: every UNet parameter trains. The original weights are kept on the CPU; ``remove`` restores
    them bit for bit (values and dtypes). The loop trains fp32 master weights (validation images are sampled under
    autocast to ``base_dtype``) and calls ``after_training`` at the end, which casts them back to the base's dtypes."""

    needs_text_encoder = False
    trains_whole_unet = True  # no frozen half-precision weight is left for another autocast dtype to clash with

    def __init__(self, pipe, concept, config, name: str):
        self.unet, self.name, self.token, self.class_word = pipe.unet, name, concept.token, concept.class_word
        self.meta: dict = {}
        self.params = dict(original_module(pipe.unet).named_parameters())  # plain names, compiled or not
        self.saved = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        self.base_dtype = pipe.unet.dtype  # the UNet's as stored: what the pipeline feeds it when sampling
        plain = original_module(pipe.unet)
        earlier = _DREAMBOOTH.get(plain, lambda: None)()
        # a checkpoint refused for its weights says why: an earlier call's DreamBooth weights, never removed
        self.stamp_note = (" The UNet holds the weights of an earlier DreamBooth call, still on the model: its "
                           "result.residuals.remove() restores the base model, then call again to resume."
                           if earlier is not None and earlier.params else "")
        _DREAMBOOTH[plain] = weakref.ref(self)  # (not on the UNet itself: torch.save(unet) cannot pickle a weakref)

    def named(self) -> dict[str, nn.Parameter]:
        return self.params

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = {uncompiled(k): v for k, v in state.items()}  # also one saved from a compiled UNet before plain names
        for n, p in self.params.items():
            p.copy_(state[n])

    @torch.no_grad()
    def after_training(self) -> None:
        """Cast the trained weights to the base model's dtypes (a no-op in fp32)."""
        for n, p in self.params.items():
            if p.dtype != self.saved[n].dtype:
                p.data = p.data.to(self.saved[n].dtype)

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the original weights exactly."""
        for n, p in self.params.items():  # requires_grad stays as train_residuals left it: the model's own flags
            p.data = self.saved[n].to(p.device, copy=True)
        self.saved, self.params = {}, {}


# Published default recipes: lr (before scaling), optimizer steps, rank (low-rank targets), batch size;
# scale_lr multiplies lr by the batch size, as Custom Diffusion's --scale_lr does. The data pipeline
# (crops, flips, prompt template, AdamW, weight decay) is the loop's and the same for every target.
RECIPES: dict[str, dict] = {
    "residuals": dict(learning_rate=1e-3, steps=150, rank=0.05, batch_size=4, scale_lr=False,
                      source="the paper (METHOD.md section 1)"),
    "lora": dict(learning_rate=1e-4, steps=500, rank=4, batch_size=1, scale_lr=False,
                 source="diffusers examples/dreambooth README_lora (train_dreambooth_lora.py)"),
    "attn_kv": dict(learning_rate=1e-4, steps=500, rank=4, batch_size=1, scale_lr=False, source="lora's (ablation)"),
    "attn_out": dict(learning_rate=1e-4, steps=500, rank=4, batch_size=1, scale_lr=False, source="lora's (ablation)"),
    "custom_diffusion": dict(learning_rate=1e-5, steps=250, rank=None, batch_size=2, scale_lr=True,
                             source="Custom Diffusion README / diffusers train_custom_diffusion.py (--scale_lr)"),
    "textual_inversion": dict(learning_rate=5e-3, steps=3000, rank=None, batch_size=4, scale_lr=False,
                              source="Textual Inversion (base lr 5e-3); 3000 steps of batch 4 as diffusers' example"),
    "dreambooth": dict(learning_rate=5e-6, steps=400, rank=None, batch_size=1, scale_lr=False,
                       source="diffusers examples/dreambooth README (400 steps; 800 with prior preservation)"),
}


def recipe(name: str, **overrides) -> dict:
    """TrainConfig fields of target ``name``'s published recipe.

    Args:
        name: a TARGETS key.
        **overrides: recipe keys (learning_rate before scaling, steps, rank, batch_size, scale_lr) or any
            other TrainConfig field (seed, mixed_precision, prior_images, ...).
    Returns:
        a dict for ``TrainConfig(**...)``, with ``target`` set and the learning rate scaled where the recipe says.
    """
    if name not in RECIPES:
        raise KeyError(f"no recipe for target {name!r}; known: {', '.join(RECIPES)}")
    merged = {**RECIPES[name], **overrides}
    out = {k: v for k, v in merged.items() if k not in ("scale_lr", "source", "rank")}
    if merged.get("rank") is not None:
        out["rank"] = merged["rank"]
    if merged.get("scale_lr") and None not in (merged["learning_rate"], merged["batch_size"]):  # None: the default
        out["learning_rate"] = merged["learning_rate"] * merged["batch_size"]  # (train_residuals scales it there)
    return {**out, "target": name}


TARGETS: dict[str, Callable] = {"residuals": residual_target, **{k: lora_target(k) for k in LORA_MODULES},
                                "custom_diffusion": CustomDiffusionTarget, "textual_inversion": TokenTarget,
                                "dreambooth": FullUNetTarget}
