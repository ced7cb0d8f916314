"""The personalization recipe's settings (``TrainConfig``, validated on creation), its defaults that depend on the
model (learning rate, precision, resolution check) and what a run returns (``TrainResult``). No loop here."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checks import check_flag, check_whole
from .residuals import Residuals

if TYPE_CHECKING:
    from .fast import FastConfig


PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """The recipe (METHOD.md section 1); every default is the paper's or ours where it is silent."""

    steps: int = 150  # optimizer steps
    batch_size: int = 4
    learning_rate: float | None = None  # AdamW, constant, no warm-up. None: the model folder's default for the
    # target (prkit_defaults.json; the world: 1e-2), else the target's published recipe (residuals: METHOD's 1e-3)
    weight_decay: float = 1e-2
    rank: float | int = 0.05  # fraction of channels or fixed rank
    seed: int = 0  # seeds init, batches, noise and timesteps
    prompt_template: str | None = None  # None: the concept's (load_concept reads it from concept.json), whose own
    # default is "a photo of a {token} {class_word}"
    flip: bool = True  # cache both horizontal flips of every image
    # auto (on GPUs the UNet's own half precision, else bf16 / fp16+scaler where bf16 is not native; fp32 on CPU)
    mixed_precision: str = "auto"  # | no | bf16 | fp16
    target: str = "residuals"  # what is trained (see TARGETS)
    checkpoint_every: int = 50  # steps between checkpoints, the last step always one (0: none)
    checkpoint_dir: str | None = None  # where checkpoint.pt lives; resume reads it
    resume: bool = True  # continue from checkpoint_dir/checkpoint.pt (False: start over, keeping it aside)
    validate_every: int = 0  # steps between validation images (0: none)
    validation_prompts: tuple[str, ...] = ()  # "{token}"/"{class_word}" placeholders allowed
    validation_steps: int | None = 25  # sampling steps of each validation image (None: generate's default)
    prior_images: object = None  # a Concept of class images: prior preservation (off by default, ablation)
    prior_weight: float = 1.0
    max_grad_norm: float | None = None
    gradient_checkpointing: bool = False
    stop_after: int | None = None  # stop (as if interrupted) after this many steps, checkpoint written
    # the CUDA-graph loop of prkit.fast; None: on for CUDA, off elsewhere; a prkit.fast.FastConfig: on, with its
    # switches (FastConfig(sdpa_backends=None): cuDNN attention, ~0.7 s faster per SD1.5 run after a process's first)
    fast: bool | None | FastConfig = None

    def __post_init__(self):
        from .residuals import plain_rank

        # numpy or torch numbers (np.int64(300) from a sweep) as Python's, as rank takes them: they were refused as
        # "must be a whole number >= 1, got np.int64(300)" (and would not go into the residual file's JSON record)
        for name in ("steps", "batch_size", "learning_rate", "weight_decay", "seed", "checkpoint_every",
                     "validate_every", "validation_steps", "prior_weight", "max_grad_norm", "stop_after", "rank"):
            setattr(self, name, plain_rank(getattr(self, name)))
        check_whole(self, ("steps", "batch_size"), 1)
        check_whole(self, ("checkpoint_every", "validate_every"), 0, " (0: never)")
        # else generate() refused it at the first validation, validate_every steps into the run
        check_whole(self, ("validation_steps",), 1, " (or None: generate's default)")
        rate = self.learning_rate
        if rate is not None and not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"TrainConfig.learning_rate must be a positive number (or None: the default), "
                             f"got {rate!r}")
        self._check_more()

    def _check_more(self) -> None:
        template = self.prompt_template
        if template is not None:
            from .data import template_problem  # load_concept's rule

            problem = template_problem(template)
            if problem:
                raise ValueError(f"TrainConfig.prompt_template {template!r} {problem} (e.g. 'a photo of a {{token}} "
                                 "{class_word}')")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 64:
            raise ValueError(f"TrainConfig.seed must be a whole number (a 64-bit seed), got {seed!r}")
        for name in ("resume", "flip", "gradient_checkpointing"):  # papermill's -p gives 'false', which is truthy
            check_flag(getattr(self, name), f"TrainConfig.{name}")
        if self.fast is not None and not isinstance(self.fast, bool):  # 'false' was truthy: it chose the fast loop
            from .fast import FastConfig  # only here: prkit.fast imports Triton

            if not isinstance(self.fast, FastConfig):
                check_flag(self.fast, "TrainConfig.fast", " or None (or a prkit.fast.FastConfig)")
        from .residuals import rank_for
        from .targets import TARGETS

        if not isinstance(self.rank, dict):  # a per-block dict is checked per block when the residuals are added
            try:
                rank_for(1, self.rank)
            except ValueError as err:
                raise ValueError(f"TrainConfig.{err}") from None
        if self.target not in TARGETS:
            raise ValueError(f"TrainConfig.target {self.target!r} is not a training target; use one of "
                             f"{', '.join(TARGETS)}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.mixed_precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.mixed_precision!r}")
        # weight_decay: AdamW's decay by inf made every weight NaN, reported as a divergence of the learning rate
        for name, optional in (("max_grad_norm", True), ("prior_weight", False), ("weight_decay", False)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0"
                                 f"{' (or None: no clipping)' if optional else ''}, got {value!r}")
        prompts = self.validation_prompts
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("TrainConfig.validation_prompts must be a list of prompts (strings), not "
                             f"{type(prompts).__name__} {prompts!r}: write ('a photo of a {{token}} {{class_word}}',)")
        for prompt in prompts:
            try:
                prompt.format(token="sks", class_word="dog")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"TrainConfig.validation_prompts: {prompt!r} may use only {{token}} and "
                                 f"{{class_word}} as placeholders ({type(err).__name__}: {err})") from None
        if self.prior_images is not None and not hasattr(self.prior_images, "tensors"):
            raise ValueError("TrainConfig.prior_images must be a prkit Concept of class images "
                             f"(prkit.load_concept(folder, ...)), got {type(self.prior_images).__name__}")
        if self.stop_after is not None and (isinstance(self.stop_after, bool) or not isinstance(self.stop_after, int)
                                            or self.stop_after < 1):
            raise ValueError(f"TrainConfig.stop_after must be a whole number >= 1 (or None), got {self.stop_after!r}")


