"""Tiny Stable Diffusion components built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "sks", "zwx", "dog", "teapot", "cat", "on", "the", "beach", "next", "to",
         "in", "snow", "red", "ball", "picture", "with", "grass"]


def write_tokenizer(folder: Path, words=WORDS, max_length: int = 16) -> Path:
    """A CLIPTokenizer folder whose listed words are single tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if " ".join(pair) not in merges:
                merges.append(" ".join(pair))
            if merged not in vocab:
                vocab.append(merged)
            pieces = [merged] + pieces[2:]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": max_length, "do_lower_case": True, "pad_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer"}))
    return folder


def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tokenizer(folder)))


def tiny_unet(linear: bool = False, sdxl_like: bool = False, seed: int = 0):
    """A UNet with conv (SD1) or linear (SD2/SDXL) proj_out and 2+ transformer-block resolutions."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, use_linear_projection=linear)
    if sdxl_like:
        kwargs.update(transformer_layers_per_block=(1, 2))
    return UNet2DConditionModel(**kwargs).eval()


def tiny_text_encoder(vocab_size: int, max_length: int = 16, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16).eval()


def tiny_pipeline(folder: Path, linear: bool = False):
    """A StableDiffusionPipeline on 16x16 images (8x8 latents)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = tiny_tokenizer(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(linear), vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer, scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A randomly initialized CLIPModel (32 px images, 16-d projections) with the tiny tokenizer, saved to folder."""
    from transformers import CLIPConfig, CLIPModel

    write_tokenizer(folder, WORDS, max_length=16)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=200, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return folder


def tiny_vit(folder: Path, seed: int = 0) -> Path:
    """A randomly initialized ViTModel (32 px, patch 8) saved to folder: a stand-in for DINO ViT-S/16."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(folder)
    return folder
