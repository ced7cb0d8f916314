"""Training checkpoints: written atomically, stamped with what the run trains on, checked before a resume.

A checkpoint left in a run's folder must never continue another run: the stamp (``fingerprint``) covers the
concept's images and words, the prompt, what is trained and how (target, rank, seed, batch size, flips, prior
images and their weight, gradient clipping, mixed precision as it resolves on the device), the UNet's architecture and
weights (a cheap digest), the VAE's encoder and the text encoders it caches its inputs with (the same) and the
training objective (the scheduler's prediction type and noise schedule); a resume
whose stamp differs is refused with the way out (other images: the exact copies in the concept's folder, which
``load_concept`` leaves out and a checkpoint written before trained, named). Both training loops (``train``,
``fast``) save and restore through here; the loops themselves live there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from .fast_step import match_state_layouts
from .atomic import writing
from .files import architecture, layer_table
from .residuals import original_module
from .train_config import training_prompt

log = logging.getLogger(__name__)

WAYS = "delete it, pass another checkpoint_dir, or pass resume=False (CLI: --no-resume)"
START_OVER = f"to start over, {WAYS}"
PRECISION_WORDS = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype: TrainConfig's word


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed: unreadable, or written by another run."""


def _images_digest(concept) -> str:
    """The concept's source files' bytes where it has them (stable across Pillow versions) and how they were cropped,
    else its pixels; and the crops' size."""
    images, paths = concept.images, [Path(p) for p in (getattr(concept, "paths", None) or [])]
    size = images[0].size if images else ""
    if len(paths) == len(images) and all(p.is_file() for p in paths):
        return _files_digest(paths, size, getattr(concept, "crop", ""))
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{len(images)} {size}".encode())
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def _files_digest(paths: list[Path], size, crop: str) -> str:
    """``_images_digest`` of crops of ``size`` cut from the files ``paths`` (``crop``: how, where not the default)."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{len(paths)} {size}".encode())
    for path in paths:
        digest.update(path.read_bytes())
    if crop:  # other crops of the same files (a default load adds nothing: old stamps hold)
        digest.update(crop.encode())
    return digest.hexdigest()


def _copies_note(saved: dict, stamp: dict) -> str:
    """Why a checkpoint's images differ where the concept's folder holds exact copies of them: ``load_concept``
    leaves those out, a checkpoint written before it did trained them too. Said for sure where the stamp with the
    copies back is the checkpoint's, as a possible reason otherwise; empty without copies."""
    from .image_copies import copy_names

    concept = getattr(stamp, "concept", None)
    copies = sorted(getattr(concept, "left_out", None) or [], key=lambda pair: pair[0].name)  # load_concept's record
    if not copies:
        return ""
    names = ", ".join(copy_names(copies))
    files = sorted([*(Path(p) for p in concept.paths), *(copy for copy, _ in copies)], key=lambda p: p.name)
    try:  # the folder as a prkit before loaded it: every file in name order
        before = _files_digest(files, concept.images[0].size, getattr(concept, "crop", ""))
    except OSError:
        before = None
    if before == saved.get("images"):
        return (f" It was written when exact copies of images still trained: {names} trained then and "
                f"{'is' if len(copies) == 1 else 'are'} left out now, so it cannot continue on these images.")
    return (f" Part of it may be the exact copies of images in its folder, left out now but trained by a checkpoint "
            f"written before: {names}.")


def _architecture(unet) -> str:
    """The UNet's shape as the residuals see it (its transformer blocks and their channels, sizes), not its whole
    config (which another diffusers version or loader fills in differently)."""
    config = unet.config
    keys = ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "block_out_channels")
    shape = [architecture(unet), sorted(layer_table(unet).items()), [str(getattr(config, k, None)) for k in keys]]
    return hashlib.blake2b(json.dumps(shape, default=str).encode(), digest_size=12).hexdigest()


WEIGHTS = ("conv_in.weight", "conv_out.weight")  # the frozen weights whose spread tells one base model from another
WEIGHTS_TOLERANCE = 1e-3  # relative: the same model in fp32, fp16 or bf16 agrees far closer; another one does not