def default_learning_rate(pipe, target: str = "residuals", batch_size: int | None = None) -> float:
    """The learning rate used when TrainConfig leaves it None: the model folder's default for ``target``, else the
    target's published recipe (``targets.RECIPES``; scaled by batch size where that recipe scales it)."""
    from .pipeline import model_defaults
    from .targets import recipe

    own = model_defaults(pipe, target).get("learning_rate")
    if own is not None:
        return float(own)
    try:
        return float(recipe(target, **({"batch_size": batch_size} if batch_size else {}))["learning_rate"])
    except KeyError:  # a target without a published recipe: METHOD's rate
        return 1e-3


def _check_resolution(pipe, concept) -> None:
    """Warn when the concept's images are far from the model's native size (slow and off-distribution)."""
    from .pipeline import native_resolution

    images = getattr(concept, "images", None)
    if not images:
        return
    side, native = min(images[0].size), native_resolution(pipe)
    if side >= 2 * native or 2 * side <= native:
        warnings.warn(f"the concept's images are {side}px but the model's native resolution is {native}px: "
                      f"training at {side}px is {(side / native) ** 2:.3g}x the work and off the model's "
                      f"distribution; load them with load_concept(..., resolution={native}) "
                      "(prkit.native_resolution(pipe))", stacklevel=3)


def _check_validation(config: TrainConfig) -> None:
    """Warn when only one of validate_every and validation_prompts is given: validation needs both, and a run with one
    made no validation images without a word. Checked when training starts, on the settings it trains with (a
    keyword override may give the other), not on each TrainConfig made on the way."""
    if config.validation_prompts and not config.validate_every:
        warnings.warn("TrainConfig.validation_prompts are given but validate_every is 0, so no validation images are "
                      "made: set validate_every (steps between them, e.g. validate_every=50), or leave "
                      "validation_prompts empty to train without them", stacklevel=3)
    elif config.validate_every and not config.validation_prompts:
        warnings.warn(f"TrainConfig.validate_every={config.validate_every} but validation_prompts is empty, so no "
                      "validation images are made: set validation_prompts (e.g. ('a photo of a {token} "
                      "{class_word}',)), or validate_every=0 to train without them", stacklevel=3)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingWriteError(OSError):
    """A write failed during training (a checkpoint on a full disk, in a folder no longer writable): the message adds
    that the residual set trained until then stays on the model and how to keep it; ``error``: the write's own error
    (the command line, whose model goes with its process, says the rest in its own words). Made by ``of``, it is an
    instance of the write's own class too (``except PermissionError`` still catches a folder no longer writable),
    with its errno, file name and attributes."""

    error: OSError
    _kind: type[OSError] = OSError  # the write's own class that this one is too (OSError: none more)

    @classmethod
    def of(cls, error: OSError, text: str) -> TrainingWriteError:
        """``error`` (the write's) saying ``text``, as a TrainingWriteError that is also of ``type(error)``."""
        kind = _write_error_class(type(error))
        out = kind(error.errno, text, error.filename, None, error.filename2) if error.errno else kind(text)
        # its attributes (the checkpoint it did not write: prkit_checkpoint); not its notes, which the chained
        # traceback shows with the write's own error (copied, they printed twice)
        out.__dict__.update({k: v for k, v in vars(error).items() if k != "__notes__"})
        out.error = error
        return out

    def __reduce__(self):  # a class made per kind is not found by its name: unpickled through the kind
        if not type(self).__dict__.get("_made"):  # TrainingWriteError itself, or a subclass of somebody's: as usual
            return super().__reduce__()
        _, args, *state = super().__reduce__()
        kind = self._kind  # by name: pickle's protocols 0-2 write PermissionError and the others as OSError
        return (_training_write_error, ((kind.__module__, kind.__qualname__), args), *state)


