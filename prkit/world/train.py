"""Recipe of the embedded world model: renders -> VAE -> UNet + text encoder -> diffusers pipeline.

``python -m prkit.world.train --stage {data,vae,oracle,unet,export,eval,all} --out DIR --seed 0
[--minutes N] [--resume] [--device cuda] [--ship]``

Stages (each reads what the earlier ones left in DIR; each stops gracefully within ``--minutes``):
- data:   pre-render a fixed pool of captioned scenes (half the objects patterned and captioned so,
          "a red and white striped ball", never as an example concept) for the diffusion model and a
          pool rendered with ``patterns=True`` for the VAE (multiprocessing, deterministic per chunk).
- vae:    train a small AutoencoderKL (64x64x3 -> 16x16x4) on both pools; set ``scaling_factor``
          to 1 / std of its latents.
- oracle: ``prkit.world.oracle.train_oracle`` (the oracle's own code) and save it (fp16).
- unet:   encode the diffusion pool once, then train UNet2DConditionModel + CLIPTextModel jointly
          from scratch on latents (bf16 autocast, EMA, min-SNR weighting, 10% caption dropout);
          ``--resume`` continues from DIR/ckpt; ``--init-from FOLDER`` warm-starts from a pipeline.
- export: EMA weights -> fp16 StableDiffusionPipeline folder DIR/model (DPM-Solver++ default).
- eval:   oracle accuracy on 2,000 fresh renders; base model on 400 single-object and 100
          two-object prompts read by the oracle (``evaluate_base``).
``--ship`` copies DIR/model to prkit/world/model and the oracle to prkit/world/oracle/.
Identifier tokens never occur in captions and token embeddings get no weight decay, so their
embeddings keep their random initialisation. See RECIPE.md for the shipped run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

# The recipe lives in one module per job; its names stay importable from here (``from prkit.world import
# train as W; W.render_pool, W.RecipeConfig, ...``).
from .eval_base import _grid, _rate, cpu_speed, evaluate_base, generate, load_world_pipeline, stage_eval  # noqa: F401
from .pool import _held_out, _load_images, _random_pattern, _render_chunk, render_pool, stage_data  # noqa: F401
from .recipe_util import (MODEL_DIR, ORACLE_FILE, PROVENANCE, SIZE_LIMIT_MB, STAGES, TOKENIZER_DIR,  # noqa: F401
                          WORLD_DIR, RecipeConfig, _autocast, _dev, _lr_factor, _oracle_file, _plan_steps, _sync,
                          _Timer, _to_unit, _update_metrics, _vae_dir, log, scheduler_config, text_config,
                          unet_config, vae_config)
from .train_oracle_stage import _oracle_vae_report, stage_oracle, stage_oracle_vae  # noqa: F401
from .train_unet import (_canonical_text_encoder_keys, _param_groups, build_text_encoder, build_unet,  # noqa: F401
                         encode_pool, folder_mb, load_tokenizer, resolve_pad_side, ship, stage_export, stage_unet,
                         summary_dropout, tokenize)
from .train_vae import _edges, _psnr, build_vae, stage_vae, vae_loss, vae_roundtrip  # noqa: F401


# ---------------------------------------------------------------------------- CLI
def run(stages: list[str], out: Path, cfg: RecipeConfig, device: torch.device, resume: bool = False,
        init_from: Path | None = None, do_ship: bool = False) -> dict:
    stages = _stages(stages)  # every name checked before any stage runs
    _check_inputs(stages, out, init_from)  # ... and what each reads, unless a stage before it writes it
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    results = {}
    for stage in stages:
        t = _Timer()
        log.info("=== stage %s", stage)
        if stage == "data":
            info = stage_data(cfg, out)
        elif stage == "vae":
            info = stage_vae(cfg, out, device, resume, init_from)
        elif stage == "oracle":
            info = stage_oracle(cfg, out, device)
        elif stage == "oracle_vae":
            info = stage_oracle_vae(cfg, out, device, init_from)
        elif stage == "unet":
            info = stage_unet(cfg, out, device, resume, init_from)
        elif stage == "export":
            info = stage_export(cfg, out, init_from)
        elif stage == "eval":
            info = stage_eval(cfg, out, device)
        else:  # unreachable: _stages checked the names
            raise AssertionError(stage)
        info["wall_seconds"] = t()
        if device.type == "cuda":
            info["card"] = torch.cuda.get_device_name()
        _update_metrics(out, stage, info)
        results[stage] = info
    if do_ship:
        ship(out)
    return results


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_DECLARED = {f.name: f.type for f in fields(RecipeConfig)}  # 'int', 'float | None', ... (postponed annotations)
_KINDS = {"int": 0, "float": 0.0, "bool": False, "str": ""}
_CHOICES = {"pad_side": ("left", "right")}


def _parse_value(value: str, default, key: str = "value"):
    """A --set value as the RecipeConfig field ``key`` declares it ('None' only where the field may be None);
    another key is read by ``default``'s type, a None default as a number where it reads as one, else a word."""
    declared = _DECLARED.get(key)
    if declared is not None:  # the declared type, not the current value's: a None default took any word
        kind, optional = declared.removesuffix(" | None"), declared.endswith(" | None")
        if value == "None" and not optional:
            raise ValueError(f"--set {key}=None: {key} takes {'an' if kind == 'int' else 'a'} {kind}, not None")
        default = _KINDS[kind]
        if key in _CHOICES and value != "None" and value not in _CHOICES[key]:
            raise ValueError(f"--set {key}={value}: expected one of {', '.join(_CHOICES[key])} (or None)")
    if value == "None":
        return None
    or_none = " (or None)" if declared is not None and declared.endswith(" | None") else ""
    if isinstance(default, bool):
        if value.lower() not in _TRUE + _FALSE:
            raise ValueError(f"--set {key}={value}: expected true or false (or 1/0, yes/no)")
        return value.lower() in _TRUE
    if default is None:  # a number if it reads as one (pad_side=left stays a word)
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value
    name = type(default).__name__
    try:
        parsed = type(default)(value)
    except ValueError:
        raise ValueError(f"--set {key}={value}: expected {'an' if name == 'int' else 'a'} {name}{or_none}") from None
    # the recipe's counts (images, steps, batch sizes, workers) and minutes: a negative one was taken, and failed inside
    # its stage (n_images: numpy's "negative dimensions are not allowed") or ran as a spent budget (minutes)
    if declared is not None and ((name == "int" and key != "seed") or key.endswith("_minutes")) and parsed < 0:
        what = "a time in minutes" if key.endswith("_minutes") else "a count"
        raise ValueError(f"--set {key}={value}: {key} is {what} and cannot be negative; give a number >= 0")
    if key.endswith("_minutes") and not math.isfinite(parsed):  # nan passed every budget check: an endless stage
        raise ValueError(f"--set {key}={value}: {key} is a time in minutes; give a finite number >= 0")
    return parsed


