"""What both training loops (``train``'s eager one and ``fast``'s) do alike around their steps, word for word: a
run's resume from its checkpoint (stopped already at its ``stop_after`` or not), the message when it diverges, its
validation images, and the record a residual set keeps of it. Takes no step itself."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from . import checkpoints
from .residuals import Residuals
from .revisions import pipeline_revision
from .train_config import TrainConfig, _public

log = logging.getLogger(__name__)


class Resumed(NamedTuple):
    """Where a call starts: at step 0, or where its checkpoint left the run."""
    step: int
    losses: list  # the run's losses so far, appended to by the loop
    seconds: float  # the run's earlier calls' seconds
    finished: bool  # nothing left to train: the run's last step, or its stop_after, reached already
    stopped: bool  # at (or past) its stop_after already
    held: int | None  # the step whose state the checkpoint holds, where one was restored


def resume(ckpt: Path | None, stamp, target, optimizer, scaler, gen, config) -> Resumed:
    """Restore the run from ``ckpt`` where ``config.resume`` asks and the file is there (``checkpoints.restore``:
    the set, the optimizer, the scaler and ``gen`` as they were), else a run from step 0."""
    if ckpt is None or not config.resume or not ckpt.is_file():
        return Resumed(0, [], 0.0, False, False, None)
    step, losses, seconds = checkpoints.restore(ckpt, stamp, target, optimizer, scaler, gen, config)
    stopped = stopped_already(step, config, ckpt)
    return Resumed(step, losses, seconds, step >= config.steps or stopped, stopped, step)


def stopped_already(step: int, config, ckpt: Path | None) -> bool:
    """Whether a resumed run is already at (or past) its ``stop_after``: nothing trains in this call. The check after
    each step alone let every repeated call with the same stop_after train one more."""
    if config.stop_after is None or not config.stop_after <= step < config.steps:
        return False
    log.warning("%s is at step %d, already at stop_after=%d: this call trains nothing; to continue the run, pass a "
                "larger stop_after or none", ckpt, step, config.stop_after)
    return True


def diverged_message(value: float, step: int, ckpt: Path | None, config, amp, what: str = "the loss") -> str:
    """What to say when the loss (or ``what``: the eager loop's gradients) is NaN or infinite. The run's checkpoint,
    written on the way to the divergence, is set aside first (``checkpoints.set_aside``): a rerun at a lower rate
    would otherwise resume its weights and finish without a word."""
    aside = checkpoints.set_aside(ckpt) if ckpt is not None else None
    kept = (f" Its last checkpoint, trained on the way there, is set aside as {aside}, so a rerun starts over; to "
            f"continue from it anyway, rename it back to {ckpt.name}." if aside is not None else "")
    return (f"{what} became {value} at step {step}; the residuals were not updated with it.{kept} "
            f"Lower learning_rate (now {config.learning_rate})"
            f"{' or use mixed_precision=' + repr('no') if amp is not None else ''}.")


def validation_images(pipe, target, concept, config: TrainConfig) -> list:
    """The validation prompts' images with the set trained so far (none, with a warning, where they come out NaN:
    the run goes on; the refusal had ended it, its steps since the last checkpoint lost)."""
    from .sample import generate
    from .sample_checks import NonFiniteImages

    prompts = [p.format(token=concept.token, class_word=concept.class_word) for p in config.validation_prompts]
    pipe.unet.eval()
    residuals = target if isinstance(target, Residuals) else None
    half = getattr(target, "base_dtype", None)  # DreamBooth's fp32 master weights on a half-precision UNet
    with torch.autocast(pipe.unet.device.type, dtype=half, enabled=half in (torch.float16, torch.bfloat16),
                        cache_enabled=False):  # no cast cache: a CUDA graph may capture the UNet
        try:
            return generate(pipe, prompts, residuals, lag=False, seed=config.seed, steps=config.validation_steps)
        except NonFiniteImages as error:
            warnings.warn(f"validation images not made: {error}; training goes on", stacklevel=3)
            return []


def record_run(target, pipe, config: TrainConfig, seconds: float) -> None:
    """What a residual set keeps of the run that trained it: its settings, the base model's name and revision
    (``prkit.revisions``), the wall time. Other targets keep nothing."""
    if isinstance(target, Residuals):
        target.meta.update(config=_public(config), base_model=str(getattr(pipe, "name_or_path", "") or ""),
                           base_model_revision=pipeline_revision(pipe), seconds=seconds)
