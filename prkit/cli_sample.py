"""``prkit sample``: the command's checks before the model loads, residual sets and LoRAs on the pipeline, and
the images written whole, numbered after those already in ``--out``, each with what made it as PNG text."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

from .cli_args import MAX_IMAGES, _check_loras, _per_file, _writable_folder, bars_wanted


def _sample(args) -> int:
    from .atomic import atomic_path, write_error
    from .files import load_residuals, read_metadata
    from .lag import LAGConfig
    from .residuals import usable_set_name
    from .pipeline import check_available, load_pipeline, resolve_device, resolve_dtype
    from .sample import generate

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a folder for the images")
    _writable_folder(out, "--out", listed=True)
    for path in args.residuals:  # readable prkit files, checked before the model loads
        read_metadata(path)
    resolved = [Path(p).resolve() for p in args.residuals]
    twice = sorted({str(p) for p, r in zip(args.residuals, resolved) if resolved.count(r) > 1})
    if twice:
        raise ValueError(f"--residuals names {', '.join(twice)} more than once, which would apply it twice; for a "
                         "stronger effect pass --scale (e.g. --scale 2)")
    total = len(args.prompt) * args.num_images  # every prompt's images are made in one batch
    if total > MAX_IMAGES:
        raise ValueError(f"{len(args.prompt)} --prompt x --num-images {args.num_images} asks for {total} images in one "
                         f"batch, more than {MAX_IMAGES}; run the command once per prompt, or again with another "
                         "--seed (its images are numbered after those already in --out)")
    if args.lag_threshold != "median" and not (args.lag and args.residuals):  # median: the default
        why = "with --no-lag" if args.residuals else (
            "without --residuals: LAG places residual sets, and this samples the base model"
            f"{' with --lora, which applies everywhere' if args.lora else ''}")
        print(f"prkit sample: note: --lag-threshold {args.lag_threshold} has no effect {why}", file=sys.stderr)
    if args.negative_prompt is not None and args.guidance_scale <= 1:  # diffusers' do_classifier_free_guidance
        print(f"prkit sample: note: --negative-prompt has no effect with --guidance-scale {args.guidance_scale:g}: "
              "guidance, which uses it, is off at 1 or less", file=sys.stderr)
    lora_scales = _check_loras(args.lora, args.lora_scale)
    # without --scale each set keeps the strength its file records (as load_residuals gives it to the Python API)
    scales = _per_file(args.scale, args.residuals, "--scale", "--residuals") if args.scale else [None] * len(
        args.residuals)
    device = resolve_device(args.device)
    check_available(device)
    if args.offload != "none" and device.type != "cuda":
        raise ValueError(f"--offload {args.offload} moves the models between the CPU and a GPU; the device is "
                         f"{device}: leave --offload out, or sample on a CUDA GPU")
    dtype = resolve_dtype(args.dtype, device)  # the GPU's, also when the models wait on the CPU (--offload)
    pipe = load_pipeline(args.model, device="cpu" if args.offload != "none" else device, dtype=dtype)
    # each set named after its file, so that an error about a set says which file it is
    names: list[str] = []
    for path in args.residuals:
        stem = re.sub(r"[^0-9A-Za-z_]", "_", Path(path).stem) or "residuals"
        if not usable_set_name(stem):  # a file named train.safetensors, to.safetensors, ...: a name that works
            stem = f"residuals_{stem}"
        name, n = stem, 1
        while name in names:  # x/a and y/a: a, a_2 (and a_3 if a file is named a_2)
            n += 1
            name = f"{stem}_{n}"
        names.append(name)
    sets = [load_residuals(pipe, path, name, scale=scale) for path, name, scale in zip(args.residuals, names, scales)]
    _load_loras(pipe, args.lora, lora_scales, args.model)
    if not bars_wanted():
        pipe.set_progress_bar_config(disable=True)
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    images = generate(pipe, args.prompt, sets or None, lag=args.lag, seed=args.seed, num_images=args.num_images,
                      steps=args.steps, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                      lag_config=LAGConfig(threshold=args.lag_threshold), **size)
    out.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in out.iterdir() if (m := re.fullmatch(r"(\d+)\.png", p.name))]
    number = max(taken, default=-1) + 1  # earlier images in the folder stay: new ones are numbered after them
    names: list[str] = []
    for done, image in enumerate(images):
        try:
            while True:  # a number another process took meanwhile (two runs into one folder) is passed over
                name = f"{number:03d}.png"
                number += 1
                try:
                    with atomic_path(out / name, replace=False) as tmp:  # an interrupt or a full disk: whole images
                        image.save(tmp, format="PNG", pnginfo=_png_text(args, done, sets))
                    break
                except FileExistsError:
                    continue
            names.append(name)
        except OSError as err:
            left = len(images) - done
            others = "the other image was not" if left == 1 else f"the other {left} images were not"
            written = names[0] if done == 1 else f"{names[0]} to {names[done - 1]}"
            kept = f"{written} {'was' if done == 1 else 'were'} written, {others}" if done else \
                "No image of this call was written"
            raise write_error(out / name, err, kept) from err
    print(f"wrote {len(images)} image{'s' if len(images) != 1 else ''} to {out} ({names[0]}"
          f"{f' to {names[-1]}' if len(names) > 1 else ''})")
    return 0


def _png_text(args, index: int, sets: list):
    """What made image ``index`` of the call, as PNG text chunks: its prompt and the command's settings (the
    residual ``sets``' strengths as applied)."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", args.prompt[index // args.num_images])
    info.add_text("prkit", json.dumps({
        "model": args.model, "residuals": args.residuals, "scale": [s.scale for s in sets],
        "lora": args.lora,
        "lora_scale": args.lora_scale, "lag": args.lag, "lag_threshold": args.lag_threshold,
        "negative_prompt": args.negative_prompt, "steps": args.steps, "guidance_scale": args.guidance_scale,
        "seed": args.seed, "num_images": args.num_images, "image_of_call": index,
        "height": args.height, "width": args.width, "dtype": args.dtype}))
    return info


def _load_loras(pipe, paths: list[str], scales: list[float], model: str) -> None:
    """Load each LoRA on top of whatever the pipeline holds (residuals included) and weight it by its scale."""
    names = []
    for i, path in enumerate(paths):
        name = f"lora_{i}"
        try:  # a folder and weight_name: diffusers < 0.40 refuses a bare file path offline
            with warnings.catch_warnings():  # peft's "multiple adapters" warning: several are what was asked for
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=name)
        except Exception as err:  # diffusers/peft raise many types for a file of another model
            raise ValueError(f"--lora {path!r} does not load on {model!r} ({type(err).__name__}: {err}); is it a LoRA "
                             "for this model?") from err
        if not any(name in (getattr(part, "peft_config", None) or {})
                   for part in (pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))):
            raise ValueError(f"--lora {path!r} holds no LoRA weights for this model's UNet or text encoders; is it a "
                             f"LoRA for {model!r}?")
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
