"""What ``train_residuals`` checks of a pipeline before it changes anything: the parts training uses (none None), a
UNet on one device (not offloaded), weights loaded (not on the meta device), no residual set merged into them, a
text-to-image UNet (the noisy latents, the timestep and the text its only inputs), a mixed precision the stored
weights can run in. Refusals only, each naming the part and the way out; no training here.
"""

from __future__ import annotations

import torch

from .pipeline import offloading
from .residual_switches import merged_sets
from .targets import TARGETS


def _check_not_offloaded(unet) -> None:
    mode = offloading(unet)
    if mode is not None:
        undo = ("pipe.remove_all_hooks(), then pipe.to('cuda')" if mode == "accelerate" else
                "load the pipeline again without enable_group_offload")
        raise ValueError(
            f"train_residuals: the pipeline's UNet is offloaded to the CPU between calls ({mode} offloading), so it "
            f"has no one device to train on. Train without offloading ({undo}), save the residuals, and offload "
            "again for sampling: generate() works with residuals on an offloaded pipeline")


def _check_parts(pipe) -> None:
    """Refuse a pipeline without a part that training uses: the VAE (it encodes the images), the tokenizer and text
    encoder (the prompt; an SDXL pipeline's second pair, and its first too unless the UNet takes the second's text
    alone, as a refiner's does). Training failed inside diffusers, its set already added, with "'NoneType' object has
    no attribute 'config'", or torch's "Expected size for first two dimensions of batch2 tensor" (an SDXL base)."""
    second = getattr(pipe, "text_encoder_2", None)
    parts = ["tokenizer_2", "text_encoder_2"] if hasattr(pipe, "text_encoder_2") else []
    if not parts or second is not None and pipe.unet.config.cross_attention_dim != second.config.hidden_size:
        parts += ["tokenizer", "text_encoder"]  # (an SDXL base's UNet takes both encoders' text, side by side)
    missing = next((part for part in ["vae", *parts] if getattr(pipe, part, None) is None), None)
    if missing is not None:
        raise ValueError(f"train_residuals: the pipeline's {missing} is None: training encodes the concept's images "
                         "with the VAE and its prompt with the model's tokenizers and text encoders. Load the "
                         f"pipeline with its {missing} (prkit.load_pipeline(...), or pipe.{missing} = ... from the "
                         f"model's {missing}/ folder) and train again")


def _check_not_empty(pipe) -> None:
    """Refuse a pipeline whose UNet, VAE or text encoder has weights on the meta device (built empty, under
    accelerate's ``init_empty_weights`` or ``torch.device("meta")``, and never loaded): training failed in the text
    encoder with torch's "Cannot copy out of meta tensor; no data!", naming neither the model nor the way out."""
    for what in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, what, None)
        if not isinstance(module, torch.nn.Module) or offloading(module) is not None:  # offloaded: hooks bring them
            continue
        empty = next((n for n, p in module.named_parameters() if p.device.type == "meta"), None)
        if empty is not None:
            raise ValueError(
                f"train_residuals: the pipeline's {what} has no weights: {empty!r} is on the meta device (a model "
                "built empty, e.g. under accelerate's init_empty_weights, whose weights were never loaded). Load "
                f"them (prkit.load_pipeline(...), or load_state_dict(..., assign=True) on pipe.{what}) and train "
                "again")


def _check_precision(config, unet) -> None:
    wanted = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    stored = unet.dtype
    whole = getattr(TARGETS[config.target], "trains_whole_unet", False)  # fp32 master copies of every weight
    if wanted is not None and stored in (torch.bfloat16, torch.float16) and stored != wanted and not whole:
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        raise ValueError(  # word for word as cli_output._halves rewords it for the command line
            f"mixed_precision={config.mixed_precision!r} on a UNet stored in {names[stored]}: the two half precisions "
            f"cannot mix in one step. Use mixed_precision='auto' or {names[stored]!r}, or load the pipeline in "
            f"{config.mixed_precision} (prkit.load_pipeline(..., dtype={config.mixed_precision!r}))")


