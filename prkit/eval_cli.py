"""The evaluation's command line, shared by ``prkit eval`` and ``python -m prkit.evaluate``: its options, ``--set``
recipe overrides, and the run from parsed arguments. Re-exported by ``prkit.evaluate``."""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from pathlib import Path
from typing import Sequence

from .cli_args import MAX_IMAGES, _guidance, _positive_int, _whole, bars_wanted
from .eval_config import EvalConfig
from .eval_jobs import dist_env
from .eval_results import METHODS, RESULTS, SUMMARY
from .eval_subjects import PROTOCOLS


BOOLEANS = {"true": True, "false": False}


def _parse_set(items: Sequence[str]) -> dict:
    """["textual_inversion.steps=500", ...] -> {"textual_inversion": {"steps": 500}}."""
    out: dict = {}
    fields = _recipe_fields()
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, field_name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set wants METHOD.FIELD=VALUE (e.g. textual_inversion.steps=500), got {item!r}")
        if method not in METHODS:
            raise ValueError(f"--set {item!r}: {method!r} is not a method; one of {', '.join(METHODS)}")
        if field_name not in fields:
            raise ValueError(f"--set {item!r}: {field_name!r} is not a recipe field; one of {', '.join(fields)}")
        try:  # true/false as a shell user writes them: the string 'false' is truthy (scale_lr=false scaled)
            parsed = BOOLEANS[value.lower()] if value.lower() in BOOLEANS else ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(method, {})[field_name] = parsed
    return out


def _recipe_fields() -> list[str]:
    """What ``--set METHOD.FIELD=`` may name: TrainConfig's fields and the recipes' own keys (scale_lr)."""
    from dataclasses import fields

    from .train_config import TrainConfig

    return sorted({f.name for f in fields(TrainConfig)} | {"scale_lr"})


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation options (shared by ``prkit eval`` and ``python -m prkit.evaluate``)."""
    d = EvalConfig()
    parser.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol,
                        help=f"the subjects and prompts (default: {d.protocol}, the embedded model's concepts)")
    parser.add_argument("--data", default=None, help="dataset folder (dreambooth, customconcept101)")
    parser.add_argument("--model", default=d.model, help="'world' (default), a diffusers folder or a hub id")
    parser.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS,
                        help=f"(default: {' '.join(d.methods)}; residuals is sampled with and without LAG, base "
                             "trains nothing)")
    parser.add_argument("--subjects", nargs="*", default=[], help="default: all of the protocol's")
    parser.add_argument("--max-prompts", type=_positive_int, default=None,
                        help="only each subject's first N prompts (smoke runs); default: all")
    parser.add_argument("--images-per-prompt", type=_whole(1, MAX_IMAGES), default=d.images_per_prompt,
                        help=f"seeds 0..N-1 per prompt, made in one batch: 1 to {MAX_IMAGES} "
                             f"(default {d.images_per_prompt})")
    parser.add_argument("--sample-steps", type=_positive_int, default=d.sample_steps,
                        help=f"denoising steps (default {d.sample_steps})")
    parser.add_argument("--guidance-scale", type=_guidance, default=d.guidance_scale,
                        help=f"classifier-free guidance (default {d.guidance_scale})")
    parser.add_argument("--seed", type=_whole(0), default=d.seed, help="training and sampling seed (default 0)")
    parser.add_argument("--token", default=d.token,
                        help=f"identifier of dreambooth and customconcept101 subjects (default: {d.token}; the "
                             "world's concepts bring their own)")
    parser.add_argument("--set", dest="train", nargs="*", default=[], metavar="METHOD.FIELD=VALUE",
                        help="recipe overrides, e.g. textual_inversion.steps=500 "
                             "dreambooth.prior_images=class_images/{subject}; a METHOD.checkpoint_dir=DIR keeps "
                             "each run's checkpoint in DIR/METHOD/SUBJECT")
    parser.add_argument("--clip", default=d.clip, help="hub id, folder, 'world', 'auto' or 'none' (default: auto, the "
                        "world's own CLIP on the world, CLIP ViT-B/32 elsewhere)")
    parser.add_argument("--dino", default=d.dino, help="hub id, folder, 'auto' or 'none' (default: auto, DINO "
                        "ViT-S/16)")
    parser.add_argument("--download-backbones", action="store_true",
                        help="fetch CLIP/DINO hub ids missing from the local cache")
    parser.add_argument("--out", default=d.out, help=f"results folder (default: {d.out}); a rerun into it skips "
                        "the finished (method, subject) pairs")
    parser.add_argument("--device", default=d.device, help=f"{d.device} (default: a CUDA GPU or Apple's mps where "
                        "there is one, else the CPU; with several ranks cuda:LOCAL_RANK), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                        help="pipeline dtype (default: bf16/fp16 on GPUs, fp32 elsewhere)")
    parser.add_argument("--save-images", action="store_true",
                        help="also keep the PNGs, in OUT/images/METHOD/SUBJECT")
    parser.add_argument("--ci-over", choices=("image", "subject"), default=d.ci_over,
                        help=f"the summary's 95%% intervals over images or over per-subject means (default: "
                             f"{d.ci_over})")
    return parser


def config_from_args(args) -> EvalConfig:
    none = lambda v: None if v in (None, "none", "None", "") else v  # noqa: E731
    return EvalConfig(protocol=args.protocol, data=args.data, model=args.model, methods=tuple(args.methods),
                      subjects=tuple(args.subjects), max_prompts=args.max_prompts,
                      images_per_prompt=args.images_per_prompt, sample_steps=args.sample_steps,
                      guidance_scale=args.guidance_scale, seed=args.seed, token=args.token,
                      train=_parse_set(args.train), clip=none(args.clip), dino=none(args.dino), out=args.out,
                      device=args.device, dtype=args.dtype, save_images=args.save_images, ci_over=args.ci_over,
                      download_backbones=args.download_backbones)


def run_from_args(args) -> int:
    """Run an evaluation from parsed arguments; rank 0 prints the summary table."""
    from .evaluate import evaluate  # (the runner imports this module)

    config = config_from_args(args)
    summary = evaluate(config, progress=bars_wanted())
    if dist_env()[0] == 0:
        print((Path(config.out) / "summary.md").read_text(encoding="utf-8") if summary else "no results")
        print(f"wrote {Path(config.out) / RESULTS} and {Path(config.out) / SUMMARY}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prkit.evaluate", description="Evaluation harness: train every method on every subject with its "
                                     "recipe, sample, score, tabulate.")
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    from .cli import _error_line, _expand_paths

    _expand_paths(args)  # "~" in --out/--data, as `prkit eval` does
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run_from_args(args)
    except (OSError, ValueError, RuntimeError, TypeError) as err:  # a message, as `prkit eval` says it, no traceback
        print(f"{parser.prog}: error: {_error_line(err, 'eval')}", file=sys.stderr)
        return 2