def _minutes(text: str) -> float:
    """--minutes: a time >= 0, as ``--set`` takes the minutes fields (a negative one ran as a spent budget: the
    probe steps alone, without a word)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes such as 30, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a time in minutes cannot be negative; give a number >= 0, got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a time in minutes must be a finite number >= 0, got {text!r}")
    return value


def _stages(names: list[str]) -> list[str]:
    """The stages to run, in the order given, 'all' expanded in place; every name checked before any stage runs."""
    out = []
    for name in names:
        if name == "all":
            out += STAGES
        elif name in STAGES:
            out.append(name)
        else:
            raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)} or all")
    return out


# stage -> (file under --out it reads, the stage that writes it); a VAE may come from --init-from instead
_INPUTS = {
    "vae": (("data/images.npy", "data"), ("data/pattern_images.npy", "data")),
    "oracle_vae": (("vae/config.json", "vae"),),
    "unet": (("data/captions.json", "data"), ("vae/config.json", "vae")),
    "export": (("ckpt/unet_train.pt", "unet"), ("vae/config.json", "vae")),
    "eval": (("model/model_index.json", "export"),),
}


def _check_inputs(stages: list[str], out: Path, init_from: Path | None = None) -> None:
    """Refuse, before any stage runs, a stage whose input is neither in ``out`` nor written by a stage before it."""
    for i, stage in enumerate(stages):
        for name, writer in _INPUTS.get(stage, ()):
            if writer in stages[:i] or (out / name).exists() or (name.startswith("vae/") and init_from is not None):
                continue
            raise ValueError(f"stage {stage} reads {str(out / name)!r}, which is not there: run --stage {writer} "
                             f"with this --out first (or list it before {stage})")


def main(argv: list[str] | None = None) -> int:
    from ..cli_args import _positive_int, _seed

    ap = argparse.ArgumentParser(prog="python -m prkit.world.train", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", nargs="+", default=["all"], help=f"one or more of {', '.join(STAGES)}, or all")
    ap.add_argument("--out", type=Path, required=True, help="working folder (data, checkpoints, exported model)")
    ap.add_argument("--seed", type=_seed, default=0, help="seed of the renders and of training (default 0)")
    ap.add_argument("--minutes", type=_minutes, default=None,
                    help="time budget of the training stage(s) run (vae, unet); default: the config's")
    ap.add_argument("--steps", type=_positive_int, default=None, help="fixed number of steps for vae/unet (overrides --minutes)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    ap.add_argument("--init-from", type=Path, default=None, help="warm-start unet + text encoder from a pipeline folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU-sized settings (tests)")
    ap.add_argument("--ship", action="store_true", help="copy the model and oracle into prkit/world/")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override RecipeConfig fields")
    ap.add_argument("--cpu-speed", action="store_true", help="measure the CPU speed bars of --out/model and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    if args.cpu_speed:
        print(json.dumps(cpu_speed(args.out / "model" if (args.out / "model").exists() else MODEL_DIR), indent=2))
        return 0
    cfg = RecipeConfig.smoke(args.seed) if args.smoke else RecipeConfig(seed=args.seed)
    try:
        stages = _stages(args.stage)
    except ValueError as err:
        ap.error(f"--stage: {err}")
    fields = asdict(cfg)
    for kv in args.set:
        key, eq, value = kv.partition("=")
        if not eq or key not in fields:
            ap.error(f"--set {kv}: expected KEY=VALUE with KEY one of the RecipeConfig fields ({', '.join(sorted(fields))})")
        try:
            cfg = replace(cfg, **{key: _parse_value(value, getattr(cfg, key), key)})
        except ValueError as err:
            ap.error(str(err))
    if args.minutes is not None:
        cfg = replace(cfg, vae_minutes=args.minutes, unet_minutes=args.minutes)
    if args.steps is not None:
        cfg = replace(cfg, vae_steps=args.steps, unet_steps=args.steps)
    device = _dev(args.device)
    log.info("recipe %s on %s: %s", stages, device, asdict(cfg))
    try:
        _check_inputs(stages, args.out, args.init_from)
    except ValueError as err:
        ap.error(str(err))
    results = run(stages, args.out, cfg, device, args.resume, args.init_from, args.ship)
    print(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