_MORE_CHANNELS = {9: "an inpainting UNet, which takes a mask and a masked image too",
                  8: "an InstructPix2Pix UNet, which takes an image's latents too"}


def _check_text_to_image(pipe) -> None:
    """Refuse a UNet that takes more than the noisy latents, the timestep and the text (with SDXL's added conditions
    in an SDXL pipeline): an inpainting or InstructPix2Pix UNet, a class-conditioned one (an upscaler's, unCLIP's),
    an SDXL UNet in a pipeline without SDXL's second text encoder, one with an IP-Adapter loaded. Training failed at
    its first step, its set already added, with torch's "expected input[4, 4, 64, 64] to have 9 channels" or
    diffusers' "class_labels should be provided" or "argument of type 'NoneType' is not iterable"."""
    config, say = pipe.unet.config, "train_residuals: the pipeline's UNet"
    way_out = ("train on the text-to-image model of the same family (SD1.x, SD2.x, SDXL: prkit.load_pipeline), whose "
               "UNet takes the noisy latents, the timestep and the text")
    latents = getattr(getattr(getattr(pipe, "vae", None), "config", None), "latent_channels", None)
    if latents is not None and config.in_channels != latents:
        kind = _MORE_CHANNELS.get(config.in_channels, "a UNet conditioned on more than the noisy latents")
        raise ValueError(f"{say} takes {config.in_channels} input channels, but its VAE's latents have {latents} "
                         f"({kind}); {way_out}")
    labels = [f"{key}={getattr(config, key, None)!r}" for key in ("class_embed_type", "num_class_embeds")
              if getattr(config, key, None) is not None]
    if labels:
        raise ValueError(f"{say} is class-conditioned ({', '.join(labels)}): it takes class_labels (an upscaler's "
                         f"noise level, unCLIP's image embedding), which training has none of; {way_out}")
    projected = getattr(config, "encoder_hid_dim_type", None)
    if projected == "ip_image_proj":
        raise ValueError(f"{say} has an IP-Adapter loaded (encoder_hid_dim_type='ip_image_proj'), which wants an image "
                         "prompt at every call and training has none: unload it while the residuals train "
                         "(pipe.unload_ip_adapter()), then load it again (pipe.load_ip_adapter(...)) to sample with "
                         "both")
    if projected in ("image_proj", "text_image_proj"):
        raise ValueError(f"{say} takes image embeddings (encoder_hid_dim_type={projected!r}), which training does "
                         f"not give; {way_out}")
    added = getattr(config, "addition_embed_type", None)
    if added == "text_time" and not hasattr(pipe, "text_encoder_2"):  # as encode_text tells an SDXL pipeline
        raise ValueError(f"{say} takes SDXL's added conditions (addition_embed_type='text_time'), which a "
                         f"{type(pipe).__name__} does not give: load the model as a StableDiffusionXLPipeline "
                         "(prkit.load_pipeline)")
    if added not in (None, "text_time"):
        raise ValueError(f"{say} takes added conditions of kind addition_embed_type={added!r} (a Kandinsky or "
                         f"DeepFloyd IF UNet), which training does not give; {way_out}")


def _check_none_merged(unet, name: str) -> None:
    """Refuse training beside a set merged into the base weights (the new set would learn on top of it, which no
    switch can take off while it trains), saying how to train beside it; only_residuals refused it in generate's
    words, "or pass them in residuals=", which train_residuals has none of."""
    merged = merged_sets(unet, besides={name})
    if merged:
        how = f"prkit.get_residuals(pipe.unet, {merged[0]!r}).unmerge()" if len(merged) == 1 else \
            "prkit.get_residuals(pipe.unet, name).unmerge() for each"
        raise ValueError(f"train_residuals: residual set(s) {merged} are merged into the base weights, so the new set "
                         f"would train on top of them: unmerge() them first ({how}), train, and merge again after")
