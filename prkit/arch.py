"""Published architecture configs of SD1.5, SD2.1 and SDXL (UNet, text encoders, VAE).

For tests and benchmarks that need full-size shapes without downloading weights. Building a model
from these gives random weights; build on ``torch.device("meta")`` to count parameters for free.
"""

from __future__ import annotations

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

UNET_CONFIGS: dict[str, dict] = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    "sd21": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                 upcast_attention=True, norm_num_groups=32),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32),
}

TEXT_CONFIGS: dict[str, dict] = {  # CLIPTextConfig kwargs
    "sd15": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "sd21": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512),
}

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
                  scaling_factor=0.18215)


def build_unet(name: str, device="cpu", dtype=None):
    """A randomly initialised full-size UNet2DConditionModel of ``name`` (sd15, sd21, sdxl)."""
    import torch
    from diffusers import UNet2DConditionModel

    if name not in UNET_CONFIGS:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(UNET_CONFIGS)}")
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[name])
    return unet.to(dtype) if dtype is not None else unet
