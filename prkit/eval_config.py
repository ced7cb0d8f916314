"""What an evaluation runs (``EvalConfig``, checked when it is made) and where each of its training runs keeps its
checkpoint (``checkpoint_folder``). Re-exported by ``prkit.evaluate``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .checks import check_flag, check_whole
from .eval_results import METHODS

DEFAULT_METHODS = ("residuals", "lora", "custom_diffusion", "textual_inversion", "dreambooth")


@dataclass
class EvalConfig:
    """What an evaluation runs; every training recipe is the method's published one (``targets.RECIPES``)."""

    protocol: str = "world"  # world | dreambooth | customconcept101
    data: str | None = None  # dataset root for dreambooth / customconcept101
    model: str = "world"  # base pipeline: "world", a diffusers folder or a hub id
    methods: tuple[str, ...] = DEFAULT_METHODS  # "residuals" is sampled with and without LAG; "base" trains nothing
    subjects: tuple[str, ...] = ()  # empty: all of the protocol's subjects
    max_prompts: int | None = None  # only the first N prompts of each subject (smoke runs)
    images_per_prompt: int = 4  # seeds 0..N-1 of one generator per prompt
    sample_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0  # training and sampling seed
    token: str = "sks"  # identifier for dreambooth / customconcept101 (world concepts bring their own)
    train: dict = field(default_factory=dict)  # method -> recipe overrides, e.g. {"textual_inversion": {"steps": 500}}
    clip: str | None = "auto"  # hub id, folder or "world"; auto: "world" on the world, CLIP ViT-B/32 elsewhere
    dino: str | None = "auto"  # auto: DINO ViT-S/16; None: off
    download_backbones: bool = False  # fetch CLIP/DINO hub ids missing from the local cache (default: no network)
    out: str = "runs/eval"
    device: str = "auto"  # with several ranks, "auto" is cuda:LOCAL_RANK
    dtype: str | None = None  # pipeline dtype (None: bf16/fp16 on GPUs, fp32 elsewhere)
    save_images: bool = False  # PNGs under out/images/<method>/<subject>/
    ci_over: str = "image"  # 95% interval over images or over per-subject means ("subject")

    def __post_init__(self):
        for name in ("methods", "subjects"):  # one name, as diffusers takes one prompt: not its letters as names
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value or ()))  # subjects None: all
        if not self.methods:
            raise ValueError(f"EvalConfig.methods is empty: name one or more of {', '.join(METHODS)}")
        check_whole(self, ("images_per_prompt", "sample_steps"), 1)
        check_whole(self, ("seed",), 0)
        check_whole(self, ("max_prompts",), 1, " (or None: all)")
        for name in ("download_backbones", "save_images"):  # papermill's -p gives 'false', which is truthy
            check_flag(getattr(self, name), f"EvalConfig.{name}")
        if not (isinstance(self.guidance_scale, (int, float)) and 0 <= self.guidance_scale < float("inf")):
            raise ValueError(f"EvalConfig.guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        import torch

        if not isinstance(self.dtype, torch.dtype) and self.dtype not in (None, "fp32", "float32", "fp16", "float16",
                                                                          "bf16", "bfloat16"):
            raise ValueError(f"EvalConfig.dtype must be None, 'fp32', 'fp16' or 'bf16', got {self.dtype!r}")
        if self.ci_over not in ("image", "subject"):  # checked before any job runs, not at the summary
            raise ValueError(f"EvalConfig.ci_over must be 'image' or 'subject', got {self.ci_over!r}")
        for method, overrides in self.train.items():  # before any model loads, not at the method's first job
            if isinstance(overrides, dict) and overrides.get("checkpoint_dir"):
                checkpoint_folder(overrides["checkpoint_dir"], method, "subject")
            check_recipe(method, overrides, self.seed)


def check_recipe(method: str, overrides, seed: int = 0) -> None:
    """Refuse ``method``'s recipe overrides (``EvalConfig.train``) that its ``TrainConfig`` would refuse, before any
    job: ``--set lora.steps=0`` was refused at lora's first job, after every job of the methods before it."""
    from .targets import recipe
    from .train_config import TrainConfig

    if method == "base":  # trains nothing: no recipe to check
        return
    if not isinstance(overrides, dict):
        raise ValueError(f"EvalConfig.train[{method!r}] must be a dict of recipe fields, got {overrides!r}")
    if "scale_lr" in overrides:  # the recipe's own key, no TrainConfig field: a string 'false' scaled the rate
        check_flag(overrides["scale_lr"], f"EvalConfig.train[{method!r}].scale_lr")
    given = {k: v for k, v in overrides.items() if not (k == "prior_images" and prior_folder(v) is not None)}
    if given.get("checkpoint_dir"):
        given["checkpoint_dir"] = checkpoint_folder(given["checkpoint_dir"], method, "subject")
    try:
        TrainConfig(**{"seed": seed, **recipe(method, **given)})
    except (KeyError, TypeError, ValueError) as err:
        reason = err.args[0] if isinstance(err, KeyError) else err  # (a KeyError's str is quoted)
        raise ValueError(f"the {method} recipe's overrides (EvalConfig.train[{method!r}], --set {method}.FIELD=VALUE):"
                         f" {reason}") from err


def prior_folder(value) -> str | None:
    """A ``prior_images`` override that names a folder of class images (a str or a Path, "{subject}" in it
    replaced by the subject's name), as text; None for anything else (a loaded Concept)."""
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None


def checkpoint_folder(folder, method: str, subject: str) -> str:
    """Where an evaluation's run of ``method`` on ``subject`` keeps its checkpoint, given the method's
    ``checkpoint_dir``: ``<folder>/<method>/<subject>``, or where the folder's name holds ``{subject}`` or
    ``{method}``, the name with them filled in. A folder shared by a method's subjects (and maybe by other methods)
    would have every run after the first refuse the first one's checkpoint. Other braces are refused."""
    import string

    text = str(folder)
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as err:  # an unmatched brace
        raise ValueError(f"{method}.checkpoint_dir={text!r}: {err}; name the folder with {{subject}} and {{method}} "
                         "only, or without braces") from err
    bad = ["{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
           for name, spec, conv in fields if name not in ("subject", "method") or spec or conv]
    if bad:
        raise ValueError(f"{method}.checkpoint_dir={text!r} names {', '.join(bad)}; only {{subject}} and {{method}} "
                         "are filled in (or no braces: <folder>/<method>/<subject>)")
    if "{subject}" in text or "{method}" in text:
        return str(Path(text.format(subject=subject, method=method)).expanduser())
    return str(Path(text).expanduser() / method / subject)
