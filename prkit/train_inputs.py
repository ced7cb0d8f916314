"""What a training step is fed: the conditioning of the training prompt (SDXL's pooled text and size ids
included), the images' latent distributions cached once, noisy batches drawn from them with the loss target of the
model's prediction type, and the noise schedule the model was trained with."""

from __future__ import annotations

import inspect

import torch

@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of images (N, 3, H, W) in [-1, 1], scaled: each (N, 4, H/f, W/f)."""
    vae = pipe.vae
    # a VAE whose config says it overflows in float16 (SDXL's) encodes in float32, as diffusers' pipelines run it
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    means, stds = [], []
    if upcast:
        vae.to(torch.float32)
    try:
        device, dtype = vae.device, vae.dtype  # read once: each read walks the VAE's modules (diffusers)
        for chunk in images.split(batch):
            dist = vae.encode(chunk.to(device, dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    finally:
        if upcast:
            vae.to(torch.float16)
    mean, std = torch.cat(means), torch.cat(stds)
    bad = (~torch.isfinite(mean).flatten(1).all(1) | ~torch.isfinite(std).flatten(1).all(1)).nonzero().flatten()
    if len(bad):
        why = ("a float16 VAE overflows on some images: run it in float32 (pipe.vae.to(torch.float32)) or use an "
               "fp16-safe VAE" if vae.dtype == torch.float16 and not upcast else
               "check those images (NaN or infinite pixels?)")
        raise ValueError(f"the VAE encoded {len(bad)} of {len(mean)} training images (numbers "
                         f"{bad.tolist()[:8]}, flips counted after the originals) to NaN or infinite latents, "
                         f"which would make every loss NaN; {why}")
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean - shift) * scale, std * scale


def encode_text(pipe, prompt: str, size: int | tuple[int, int], grad: bool = False) -> dict:
    """UNet conditioning for one prompt: {'encoder_hidden_states': (1, T, D)[, 'added_cond_kwargs': ...]}.

    ``grad``: keep the graph (targets that train the identifier's token embedding).
    """
    device = pipe.unet.device
    with torch.set_grad_enabled(grad):
        if hasattr(pipe, "text_encoder_2"):  # SDXL
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(pipe, size).to(device, embeds.dtype)}
            return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}
        embeds, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}


def sdxl_time_ids(pipe, size: int | tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image of ``size`` (height, width) shown at that size, as sampling
    gives it: original size, crop (0, 0), then the target size, or the aesthetic score (6.0, the img2img
    pipelines' default) for a refiner-style UNet (``requires_aesthetics_score``)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    ids = [*size, 0, 0]
    ids += [6.0] if getattr(pipe.config, "requires_aesthetics_score", False) else [*size]
    unet = pipe.unet.config
    dim = pipe.text_encoder_2.config.projection_dim
    wanted = unet.projection_class_embeddings_input_dim
    if unet.addition_time_embed_dim * len(ids) + dim != wanted:
        raise ValueError(f"this SDXL UNet takes {wanted} added-condition features, but {len(ids)} time ids and "
                         f"pooled text of {dim} give {unet.addition_time_embed_dim * len(ids) + dim}: set the "
                         "pipeline's requires_aesthetics_score to match its UNet (base: False, refiner: True)")
    return torch.tensor([ids], dtype=torch.float32)


def _expand(cond: dict, batch: int) -> dict:
    out = {"encoder_hidden_states": cond["encoder_hidden_states"].expand(batch, -1, -1)}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: v.expand(batch, *v.shape[1:]) for k, v in cond["added_cond_kwargs"].items()}
    return out


class _Cache:
    """Latents (mean/std of both flips) and conditioning of one image set, computed once.

    ``latents_in``: an executor (the fast loop's background thread) that encodes the images, handed them before the
    prompt is encoded here, so that both run at once; ``encode_latents()`` waits for it and raises its error. None:
    both here, now. Either way the numbers are the same.
    """

    def __init__(self, pipe, concept, prompt: str, flip: bool, encode_batch: int = 8, latents_in=None):
        self.size = concept.size()  # (height, width): SDXL's size conditioning
        for image in concept.images:  # decoded here: a lazily opened one is read once, not by two threads at once
            image.load()  # (the executor's pixels, the checkpoint's fingerprint); load_concept's are decoded already
        self.mean = self.std = None
        self._pending = (pipe, concept, flip, encode_batch)
        self._future = latents_in.submit(self._encode) if latents_in is not None else None
        self.cond = encode_text(pipe, prompt, self.size)
        if latents_in is None:
            self.encode_latents()

    def _encode(self) -> None:
        pipe, concept, flip, batch = self._pending  # the pixels are read here too: in the executor's thread, if any
        images = concept.tensors()
        if flip:
            images = torch.cat([images, torch.flip(images, dims=[3])])
        means_stds = encode_images(pipe, images, batch=batch)
        self.mean, self.std = (t.cpu() for t in means_stds)  # batches are drawn on the CPU
        self._pending = None

    def encode_latents(self) -> "_Cache":
        """Encode the images (once), or wait for the executor that does; returns the cache."""
        if self._future is not None:
            self._future.result()
            self._future = None
        elif self._pending is not None:
            self._encode()
        return self

    def batch(self, size: int, gen: torch.Generator, scheduler, device) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(self.mean), (size,), generator=gen)
        latents = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, steps)
        kind = scheduler.config.prediction_type
        target = {"epsilon": noise, "sample": latents}.get(kind)
        if target is None:
            target = scheduler.get_velocity(latents, noise, steps)  # v_prediction (training_scheduler checked it)
        return noisy.to(device), steps.to(device), target.to(device)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def training_scheduler(pipe):
    """The DDPM noise schedule the model was trained with, read from the pipeline's scheduler.

    diffusers' ``from_config`` drops the keys a config lists in ``_use_default_values`` (settings its scheduler
    took from its own defaults), so DDPM's defaults (``linear`` 0.0001-0.02) would replace, say, an
    ``LCMScheduler()``'s SD schedule; those keys are kept here. A scheduler without a DDPM schedule (EDM, flow
    matching) or feeding the UNet continuous timesteps is refused.
    """
    from diffusers import DDPMScheduler

    if not any(key in pipe.scheduler.config for key in ("beta_schedule", "trained_betas")):
        raise ValueError(f"the pipeline's scheduler, {type(pipe.scheduler).__name__}, describes no DDPM noise schedule "
                         "(an EDM or flow-matching sampler): training supports models trained on a DDPM schedule "
                         "(SD1.x, SD2.x, SDXL), whose pipelines' schedulers give their betas")
    if pipe.scheduler.config.get("timestep_type") == "continuous" and \
            pipe.scheduler.config.get("prediction_type") == "v_prediction":  # as Euler's set_timesteps reads them
        raise ValueError(f"the pipeline's scheduler, {type(pipe.scheduler).__name__}, feeds the UNet continuous "
                         "timesteps (timestep_type='continuous' with v_prediction: 0.25 log sigma, an EDM-style "
                         "model), not the DDPM timesteps 0-999 that training draws: training supports models trained "
                         "on discrete DDPM timesteps (SD1.x, SD2.x, SDXL)")
    # DDPM's own settings only: a sampler's others (LCM's timestep_scaling) made diffusers warn at every run that the
    # model's scheduler_config.json is wrong
    own = inspect.signature(DDPMScheduler.__init__).parameters
    scheduler = DDPMScheduler.from_config({k: v for k, v in pipe.scheduler.config.items() if k in own})
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"the pipeline's scheduler predicts {kind!r}; training supports {', '.join(PREDICTION_TYPES)}"
                         ": set pipe.scheduler's prediction_type to the one the model was trained for")
    return scheduler
