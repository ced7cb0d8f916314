"""Command line: ``prkit info`` and ``prkit export``, the commands that read residual files (and, for export, the
structure of the base model they were trained on). Prints what it reads; the files' logic lives in ``files``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli_args import _check_output_file


def _info(args) -> int:
    import json

    from .files import read_metadata

    files = []
    for given in args.file:  # files, or folders of them
        path = Path(given)
        files += sorted(p for p in path.iterdir() if p.suffix.lower() == ".safetensors" and p.is_file()) \
            if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no .safetensors files in {', '.join(args.file)}")
    headers = len(files) > 1 or any(Path(given).is_dir() for given in args.file)
    for number, path in enumerate(files):
        try:
            meta = read_metadata(path)
        except ValueError as err:
            if len(files) == 1 or Path(path) in [Path(f) for f in args.file]:
                raise
            print(("\n" if number else "") + f"{path}: not a prkit residual file, skipped ({err})")
            continue
        if headers:
            print(("\n" if number else "") + f"{path}:")
        for key in ("name", "token", "class_word", "base_model", "architecture", "prkit_version", "scale"):
            print(f"{key:>14}: {meta.get(key)}")
        if meta.get("base_model_revision"):  # which revision of the base model (prkit.revisions); older files: none
            print(f"{'base_revision':>14}: {json.dumps(meta['base_model_revision'])}")
        print(f"{'layers':>14}: {len(meta['layers'])} "
              f"({sum(2 * v['channels'] * v['rank'] for v in meta['layers'].values()):,} parameters)")
        recipe = meta.get("config")
        if recipe:  # how it was trained (TrainConfig's fields as saved)
            shown = {k: recipe.get(k) for k in ("steps", "batch_size", "learning_rate", "rank", "seed",
                                                "prompt_template", "mixed_precision") if k in recipe}
            print(f"{'trained':>14}: {json.dumps(shown)}")
        if meta.get("seconds") is not None:  # a header another tool edited: shown as it is (loading passes over it)
            try:
                print(f"{'seconds':>14}: {float(meta['seconds']):.1f}")
            except ValueError:
                print(f"{'seconds':>14}: {meta['seconds']}")
    return 0


def _recorded_model(meta: dict) -> str:
    """The base model a residual file records, where this machine can load it from (an existing folder or a hub id),
    else the embedded world."""
    from .model_index import _looks_like_path

    recorded = str(meta.get("base_model") or "")
    if recorded and (Path(recorded).expanduser().is_dir() or not _looks_like_path(recorded)):
        return recorded
    if recorded and recorded != "world":
        raise ValueError(f"the file was trained on {recorded!r}, which is not a folder on this machine; pass "
                         "--model with that model's folder or hub id")
    return "world"


def _export(args) -> int:
    import torch

    from .files import export_lora, load_residuals, read_metadata
    from .pipeline import load_pipeline, unet_structure

    out = Path(args.out)
    _check_output_file(out, args.overwrite)
    if out.resolve() == Path(args.file).resolve():
        raise ValueError(f"--out {str(out)!r} is the residual file itself; give the LoRA another name")
    meta = read_metadata(args.file)  # a prkit file, checked before the model loads
    model = args.model or _recorded_model(meta)
    if args.model is None and model != "world":
        print(f"base model: {model} (recorded in {args.file}; --model to choose another)", file=sys.stderr)
    elif args.model is None and not meta.get("base_model"):
        print(f"base model: the embedded world ({args.file} records none; --model to choose another)",
              file=sys.stderr)
    # the UNet's blocks and layer shapes are all the export reads of the model: built from its config, no weights
    # loaded, where that can be (else the whole pipeline loads)
    base = unet_structure(model)
    if base is None:
        base = load_pipeline(model, device="cpu", dtype="fp32")
    try:
        residuals = load_residuals(base, args.file)
    except ValueError as err:
        if args.model is not None:
            raise
        raise ValueError(f"{err}. No --model was given, so {model!r} was used: pass --model with the model the file "
                         "was trained on") from err
    export_lora(residuals, out, dtype={"fp16": torch.float16, "fp32": torch.float32}[args.dtype])
    print(f"wrote a kohya-style LoRA of {meta.get('name') or 'the set'} ({len(meta['layers'])} layers, "
          f"{args.dtype}) to {out}; load it with pipe.load_lora_weights({str(out.parent)!r}, "
          f"weight_name={out.name!r})")  # a folder and weight_name: diffusers < 0.40 refuses a bare file offline
    return 0
