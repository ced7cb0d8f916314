"""Command line: ``prkit train``, ``prkit sample``, ``prkit info``, ``prkit export``, ``prkit eval`` (also
``python -m prkit``).

Parses arguments and calls the library; no logic of its own beyond wiring.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path


from .cli_args import (  # noqa: F401
    MAX_IMAGES, _check_loras, _check_output_file, _crop_side, _finite, _guidance, _image_count, _learning_rate,
    _per_file, _positive_int, _rank, _seed, _side, _whole, _writable_folder, bars_wanted)
from .cli_output import _cli_words, _error_line, _in_cli_words, _library_bars_off  # noqa: F401
from .cli_sample import _sample
# the residual files' commands, re-exported
from .cli_files import _export, _info, _recorded_model  # noqa: F401
from .interrupts import terminate_as_interrupt

LAG_THRESHOLDS = ("median", "mean", "otsu", "fixed", "soft")  # prkit.lag.THRESHOLDS, without importing torch here
VERBOSE_HELP = "log what the library does (INFO lines); before or after the command"
DEVICE_HELP = "auto (default: a CUDA GPU or Apple's mps where there is one, else the CPU), cpu, cuda, cuda:1, mps"


def _train(args) -> int:
    from .data import load_concept
    from .atomic import reworded
    from .files import save_residuals
    from .pipeline import load_pipeline
    from .train import TrainConfig, TrainingWriteError, train_residuals

    out = Path(args.out)
    _check_output_file(out, args.overwrite)  # before the model loads and trains: nothing is lost at the end
    checkpoint_dir = _checkpoint_dir(args)  # after: '--out .' has no name to put the folder beside
    if checkpoint_dir.resolve() == out.resolve():
        raise ValueError(f"--out {str(out)!r} is also the checkpoint folder; name the output *.safetensors or pass "
                         "--checkpoint-dir")
    _writable_folder(checkpoint_dir, "--checkpoint-dir")
    if not args.images.strip():  # Path("") is the current folder: an unset shell variable would train on it
        raise ValueError("--images is empty; give the folder of the concept's images")
    with warnings.catch_warnings():  # the images, words and folder, checked before the model loads (minutes on SD);
        warnings.simplefilter("ignore")  # small crops decode fast; the real load below says what it skips
        load_concept(args.images, args.token, args.class_word, resolution=8, skip_bad=args.skip_bad)
    pipe = load_pipeline(args.model, device=args.device)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if args.resolution and args.resolution % pipe.vae_scale_factor:  # sampling refuses such sizes; the VAE would crop
        raise ValueError(f"--resolution {args.resolution} is no multiple of {pipe.vae_scale_factor} (the VAE's factor); "
                         f"use e.g. {args.resolution // pipe.vae_scale_factor * pipe.vae_scale_factor or size}")
    concept = load_concept(args.images, args.token, args.class_word, resolution=args.resolution or size,
                           skip_bad=args.skip_bad)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                         rank=args.rank, checkpoint_dir=str(checkpoint_dir), resume=args.resume,
                         checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision,
                         gradient_checkpointing=args.gradient_checkpointing)
    try:
        result = train_residuals(pipe, concept, config, progress=bars_wanted())
    except TrainingWriteError as err:  # a checkpoint not written; the set on the model ends with this process
        raise reworded(err.error, f"{err.error.strerror or err.error}; {_kept(args) or NOTHING_KEPT}") from err
    # the model as the pipeline names it (a folder's absolute path, as the Python API records it): --model's own
    # words may be relative to this folder ('models/sd15', which export run elsewhere would take for a hub id)
    base_model = pipe.name_or_path
    try:
        save_residuals(result.residuals, args.out, base_model=base_model)
    except OSError as err:  # a full disk: the training is not lost, its last checkpoint or another file holds it
        kept = (_kept(args) if args.checkpoint_every else "") or _saved_elsewhere(result.residuals, args, base_model)
        raise reworded(err, f"{err.strerror or err}; {kept}") from err
    print(f"saved {result.residuals.num_parameters():,} residual parameters to {args.out} "
          f"({result.steps_done} steps, {result.seconds:.1f} s, final loss {result.losses[-1]:.4f})")
    return 0


def _stdout_gone() -> bool:
    """Whether standard output's reader has left (its pipe is broken); if so it is pointed at the null device, so
    that Python's own flush at exit does not fail again (the way Python's documentation handles SIGPIPE)."""
    import select

    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        gone = any(event & select.POLLERR for _, event in poll.poll(0))  # a pipe whose reader closed it
    except (OSError, ValueError, AttributeError):  # closed, not a real file, or no poll (Windows)
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone


def _checkpoint_dir(args) -> Path:
    """Where `prkit train` keeps its checkpoint: --checkpoint-dir, else <name>.ckpt beside --out <name>.safetensors."""
    return Path(args.checkpoint_dir or str(Path(args.out).with_suffix("")) + ".ckpt")


def _again(args) -> str:
    if getattr(args, "resume", True):
        return "run the same command again to resume"
    return "run the command again without --no-resume to resume"


def _kept(args) -> str:
    """How to continue an unfinished `prkit train` and where its training is kept; "" where no checkpoint keeps it
    (interrupted before the first one)."""
    folder = _checkpoint_dir(args)
    if not (folder / "checkpoint.pt").is_file():
        return ""
    return f"{_again(args)} (the training is kept in {folder})"


NOTHING_KEPT = "no checkpoint keeps the training: the same command trains again from the start"


def _saved_elsewhere(residuals, args, base_model: str) -> str:
    """Where a finished run that no checkpoint holds (--checkpoint-every 0) keeps its residuals when --out cannot be
    written: the same file in the checkpoint folder, else in a new folder of the system's temporary one (often
    another disk); what to do, in words."""
    import tempfile

    from .files import save_residuals

    failed = []
    for temporary in (False, True):
        folder = None if temporary else _checkpoint_dir(args)
        try:
            folder = folder or Path(tempfile.mkdtemp(prefix="prkit-"))
            path = save_residuals(residuals, folder / Path(args.out).name, base_model=base_model)
        except OSError as err:
            failed.append(f"{tempfile.gettempdir() if temporary else folder}: "
                          f"{os.strerror(err.errno) if err.errno else err}")
            if temporary and folder is not None:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # the empty folder made for it
            continue
        return (f"the trained residuals are saved as {path} instead: move that file to {args.out} (no need to train "
                "again)")
    return (f"no checkpoint keeps the training and it could not be saved elsewhere either ({'; '.join(failed)}): "
            "the same command trains again from the start")


def _eval(args) -> int:
    from .evaluate import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prkit", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="personalize a model on a folder of images")
    train.add_argument("--model", default="world", help="'world' (default), a diffusers folder or a hub id")
    train.add_argument("--images", required=True, help="folder of 3-15 images of the concept")
    train.add_argument("--token", help="identifier, e.g. sks (read from concept.json when omitted)")
    train.add_argument("--class-word", dest="class_word", help="the concept's class, e.g. dog")
    train.add_argument("--out", required=True, help="output .safetensors")
    train.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    train.add_argument("--steps", type=_positive_int, default=150, help="training steps (default 150)")
    train.add_argument("--batch-size", type=_positive_int, default=4, help="images per step (default 4)")
    train.add_argument("--lr", type=_learning_rate, default=None,
                       help="default: the model folder's (prkit_defaults.json; the world: 1e-2), else METHOD's 1e-3")
    train.add_argument("--rank", type=_rank, default=0.05,
                       help="fraction of channels (default 0.05) or a whole rank (e.g. 16)")
    train.add_argument("--seed", type=_seed, default=0, help="default 0")
    train.add_argument("--resolution", type=_crop_side, default=None,
                       help="default: the model's native size; at most 16384, as sample's --height and --width")
    train.add_argument("--checkpoint-dir", default=None,
                       help="default: --out without .safetensors, plus .ckpt (sks.safetensors: sks.ckpt); rerun the "
                            "same command to resume")
    train.add_argument("--checkpoint-every", type=_whole(0), default=50,
                       help="steps between checkpoints (default 50; also written on Ctrl-C and SIGTERM); 0: only "
                            "then")
    train.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                       help="continue from the checkpoint of an interrupted run of the same concept and recipe "
                            "(--no-resume: start over)")
    train.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                       help="auto (default): bf16 on GPUs that compute in it, fp16 with a loss scaler on older ones "
                            "(T4, V100), fp32 on the CPU")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="small GPUs: recompute activations in the backward pass (less memory, slower steps)")
    train.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    train.add_argument("--device", default="auto", help=DEVICE_HELP)
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="generate images, optionally with residuals and LAG")
    sample.add_argument("--model", default="world", help="'world' (default), a diffusers folder or a hub id")
    # repeated options add up (--lora a --lora b: both), as a list after one does
    sample.add_argument("--residuals", nargs="+", action="extend", default=[], help="one or more residual files")
    sample.add_argument("--prompt", required=True, nargs="+", action="extend", help="one or more prompts, each in "
                        "quotes")
    sample.add_argument("--lora", nargs="+", action="extend", default=[], help=".safetensors LoRA files (diffusers, "
                        "kohya or peft keys, as pipe.load_lora_weights reads them) applied on top of the residuals, "
                        "everywhere: LAG localizes residuals only")
    sample.add_argument("--lora-scale", nargs="+", action="extend", type=_finite, default=[], help="one weight per "
                        "--lora file, in the same order (default 1.0 each)")
    sample.add_argument("--scale", nargs="+", action="extend", type=_finite, default=[], help="the residuals' "
                        "strength: one value for all --residuals files, or one per file in their order (default: the "
                        "strength each file records, 1.0 unless it was saved with another)")
    sample.add_argument("--lag", action=argparse.BooleanOptionalAction, default=True,
                        help="apply each residual set only where its concept's attention puts it (default: on; "
                             "--no-lag: everywhere)")
    sample.add_argument("--lag-threshold", default="median", choices=LAG_THRESHOLDS,
                        help="how LAG cuts each concept's attention map into its mask (default and METHOD: median; "
                             "fixed: 0.5 on the min-max normalized map)")
    sample.add_argument("--negative-prompt", default=None, help="one negative prompt for every --prompt")
    sample.add_argument("--num-images", type=_image_count, default=4,
                        help=f"images per prompt (default 4); at most {MAX_IMAGES} over all --prompt together "
                             "(one batch)")
    sample.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (default 25)")
    sample.add_argument("--guidance-scale", type=_guidance, default=7.5, help="classifier-free guidance (default 7.5)")
    sample.add_argument("--seed", type=_seed, default=0, help="default 0: the same command gives the same images")
    sample.add_argument("--height", type=_side, default=None, help="a multiple of 8 (default: the model's native size)")
    sample.add_argument("--width", type=_side, default=None, help="a multiple of 8 (default: the model's native size)")
    sample.add_argument("--out", default="samples", help="folder (default: samples); images already there are kept")
    sample.add_argument("--device", default="auto", help=DEVICE_HELP)
    sample.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default: bf16 on GPUs that compute in it, fp16 on older ones, fp32 on the CPU")
    sample.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                        help="small GPUs: keep the models on the CPU and move each (model) or each layer "
                             "(sequential, slowest, least memory) to the GPU when it runs (default: none)")
    sample.set_defaults(func=_sample)

    info = sub.add_parser("info", help="print residual files' headers (words, base model, layers, recipe)")
    info.add_argument("file", nargs="+", help="residual .safetensors files, or folders of them")
    info.set_defaults(func=_info)

    export = sub.add_parser("export", help="write a residual file as a LoRA that pipe.load_lora_weights loads")
    export.add_argument("file", help="a residual .safetensors written by prkit")
    export.add_argument("--out", required=True, help="the LoRA .safetensors to write")
    export.add_argument("--model", default=None, help="the base model the residuals were trained on (default: the "
                        "one the file records, where it can be loaded from here; else 'world')")
    export.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16",
                        help="the LoRA's weights' precision (default: fp16)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=_export)

    from .evaluate import add_arguments as add_eval_arguments

    evaluate = sub.add_parser("eval", help="train, sample and score methods on a protocol (CSV + summary)")
    add_eval_arguments(evaluate).set_defaults(func=_eval)
    for command in sub.choices.values():  # also after the command (prkit train ... -v); unset there, the one before
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


PATH_ARGS = ("images", "out", "checkpoint_dir", "file", "residuals", "lora", "data")  # "~" expanded in each
def _expand_paths(args) -> None:
    """``~`` in every path argument, also where the shell left it (quoted, or ``--out=~/x``)."""
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:  # "" stays "" (Path would make it ".", the current folder)
            setattr(args, name, str(Path(value).expanduser()))
        elif isinstance(value, list):
            setattr(args, name, [str(Path(v).expanduser()) if isinstance(v, str) and v else v for v in value])


def _empty_path(args) -> str | None:
    """The first path argument given as "" (an unset shell variable: Path("") is the current folder, which `prkit
    info ""` listed and `sample --out ""` wrote into), as its flag; None where there is none."""
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if value == "" or (isinstance(value, list) and "" in value):
            return name if name == "file" else "--" + name.replace("_", "-")
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports torch (eval's defaults): a second in which Ctrl-C is common
    except KeyboardInterrupt:
        print("prkit: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    empty = _empty_path(args)
    if empty is not None:
        print(f"prkit {args.command}: error: {empty} is empty; give a path (an unset shell variable?)", file=sys.stderr)
        return 2
    from .model_index import blank_name  # imports torch (as build_parser has by now)

    if blank_name(getattr(args, "model", None)):  # export took the recorded model instead; train and sample named '.'
        print(f"prkit {args.command}: error: --model is empty; give 'world', a diffusers folder or a hub id (an unset "
              "shell variable?)", file=sys.stderr)
        return 2
    _expand_paths(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    said = _in_cli_words(args.command)
    restore = None
    try:  # a job scheduler's SIGTERM checkpoints as Ctrl-C does, from the model's loading on
        with terminate_as_interrupt() if args.command == "train" else contextlib.nullcontext():
            if args.command != "info" and not bars_wanted():
                restore = _library_bars_off()
            return args.func(args)
    except BrokenPipeError as err:
        if not _stdout_gone():  # a pipe the command wrote a file into: an error like any other
            print(f"prkit {args.command}: error: {_error_line(err, args.command)}", file=sys.stderr)
            return 2
        return 141  # `prkit info | head`: the reader has what it wanted (the shell's code for SIGPIPE)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        print(f"prkit {args.command}: error: {_error_line(err, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the training loop has written its checkpoint and said where
        again = (f"; {_kept(args) or 'nothing was kept yet: run the same command again to start'}"
                 if args.command == "train" else "")
        print(f"prkit {args.command}: interrupted{again}", file=sys.stderr)
        return 130
    finally:
        if restore is not None:
            restore()
        said()


if __name__ == "__main__":
    sys.exit(main())