_WRITE_ERROR_CLASSES: dict[type, type] = {}  # the write's class -> TrainingWriteError's class that is also one


def _write_error_class(kind: type[OSError]) -> type[TrainingWriteError]:
    """The TrainingWriteError class that is also a ``kind`` (one per kind, cached). A kind with constructors of its
    own, outside the built-in ones, could read the errno and message otherwise: TrainingWriteError alone."""
    if issubclass(kind, TrainingWriteError):
        return kind
    if kind not in _WRITE_ERROR_CLASSES:
        own = [c for c in kind.__mro__ if c.__module__ != "builtins" and {"__init__", "__new__"} & c.__dict__.keys()]
        made = TrainingWriteError
        if kind is not OSError and not own:
            try:
                # OSError's str: a kind's own __str__ would replace the message (that the set stays on the model)
                made = type(f"TrainingWriteError[{kind.__name__}]", (TrainingWriteError, kind),
                            {"__module__": __name__, "_kind": kind, "_made": True, "__str__": OSError.__str__,
                             "__doc__": TrainingWriteError.__doc__})
            except TypeError:  # a layout that cannot be mixed in
                pass
        _WRITE_ERROR_CLASSES[kind] = made
    return _WRITE_ERROR_CLASSES[kind]


def _training_write_error(kind: tuple[str, str] | type, args: tuple) -> TrainingWriteError:
    """A pickled TrainingWriteError back: of its kind's class (``kind``: its module and qualified name), from its
    arguments (its attributes follow). A kind that cannot be found is the errno's, as OSError's constructor picks it."""
    if isinstance(kind, tuple):
        import importlib

        try:
            found = importlib.import_module(kind[0])
            for part in kind[1].split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
        kind = found if isinstance(found, type) and issubclass(found, OSError) else OSError
    return _write_error_class(type(OSError(*args)) if kind is OSError else kind)(*args)


@dataclass
class TrainResult:
    """What a run returns. ``checkpoint``: the file holding the run's final state (``steps_done`` steps: written at
    the last step, or resumed with nothing left to train), None where no file holds it: without a checkpoint_dir, or
    with checkpoint_every=0, which writes only where a run stops early (it named the file a resumed run had begun
    from, an earlier step's state, or a file never written)."""

    residuals: Residuals
    losses: list[float]
    seconds: float  # the run's wall time, the calls before a resume from its checkpoint included
    steps_done: int
    completed: bool
    validation: dict[int, list] = field(default_factory=dict)
    checkpoint: Path | None = None


def _precision(config: TrainConfig, device: torch.device, stored: torch.dtype | None = None) -> torch.dtype | None:
    """The autocast dtype of training (None: none). "auto": off on CPUs; on GPUs the UNet's own half precision
    when it is stored in one (the two halves cannot mix in a step), else bf16 where native, fp16 otherwise."""
    mode = config.mixed_precision
    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        if stored in (torch.bfloat16, torch.float16):
            return stored
        from .pipeline import resolve_dtype

        return resolve_dtype(None, device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def training_template(config: TrainConfig, concept) -> str:
    """The template the concept's images are trained under: the recipe's if it sets one, else the concept's own
    (concept.json), else "a photo of a {token} {class_word}"."""
    from .data import DEFAULT_PROMPT_TEMPLATE

    return config.prompt_template or getattr(concept, "prompt_template", None) or DEFAULT_PROMPT_TEMPLATE


def training_prompt(config: TrainConfig, concept) -> str:
    return training_template(config, concept).format(token=concept.token, class_word=concept.class_word)


def _public(config: TrainConfig) -> dict:
    """The settings as plain data: the prior images as "given" (asdict would deep-copy every class image first)."""
    shallow = copy.copy(config)
    shallow.prior_images = None
    out = asdict(shallow)
    out["prior_images"] = None if config.prior_images is None else "given"
    return out
