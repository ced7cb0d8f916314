"""Residual files: ``.safetensors`` with metadata, loading with checks, kohya/diffusers LoRA export.

Owns the on-disk formats; files are written whole by ``prkit.atomic`` and read by ``prkit.safetensors_read``. It does
not train or sample.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from . import __version__
# re-exported: prkit.files stays their import path
from .atomic import ABANDONED_AFTER, atomic_path, reworded, write_error, writing  # noqa: F401
from .residuals import Residuals, add_residuals, find_projections, finite_scale, residual_names, usable_set_name
from .safetensors_read import read_whole, safetensors_header  # noqa: F401  (re-exported: prkit.files stays its path)
from .train_config import TrainConfig, _public

log = logging.getLogger(__name__)
FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what a residual set's factors may be

FORMAT = "prkit.residuals/1"
COMPILED = "_orig_mod"  # the segment torch.compile's wrapper adds to module names (saves before d84657a kept it)


def architecture(unet) -> str:
    """'sd1' (conv proj_out), 'sd2' (linear), 'sdxl' (linear + text_time embedding) or 'unknown'."""
    config = getattr(unet, "config", None)
    if config is None:
        return "unknown"
    if getattr(config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd2" if getattr(config, "use_linear_projection", False) else "sd1"


def layer_table(unet) -> dict[str, int]:
    """Block name -> channels of its proj_out."""
    table = {}
    for block, proj in find_projections(unet).items():
        base = getattr(proj, "base_layer", proj)
        table[block] = getattr(base, "in_channels", None) or base.in_features
    return table


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file through a temporary file and a rename: a crash never leaves half a file, a full
    disk says so (``writing``). Serialized in memory first (residual sets and LoRAs are small): safetensors' own
    writer reports a full disk as an error of its own."""
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with writing(path) as file:
        file.write(data)
    return Path(path).expanduser()


def save_residuals(residuals: Residuals, path, *, base_model: str | None = None, config: dict | None = None,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Save one residual set with a self-describing header.

    Args:
        residuals: the set to save.
        path: destination ``.safetensors``.
        base_model: name or path of the base model (recorded; ``prkit export`` and ``prkit info`` read it; loading
            checks the layers and channels, not the name: a file from another model of the same architecture loads).
            The revision of it the training recorded (``prkit.revisions``) is kept as ``base_model_revision`` where
            ``base_model`` names the model it trained on (or is not given).
        config: the training configuration (recorded as JSON).
    """
    _check_set(residuals, path, "save_residuals")
    if dtype not in FACTOR_DTYPES:
        kind = "a dtype loading refuses" if isinstance(dtype, torch.dtype) else "not a torch dtype"
        raise TypeError(f"save_residuals: dtype={dtype!r} is {kind}; pass torch.float32, torch.float16 or "
                        "torch.bfloat16")
    if config is None or isinstance(config, Mapping) and not config:  # none given: the training's own, if recorded
        config = residuals.meta.get("config") or {}
    if isinstance(config, TrainConfig):
        config = _public(config)  # (its prior images as "given", not their pixels)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"save_residuals: config= is a {type(config).__name__}, not a mapping of training settings "
                        "(a dict, or a TrainConfig); loading refuses a header whose config is not a JSON object")
    unet = residuals.unet
    channels = layer_table(unet)
    layers = {block: {"channels": channels[block], "rank": rank} for block, rank in residuals.ranks().items()}
    meta = {
        "format": FORMAT, "prkit_version": __version__, "name": residuals.name,
        "token": residuals.token or "", "class_word": residuals.class_word or "",
        "base_model": str(base_model or residuals.meta.get("base_model") or ""),  # a folder may come as a Path
        "architecture": architecture(unet), "layers": json.dumps(layers),
        "scale": str(residuals.scale), "config": json.dumps(dict(config), default=str),
    }
    revision = _revision_of(residuals, base_model)
    if revision:  # which revision of the base model it trained on (prkit.revisions); older files have none
        meta["base_model_revision"] = json.dumps(revision)
    if residuals.meta.get("seconds") is not None:  # the training's wall time (prkit info shows it)
        meta["seconds"] = f"{float(residuals.meta['seconds']):.3f}"
    tensors = {k: v.to(dtype) for k, v in residuals.state_dict().items()}
    return atomic_save(tensors, path, meta)


def _check_set(residuals, path, caller: str) -> None:
    """Refuse a first argument of ``caller`` that is no set's handle (a UNet, a set's name, a list of sets, the
    arguments swapped) with a TypeError saying what to pass."""
    if isinstance(residuals, Residuals):
        return
    got = f"got {type(residuals).__name__}"
    if isinstance(path, Residuals):
        hint = f"{got} and Residuals (swapped?)"
    elif isinstance(residuals, (list, tuple)):
        hint = f"{got}; one set per file: write each set to a file of its own"
    else:
        unet = getattr(residuals, "unet", residuals)
        names = residual_names(unet) if isinstance(unet, torch.nn.Module) else []
        on = f" (on this one: {', '.join(map(repr, names))})" if names else ""
        hint = f"{got}; prkit.get_residuals(unet, name) gives the handle of a set on a UNet{on}"
    raise TypeError(f"{caller}(residuals, path) takes a residual set's handle (a Residuals) first and the file "
                    f"second; {hint}")


def _revision_of(residuals: Residuals, base_model) -> dict | None:
    """The revision of its base model the training recorded, where ``base_model`` (given to save) names that model
    too: a set saved as another model's records none."""
    def named(name) -> str:  # a folder as its resolved path: `prkit train --model sd15` names the folder loaded
        path = Path(str(name)).expanduser()
        return str(path.resolve()) if str(name) and path.exists() else str(name)

    revision = residuals.meta.get("base_model_revision")
    if not isinstance(revision, dict):
        return None
    if base_model and named(base_model) != named(residuals.meta.get("base_model") or ""):
        return None
    return revision