def _weights(unet) -> list[float]:
    """The standard deviations of a few frozen UNet weights (and of the mid block's first one), in float32: a
    cheap check that a checkpoint continues on the base model it was trained on, whatever its dtype (and compiled
    or not: the plain module's names)."""
    params = dict(original_module(unet).named_parameters())
    names = [n for n in WEIGHTS if n in params]
    names += [n for n, p in params.items() if n.startswith("mid_block.") and p.dim() > 1][:1]
    return _spreads(params, names)


def _spreads(params: dict, names: list[str]) -> list[float]:
    return [round(float(params[n].detach().float().std()), 8) for n in names]


def _inputs(pipe) -> list[float] | None:
    """What turns the concept into the UNet's inputs, as cheap spreads: the VAE's encoder (its first and last
    weights) with the latents' scaling and shift, and each text encoder's first and last
    weights. A resume after swapping a VAE or text encoder for another trained its cached latents or prompt anew on
    the old state; a VAE that differs only in its decoder (sd-vae-ft-mse) encodes alike and still resumes. None
    where the pipeline has none of them (a bare UNet's own caller)."""
    out: list[float] = []
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        params = dict(vae.named_parameters())
        names = [n for n in ("encoder.conv_in.weight", "encoder.conv_out.weight") if n in params]
        config = getattr(vae, "config", {})
        out += _spreads(params, names) + [float(getattr(config, k, None) or 0.0) for k in ("scaling_factor",
                                                                                       "shift_factor")]
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            params = [(n, p) for n, p in encoder.named_parameters() if p.dim() > 1]
            out += _spreads(dict(params), [params[0][0], params[-1][0]]) if params else []
    return out or None


def _scheduler(pipe) -> str:
    """The training objective: what the UNet predicts and the noise schedule it is trained over, as the training
    scheduler reads them (a sampler swapped in for validation, DPM-Solver for PNDM, changes neither)."""
    from .train_inputs import training_scheduler

    config = training_scheduler(pipe).config
    keys = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
            "rescale_betas_zero_snr", "trained_betas")
    return json.dumps({k: config.get(k) for k in keys}, default=str, sort_keys=True)


class Stamp(dict):
    """A run's fingerprint: the dict its checkpoint keeps, plus the concept it was taken of (not kept: a resume
    refused for its images names the exact copies its folder holds, ``_copies_note``)."""

    concept = None


def fingerprint(pipe, concept, config, amp: torch.dtype | None) -> Stamp:
    """What decides a run's trajectory besides the learning rate, weight decay and step count (which a resume may
    change, and says so). ``amp``: the autocast dtype the loop trains in (None: none), stamped as the
    ``mixed_precision`` it resolves to ('auto' is bf16 on one GPU, fp16 on another, none on a CPU): one run never
    mixes two. Its grad scaler follows from it and the device (fp16 on CUDA): a scaler's state the run does not use
    is left, a missing one starts afresh. The base's weights and inputs are stamped for every target: a baseline's
    own copies live beside them (its wrappers, or DreamBooth's weights from the step the stamp is taken, before any
    training; a baseline stopped early comes off the model before the next call stamps)."""
    prior = config.prior_images
    stamp = Stamp({
        "images": _images_digest(concept),
        "token": concept.token,
        "class_word": concept.class_word,
        "prompt": training_prompt(config, concept),
        "target": config.target,
        "rank": repr(config.rank),
        "seed": int(config.seed),
        "batch_size": int(config.batch_size),
        "flip": bool(config.flip),
        "prior_images": _images_digest(prior) if prior is not None else None,
        "unet": _architecture(pipe.unet),
        "weights": _weights(pipe.unet),
        "inputs": _inputs(pipe),
        "scheduler": _scheduler(pipe),
        "prior_weight": float(config.prior_weight) if prior is not None else None,
        "max_grad_norm": float(config.max_grad_norm) if config.max_grad_norm else None,  # 0 and None: no clipping
        "mixed_precision": PRECISION_WORDS[amp],
    })
    stamp.concept = concept
    return stamp


