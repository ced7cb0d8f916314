"""Loading a base model: the embedded world, a local diffusers folder, or a hub id.

Owns device/dtype choice, the load itself and a model folder's own training defaults; where a name points and what
its model index says (read before any weights) live in ``model_index``, re-exported here. It never downloads on its
own when the hub is offline and never changes global torch state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from pathlib import Path

import torch

# re-exported: prkit.pipeline stays their import path
from .model_index import (  # noqa: F401
    HUB_KWARGS, SUPPORTED, WORLD, _hub_file, _located, _looks_like_path, _missing_message, _model_index, _offline,
    _source, check_class, check_components, check_model_name, folder_variant, read_model_index, takes_safety_checker,
    unet_structure, world_path)

DEFAULTS_FILE = "prkit_defaults.json"  # a model folder's own training defaults: {target: {TrainConfig field: value}}
MODEL_DEFAULT_FIELDS = ("learning_rate",)  # what such a file may set (train and eval apply exactly these)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu."""
    if str(device) != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device {str(device)!r} is not a device torch knows ({err}); use 'auto', 'cpu', "
                             "'cuda', 'cuda:1', 'mps', ...") from err
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_available(device: torch.device) -> None:
    """Raise a clear ValueError when ``device`` names an accelerator this process cannot use (before any loading)."""
    if device.type in ("cpu", "meta"):
        return
    if device.type != "cuda":
        backend = getattr(torch, device.type, None) if device.type != "mps" else getattr(torch.backends, "mps", None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"device {str(device)!r} was asked for, but this torch ({torch.__version__}) cannot use "
                             f"it here; use device='cpu', 'cuda' or 'auto'")
        return
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but this torch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use device='cpu' or 'auto'")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} was asked for, but this machine has "
                         f"{torch.cuda.device_count()} CUDA GPU(s)")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or "auto" -> float32 on CPU/MPS, bfloat16 on GPUs that support it, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and str(dtype) != "auto":
        try:
            return {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                    "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[str(dtype)]
        except KeyError:
            raise ValueError(f"dtype {dtype!r} is not one of fp32, fp16, bf16, a torch dtype, or 'auto' (None: "
                             "fp32 on the CPU, bf16 or fp16 on a GPU)") from None
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA GPU ``device`` computes in bfloat16 natively: compute capability 8 or more (A100, A10, L4,
    RTX 30xx and later; ROCm). A T4 (Colab's free GPU) or a V100 only emulates it, far slower than fp16 with a grad
    scaler, although ``torch.cuda.is_bf16_supported()`` says yes there by default."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


class _Drop(logging.Filter):
    """Drops a logger's records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _library_notes_off():
    """Two library messages that do not apply to a prkit load: transformers' note that its image processors want
    torchvision (prkit loads none; twice per process), and diffusers' claim that a half-precision pipeline on the CPU
    will fail (it runs; once per module, three times per load). ``load_pipeline`` says what matters in its words."""
    drops = [(logging.getLogger("transformers.utils.import_utils"), _Drop("requires torchvision (not installed)")),
             (logging.getLogger("diffusers.pipelines.pipeline_utils"), _Drop("cannot run with `cpu` device"))]
    for logger, drop in drops:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in drops:
            logger.removeFilter(drop)


@functools.cache
def _dtype_kwarg() -> str:
    """``dtype`` where diffusers takes it (0.42 on; its ``torch_dtype`` warns there), else ``torch_dtype``. Asked
    when a pipeline loads, not at import (importing diffusers takes seconds)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def native_resolution(pipe) -> int:
    """The image side the pipeline's UNet was trained at (512 for SD1.5, 1024 for SDXL, 64 for the world)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def load_pipeline(name_or_path: str | os.PathLike = WORLD, device: str | torch.device = "auto",
                  dtype: str | torch.dtype | None = None, **kwargs):
    """Load a Stable Diffusion-family pipeline (SD1.x, SD2.x, SDXL) ready for prkit.

    Args:
        name_or_path: "world" (embedded default), a local diffusers folder, or a hub id; "" is refused (an unset
            variable; the current folder is ".").
        device: "auto", "cpu", "cuda", "cuda:1", ...
        dtype: None or "auto" (fp32 on the CPU, bf16 or fp16 on a GPU), "fp32", "fp16", "bf16" or a torch dtype (``torch_dtype=`` is accepted as an alias).
        **kwargs: passed to ``DiffusionPipeline.from_pretrained`` (``local_files_only=True`` is honoured; local
            folders and HF_HUB_OFFLINE=1 always load local files only; a local folder whose weights are in one
            ``variant`` alone, ``*.fp16.safetensors``, loads that variant without ``variant=``).
    Returns:
        the pipeline on ``device``; ``pipe.name_or_path`` records where it came from ("world", a hub id, or a local
        folder's absolute path), ``pipe.prkit_revision`` which revision of it (``prkit.revisions``; None: not known).
    """
    from diffusers import DiffusionPipeline

    check_model_name(name_or_path, "load_pipeline")  # Path("") is '.': it loaded the current folder
    device = resolve_device(device)
    check_available(device)
    torch_dtype = kwargs.pop("torch_dtype", None)  # diffusers' spelling of prkit's dtype
    if torch_dtype is not None and str(torch_dtype) != "auto":
        if dtype is not None and str(dtype) != "auto" and resolve_dtype(dtype, device) != resolve_dtype(torch_dtype, device):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them "
                             "(torch_dtype is an alias of dtype)")
        dtype = torch_dtype
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    source, local, local_only = _located(name, kwargs)
    with _library_notes_off():  # the index, the class and its components import diffusers and transformers parts
        try:
            index = _model_index(source, local, local_only, kwargs)
            check_class(name, index.get("_class_name"), kwargs)
            if takes_safety_checker(index.get("_class_name")):
                kwargs.setdefault("safety_checker", None)  # SD1.x folders ship one; personalization needs none
                if kwargs["safety_checker"] is None and local and not (Path(source) / "feature_extractor").is_dir():
                    kwargs.setdefault("feature_extractor", None)  # it only feeds the safety checker
            if local:
                check_components(Path(source), index, kwargs)
                if kwargs.get("variant") is None and (variant := folder_variant(Path(source), index)):
                    kwargs["variant"] = variant  # diffusers looks for plain weights alone and names a .bin it lacks
            pipe = DiffusionPipeline.from_pretrained(source, **{_dtype_kwarg(): dtype}, local_files_only=local_only,
                                                     **kwargs)
        except (OSError, ValueError) as err:
            if local:
                raise
            raise RuntimeError(_missing_message(name, err, local_only, kwargs.get("revision"))) from err
    if type(pipe).__name__ not in SUPPORTED or not hasattr(pipe, "unet"):
        raise TypeError(f"{name!r} loaded as {type(pipe).__name__}; prkit supports {', '.join(SUPPORTED)}")
    if device.type == "cpu" and dtype != torch.float32:
        warnings.warn(f"{str(dtype).replace('torch.', '')} on the CPU: it runs, but most CPUs compute it slower than "
                      "fp32 (the CPU default, dtype=None)", UserWarning, stacklevel=2)
    with _library_notes_off():
        pipe = pipe.to(device)
    # a local folder as an absolute path: residual files record it, and 'models/sd15' read from another folder
    # would be taken for a hub id
    pipe.register_to_config(_name_or_path=str(Path(source).resolve()) if local and name != WORLD else name)
    pipe.prkit_defaults = read_model_defaults(source) if local else {}
    from .revisions import pipeline_revision

    # what the name stood for (prkit.revisions); None: not known, or components given in place of the model's own
    given = [key for key, value in kwargs.items() if isinstance(value, torch.nn.Module)]
    pipe.prkit_revision = None if given else pipeline_revision(pipe)
    return pipe


def offloading(module: torch.nn.Module) -> str | None:
    """How ``module`` is offloaded between calls, if it is: "accelerate" (``enable_model_cpu_offload``,
    ``enable_sequential_cpu_offload``, accelerate's hooks) or "group" (diffusers' ``enable_group_offload``)."""
    for sub in module.modules():
        if hasattr(sub, "_hf_hook"):
            return "accelerate"
        registry = sub.__dict__.get("_diffusers_hook")
        if registry is not None and registry.get_hook("group_offloading") is not None:
            return "group"
    return None


def read_model_defaults(folder: str | os.PathLike) -> dict:
    """The training defaults a pipeline folder ships in ``prkit_defaults.json`` ({} when it has none).

    A small model can need its own recipe (the world learns at lr 1e-2, not METHOD.md's 1e-3); keeping it in
    the model folder makes every entry point (train, eval, bench, notebooks) use it without repeating it.
    Format: ``{"residuals": {"learning_rate": 0.01}}`` (target -> TrainConfig fields).
    """
    import json

    check_model_name(folder, "read_model_defaults", "folder", "the model's folder ('.' for the current one)")
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path} must map training targets to field dicts, e.g. "
                         '{"residuals": {"learning_rate": 0.01}}')
    unknown = {f"{t}.{k}" for t, fields in data.items() for k in fields if k not in MODEL_DEFAULT_FIELDS}
    if unknown:
        raise ValueError(f"{path} sets {', '.join(sorted(unknown))}; a model folder may set only "
                         f"{', '.join(MODEL_DEFAULT_FIELDS)} per target (pass other settings to TrainConfig)")
    return data


def model_defaults(pipe, target: str = "residuals") -> dict:
    """TrainConfig fields the loaded model recommends for ``target`` (from its folder's prkit_defaults.json)."""
    return dict(getattr(pipe, "prkit_defaults", None) or {}).get(target, {})