def _read_revision(path, recorded) -> dict | None:
    """A header's ``base_model_revision`` parsed; None where there is none (older files) or it is no JSON object."""
    if recorded is None:
        return None
    try:
        revision = json.loads(recorded)
    except ValueError:
        revision = None
    if not isinstance(revision, dict):
        if recorded != "null":
            log.warning("%r records its base model's revision as %r, not as a JSON object; it is left out",
                        str(path), recorded[:80])
        return None
    return revision


def read_metadata(path) -> dict:
    """The header of a residual file, with ``layers`` and ``config`` parsed."""
    return _parsed(safetensors_header(path, "residual file"), path)


def read_residual_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header (as ``read_metadata`` gives it) and the tensors of the residual file ``path``, from one open of
    it: both are of one version of it, also where a save replaces the file meanwhile (two opens read one version's
    header with the next one's tensors, refused as damage). Its header alone is read first, so that a large file that
    is no residual set (a model checkpoint) is refused before all its bytes are read."""
    _check_format(safetensors_header(path, "residual file"), path)
    meta, tensors = read_whole(path, "residual file")
    return _parsed(meta, path), tensors


def _check_format(meta: dict, path) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a prkit residual file (format={meta.get('format')!r}); "
                         f"{_instead(path)}")


def _instead(path) -> str:
    """What to do with the .safetensors file ``path`` that holds no residual set: a LoRA loads with
    ``load_lora_weights``; for anything else (a model's weights), what it holds (its tensors' names, from its
    header: nothing else is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # safetensors raises its own error types; the refusal stands without the detail
        keys = []
    if not keys or any("lora" in key.lower() for key in keys):
        return "LoRA files load with pipe.load_lora_weights instead"
    shown = ", ".join(map(repr, keys[:2])) + (", ..." if len(keys) > 2 else "")
    count = f"{len(keys)} tensor{'s' if len(keys) > 1 else ''}"
    return (f"it holds {count} and no LoRA ({shown}: a model's weights?); give a .safetensors file "
            "written by Residuals.save or prkit train")


def _parsed(meta: dict, path) -> dict:
    """A residual file's header (``meta``, its safetensors metadata) checked, with ``layers`` and ``config``
    parsed."""
    _check_format(meta, path)
    try:
        meta["layers"] = json.loads(meta["layers"])
        config = meta.get("config") or "{}"
        try:
            meta["config"] = json.loads(config)
        except ValueError:  # text that is no JSON (a header edited by hand): a record, not worth refusing the set for
            meta["config"] = config
        if meta["config"] is None:
            meta["config"] = {}
        elif not isinstance(meta["config"], dict):  # older saves wrote a TrainConfig given as config= as its text:
            log.warning("%r records its training settings as %s, not as a JSON object; they are kept as the config's "
                        "'recorded' entry", str(path), type(meta["config"]).__name__)  # not worth refusing the set
            meta["config"] = {"recorded": meta["config"]}
        if not isinstance(meta["layers"], dict) or not all(
                isinstance(v, dict) and {"channels", "rank"} <= set(v) for v in meta["layers"].values()):
            raise ValueError("'layers' is not a table of block -> {channels, rank}")
        layers = {uncompiled(block): info for block, info in meta["layers"].items()}
        if len(layers) != len(meta["layers"]):
            raise ValueError(f"'layers' names blocks both with and without {COMPILED!r}")
        meta["layers"] = layers
        for block, info in meta["layers"].items():
            for key in ("channels", "rank"):
                value = info[key]
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(f"'layers' gives {block} {key}={value!r}; expected a positive whole number")
        finite_scale(meta.get("scale", 1.0), "the header", text=True)  # safetensors' metadata is text
    except (KeyError, ValueError) as err:
        raise ValueError(f"{str(path)!r} has a damaged prkit header ({type(err).__name__}: {err}); "
                         "save the residuals again") from err
    meta["base_model_revision"] = _read_revision(path, meta.get("base_model_revision"))  # not worth refusing for
    return meta


def uncompiled(name: str) -> str:
    """``name`` without the ``_orig_mod`` segments of torch.compile's wrapper ('_orig_mod.down_blocks.0.attentions.0'
    -> 'down_blocks.0.attentions.0'): a set saved from a compiled UNet before d84657a (which made block names plain)
    named its blocks and tensors so, and was refused as made for another base model. Only that exact segment goes:
    a block of another name is left as it is, and check_compatible names it."""
    return ".".join(part for part in name.split(".") if part != COMPILED)


def check_compatible(meta: dict, unet, path) -> None:
    """Raise a clear ValueError when the file's layers do not match ``unet``'s transformer blocks."""
    have = layer_table(unet)
    want = {block: info["channels"] for block, info in meta["layers"].items()}
    kinds = meta.get("architecture"), architecture(unet)
    same_kind = kinds[0] == kinds[1] or "unknown" in kinds or not kinds[0]  # SD1.5 and SD2.1 share the table
    if have == want and same_kind:
        return
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(b for b in set(want) & set(have) if want[b] != have[b])
    details = []
    if missing:
        details.append(f"blocks missing from this UNet: {missing[:4]}{'...' if len(missing) > 4 else ''}")
    if extra:
        details.append(f"blocks of this UNet not in the file: {extra[:4]}{'...' if len(extra) > 4 else ''}")
    if wrong:
        details.append("channel mismatch at " + ", ".join(f"{b} (file {want[b]}, model {have[b]})" for b in wrong[:4]))
    if not same_kind:
        details.append(f"architecture mismatch: file {kinds[0]}, model {kinds[1]}")
    raise ValueError(
        f"residual file {str(path)!r} was trained for a {meta.get('architecture')} model "
        f"({meta.get('base_model') or 'unknown base'}, {len(want)} blocks); this UNet is {architecture(unet)} "
        f"with {len(have)} blocks. {'; '.join(details)}. Load it into the base model it was trained on.")


def load_residuals(pipe_or_unet, path, name: str | None = None, *, scale: float | None = None,
                   token: str | None = None, class_word: str | None = None) -> Residuals:
    """Add the residual set stored at ``path`` to a pipeline's UNet (or a bare UNet).

    Args:
        pipe_or_unet: the base model to extend.
        path: a file written by ``Residuals.save`` (``~`` is expanded).
        name: set name on the UNet (default: the name stored in the file, made unique, and usable where no set
            can take it: 'my.concept' loads as 'my_concept', with a warning); a given name that is already taken
            raises ValueError.
        scale: override the stored scale.
        token, class_word: override the concept words stored in the file (LAG needs a token).
    Returns:
        the ``Residuals`` handle, with token and class_word from the arguments, else from the file.
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not isinstance(path, (str, os.PathLike)) or not isinstance(unet, torch.nn.Module):
        swapped = isinstance(pipe_or_unet, (str, os.PathLike)) and isinstance(getattr(path, "unet", path),
                                                                               torch.nn.Module)
        raise TypeError("load_residuals(pipe_or_unet, path) takes the pipeline (or its UNet) first and the file "
                        f"second; got {type(pipe_or_unet).__name__} and {type(path).__name__}"
                        + (" (swapped?)" if swapped else ""))
    path = Path(path).expanduser()
    if scale is not None:  # before anything is added to the UNet
        finite_scale(scale, "load_residuals")
    meta, tensors = read_residual_file(path)
    check_compatible(meta, unet, path)
    taken = residual_names(unet)
    if name is not None and name in taken:
        raise ValueError(f"a residual set named {name!r} is already on this UNet; pick another name=, remove it "
                         f"first (prkit.remove_residuals(unet, {name!r})), or leave name unset to use the file's")
    recorded = not name
    name = name or meta.get("name") or "default"
    if recorded and not usable_set_name(name):  # a header edited by hand or written by another tool
        usable = name.replace(".", "_")
        usable = usable if usable_set_name(usable) else f"residuals_{usable}"
        log.warning("%r records the set name %r, which no residual set can take; it loads as %r (name= chooses "
                    "another)", str(path), name, usable)
        name = usable
    base_name, k = name, 1
    while name in taken:
        k += 1
        name = f"{base_name}_{k}"
    plain: dict[str, list[str]] = {}  # the names as read_metadata makes the header's block names
    for key in tensors:
        plain.setdefault(uncompiled(key), []).append(key)
    twice = next((keys for keys in plain.values() if len(keys) > 1), None)
    if twice:
        raise ValueError(f"residual file {str(path)!r} holds {' and '.join(sorted(twice))}, one factor with and "
                         f"without {COMPILED!r}; it is not a file prkit wrote. Save the residuals again")
    tensors = {key: tensors[keys[0]] for key, keys in plain.items()}
    described = {f"{block}.{part}" for block in meta["layers"] for part in ("down", "up")}
    unexpected = sorted(set(tensors) - described)
    if unexpected:
        raise ValueError(f"residual file {str(path)!r} holds {len(unexpected)} tensor(s) its header does not describe "
                         f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}); it is not a file "
                         "prkit wrote. Save the residuals again, or keep only the tensors of the header's layers")
    kinds = sorted(k for k, v in tensors.items() if v.dtype not in FACTOR_DTYPES)  # integer, bool, complex, float8
    if kinds:
        raise ValueError(f"residual file {str(path)!r} holds {len(kinds)} tensor(s) that are not float32, float16, "
                         "bfloat16 or float64 ("
                         + ", ".join(f"{k}: {str(tensors[k].dtype).removeprefix('torch.')}" for k in kinds[:3])
                         + f"{', ...' if len(kinds) > 3 else ''}); a residual set's factors are. Save the residuals "
                         "again with one of those (float32, float16 or bfloat16)")
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        raise ValueError(f"residual file {str(path)!r} holds NaN or infinite values ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): it would paint black images. Train again, at a lower "
                         "learning rate, or use an earlier checkpoint")
    ranks = {block: info["rank"] for block, info in meta["layers"].items()}
    # seeded: the set's random start, which the file's tensors replace, must not draw from the caller's generator
    # (torch.manual_seed(0); load_residuals(...); pipe(...) would give other images than seeding after the load)
    residuals = add_residuals(unet, rank=ranks, name=name, token=token or meta.get("token") or None,
                              class_word=class_word or meta.get("class_word") or None, seed=0)
    try:
        residuals.load_state_dict(tensors)
    except (RuntimeError, KeyError, ValueError) as err:
        residuals.remove()  # nothing half-loaded stays on the UNet
        raise ValueError(f"residual file {str(path)!r} does not hold what its header describes ({err}); "
                         "save the residuals again") from err
    residuals.scale = float(scale if scale is not None else meta.get("scale", 1.0))
    residuals.meta.update(base_model=meta.get("base_model", ""), config=meta["config"], path=str(path),
                          base_model_revision=meta["base_model_revision"])
    try:  # the training's wall time: a set loaded and saved again keeps it
        residuals.meta["seconds"] = float(meta["seconds"]) if meta.get("seconds") is not None else None
    except ValueError:  # a header another tool edited: not worth refusing the file for
        pass
    return residuals


def kohya_key(block: str) -> str:
    """'down_blocks.0.attentions.1' -> 'lora_unet_down_blocks_0_attentions_1_proj_out'."""
    return "lora_unet_" + block.replace(".", "_") + "_proj_out"


def export_lora(residuals: Residuals, path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the set as a kohya-style LoRA (alpha = rank) that ``pipe.load_lora_weights`` accepts; ``dtype``: the
    factors' floating-point dtype (``FACTOR_DTYPES``)."""
    _check_set(residuals, path, "export_lora")
    if dtype not in FACTOR_DTYPES:
        kind = "no dtype of a LoRA's factors" if isinstance(dtype, torch.dtype) else "not a torch dtype"
        raise TypeError(f"export_lora: dtype={dtype!r} is {kind}; pass torch.float16, torch.float32 or "
                        "torch.bfloat16")
    residuals._check_factors_here("read")
    tensors = {}
    for block, layer in residuals.layers().items():
        lowrank = layer.sets[residuals.name]
        down, up = lowrank.down.detach(), lowrank.up.detach() * layer.scales[residuals.name]
        if layer.is_conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        key = kohya_key(block)
        tensors[f"{key}.lora_down.weight"] = down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = up.to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(lowrank.rank), dtype=dtype)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(residuals.ranks().values())),
            "prkit_version": __version__, "prkit_token": residuals.token or "",
            "prkit_class_word": residuals.class_word or ""}
    return atomic_save(tensors, path, meta)