def checkpoint_file(config) -> Path | None:
    """Where a run keeps its checkpoint: ``checkpoint.pt`` in ``config.checkpoint_dir`` (``~`` expanded, not a
    folder named "~"); None without one."""
    return Path(config.checkpoint_dir).expanduser() / "checkpoint.pt" if config.checkpoint_dir else None


def save(path: Path, stamp: dict, target, optimizer, scaler, gen: torch.Generator, step: int,
         losses: list[float], seconds: float = 0.0) -> None:
    """Write the run's state at ``step`` to ``path`` in one rename (an interrupt never leaves half a file; a full
    disk raises an OSError naming the file and the space left, the previous checkpoint kept: ``atomic.writing``).
    ``seconds``: the run's wall time so far, its earlier calls included (a resumed run reports the whole)."""
    state = {"step": step, "target": {k: v.cpu() for k, v in target.state_dict().items()},
             "optimizer": optimizer.state_dict(), "generator": gen.get_state(), "losses": list(losses),
             "seconds": float(seconds),
             "scaler": scaler.state_dict() if scaler is not None else None, "fingerprint": dict(stamp)}
    try:
        with writing(path) as file:
            torch.save(state, file)
    except OSError as err:  # train_residuals tells the caller where the run's work is (the set on the model)
        err.prkit_checkpoint = path
        raise


def set_aside(path: Path, why: str = "diverged") -> Path | None:
    """Rename a run's checkpoint so that the next run does not resume it; returns the new path, or None when there
    was none. A diverged run's goes to ``<name>.diverged.pt`` (replacing an older one); a run that ``resume=False``
    starts over replaces is kept as ``<name>.replaced-<UTC time>.pt``, every one of them (a notebook rerun with
    resume off sets one aside per call)."""
    path = Path(path)
    if not path.is_file():
        return None
    aside = path.with_name(f"{path.stem}.{why}{path.suffix}")
    if why == "replaced":
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside = path.with_name(f"{path.stem}.replaced-{stamp}{path.suffix}")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.stem}.replaced-{stamp}-{n}{path.suffix}")
    os.replace(path, aside)
    return aside


def resume_hint(config) -> str:
    """How to continue an interrupted run, in the log's words: a ``resume=False`` run would set its checkpoint aside
    on the next call."""
    if config.resume:
        return "call again to resume"
    return "call again with resume=True (CLI: without --no-resume) to resume; resume=False would start over again"


def _same(key: str, saved, value) -> bool:
    if key in ("weights", "inputs") and isinstance(saved, list) and isinstance(value, list) and len(saved) == len(value):
        return all(abs(a - b) <= WEIGHTS_TOLERANCE * max(abs(a), abs(b)) for a, b in zip(saved, value))
    return saved == value


def _differences(saved: dict, stamp: dict) -> list[str]:
    out = []
    for key, value in stamp.items():
        if key not in saved or _same(key, saved[key], value):  # a key an older prkit did not stamp: not checked
            continue
        if key in ("weights", "inputs") and not saved[key]:  # not stamped by an older prkit: a baseline's (None),
            continue  # a compiled UNet's ([]: no weight under the plain names)
        hashed = key in ("images", "prior_images", "unet", "weights", "inputs", "scheduler")
        out.append(f"{key} ({'another one' if hashed else f'{saved.get(key)!r} there, {value!r} here'})")
    return out


def _continue_at_its_precision(saved: dict, stamp: dict, config) -> str:
    """How to continue a checkpoint trained at another precision (empty where the precisions agree or the
    checkpoint, an older prkit's, does not say): one run never mixes two."""
    there, here = saved.get("mixed_precision"), stamp.get("mixed_precision")
    if there is None or there == here:
        return ""
    auto = f" (this run's 'auto' is {here!r} on its device)" if config.mixed_precision == "auto" else ""
    return f" To continue it, train at its precision: mixed_precision={there!r}{auto}."


def restore(path: Path, stamp: dict, target, optimizer, scaler, gen: torch.Generator,
            config) -> tuple[int, list[float], float]:
    """Load the checkpoint at ``path`` into this run's state (``config``: its TrainConfig); returns (step, losses,
    seconds): the seconds the run had taken when it was saved (0.0 from a checkpoint of an older prkit).
    Raises CheckpointError, naming the file and the way out, when it is unreadable, was written by another run
    or is past this run's last step."""
    from . import train  # the loop's optimizer loading (it says when the learning rate changed)

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"step", "target", "optimizer", "generator"} <= set(state):
            raise ValueError("the keys of a prkit checkpoint are missing")
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(f"cannot resume from {str(path)!r}: it is damaged or not a prkit training checkpoint "
                              f"({type(err).__name__}). {START_OVER[0].upper()}{START_OVER[1:]}.") from err
    saved = state.get("fingerprint")
    if saved is None:
        log.warning("%s carries no fingerprint (written by an older prkit): resuming without checking that it "
                    "belongs to this run", path)
    else:
        differ = _differences(saved, stamp)
        if differ:
            copies = _copies_note(saved, stamp) if "images" in saved and saved["images"] != stamp["images"] else ""
            if any(d.startswith("weights") for d in differ):
                copies += getattr(target, "stamp_note", "")
            raise CheckpointError(
                f"{str(path)!r} belongs to another run (at step {state['step']}): it differs in "
                f"{', '.join(differ)}.{copies}{_continue_at_its_precision(saved, stamp, config)} To keep both, pass "
                f"another checkpoint_dir; {START_OVER}.")
    if state["step"] > config.steps:
        raise CheckpointError(f"{str(path)!r} is at step {state['step']}, past this run's steps={config.steps}: ask "
                              f"for at least {state['step']} steps to continue it; {START_OVER}.")
    decays = {float(g["weight_decay"]) for g in state["optimizer"].get("param_groups", []) if "weight_decay" in g}
    if state["step"] == config.steps and decays and decays != {float(config.weight_decay)}:
        raise CheckpointError(
            f"{str(path)!r} already holds all {config.steps} steps, trained at weight decay "
            f"{', '.join(f'{v:g}' for v in sorted(decays))}: this run's {config.weight_decay:g} would train nothing. "
            f"To train at it, start over ({WAYS}); to continue at it, ask for more steps.")
    trained_at = {float(g["lr"]) for g in state["optimizer"].get("param_groups", []) if "lr" in g}
    if (state["step"] == config.steps and config.learning_rate is not None and trained_at
            and trained_at != {float(config.learning_rate)}):  # nothing left to train: the new rate would never act
        rates = ", ".join(f"{v:g}" for v in sorted(trained_at))
        raise CheckpointError(
            f"{str(path)!r} already holds all {config.steps} steps, trained at learning rate {rates}: this run's "
            f"{config.learning_rate:g} would train nothing and its result would be that run's. To train at "
            f"{config.learning_rate:g}, start over ({WAYS}); to continue at it, ask for more steps.")
    try:
        target.load_state_dict(state["target"])
        train.load_optimizer(optimizer, state["optimizer"], config.learning_rate, path, config.weight_decay)
        # the other loop's moments may be laid out otherwise (the fast loop's channels-last): as this run's parameters
        match_state_layouts(optimizer.state, [p for group in optimizer.param_groups for p in group["params"]])
        gen.set_state(state["generator"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, losses = int(state["step"]), [float(v) for v in state["losses"]]
        seconds = float(state.get("seconds", 0.0))
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{str(path)!r} does not fit this run ({err}); {START_OVER}.") from err
    if step == config.steps:  # a rerun of a finished run: say why nothing trains (no bar, no validation images)
        log.warning("%s holds all %d steps of this run: nothing left to train, its residuals are returned; to train "
                    "again, %s", path, step, WAYS)
    else:
        log.warning("resuming from %s at step %d", path, step)
    return step, losses, seconds
