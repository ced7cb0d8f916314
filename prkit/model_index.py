"""Where a model name points and what its model index says, read before any weights: the embedded world's folder, a
local pipeline folder (its ``model_index.json``, components, weight variant) or a hub id (its index alone, from the
cache when offline), the pipeline classes prkit loads, and a UNet's structure built from its config alone
(``unet_structure``). ``prkit.pipeline`` loads the model itself and re-exports these.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

WORLD = "world"
SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
HUB_KWARGS = ("cache_dir", "force_download", "token", "revision")  # what fetching a hub model_index.json needs


def world_path() -> Path:
    """Folder of the embedded world pipeline shipped inside the package."""
    return Path(__file__).resolve().parent / "world" / "model"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _looks_like_path(name: str) -> bool:
    """A name no hub id can be: a path (starts with / . ~ or a drive, has a backslash) or not 'owner/name'."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or (len(name) > 1 and name[1] == ":")
            or name.count("/") != 1)


MODEL_NAMES = "'world' (the embedded model), a diffusers folder ('.' for the current one) or a hub id"


def blank_name(name_or_path) -> bool:
    """Whether ``name_or_path`` is a string that is empty or whitespace alone: an unset variable. ``Path("")`` is
    '.', so such a name read the current folder as the model; whitespace went on as a name."""
    return isinstance(name_or_path, str) and not name_or_path.strip()


def check_model_name(name_or_path, caller: str, argument: str = "name_or_path", give: str = MODEL_NAMES) -> None:
    """Refuse a blank ``name_or_path`` (``blank_name``) with a ValueError naming ``caller``'s ``argument`` and what
    to ``give`` instead (the current folder is '.'); a ``Path`` is taken as given."""
    if blank_name(name_or_path):
        raise ValueError(f"{caller}: {argument}={name_or_path!r} is empty; give {give} (an unset variable?)")


def _missing_message(name: str, err: Exception | None, local_only: bool = False, revision: str | None = None) -> str:
    """Why the model ``name`` could not be loaded and what to do; ``local_only``: only the local cache was read
    (``local_files_only`` or HF_HUB_OFFLINE), ``revision``: the one asked for (the download advice fetches it)."""
    if name.strip().lower() == WORLD:
        return f"could not load model {name!r}: the embedded default is spelt {WORLD!r}"
    if _looks_like_path(name):
        return (f"could not load model {name!r}: there is no such folder ({Path(name).expanduser().resolve()}), "
                "and it is not a hub id ('owner/name'). Pass the folder that holds model_index.json, a hub id such "
                "as 'stable-diffusion-v1-5/stable-diffusion-v1-5', or the embedded default, model='world'.")
    where = ("this machine is offline (HF_HUB_OFFLINE=1)" if _offline() else
             "local_files_only=True was given (the hub was not asked)" if local_only else
             "the hub could not be reached")
    fetch = f" --revision {revision}" if revision else ""
    return (f"could not load model {name!r}: {where} and its weights are not in the local cache "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). On a machine with internet access run "
            f"`hf download {name}{fetch} --local-dir ./{name.split('/')[-1]}` (older huggingface_hub: `huggingface-cli "
            f"download`), copy that folder here and pass its path; or use the embedded default, model='world'.")


def read_model_index(folder: Path) -> dict:
    """The parsed ``model_index.json`` of a local pipeline folder."""
    path = folder / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); restore it from the model's download") from err
    if not isinstance(index, dict):
        raise ValueError(f"{str(path)!r} is not a diffusers model index (a JSON object of components); restore it "
                         "from the model's download")
    return index


def check_components(folder: Path, index: dict, given) -> None:
    """Raise a ValueError naming the component subfolders that ``model_index.json`` lists and ``folder`` lacks.

    Entries of ``[null, null]`` are optional; components in ``given`` (passed to from_pretrained) need no folder.
    """
    missing = [name for name, value in index.items()
               if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and None not in value
               and name not in given and not (folder / name).is_dir()]
    if missing:
        listed = ", ".join(f"{name}/ ({'.'.join(index[name])})" for name in missing)
        many = len(missing) > 1
        raise ValueError(f"model folder {str(folder)!r} has no {listed} subfolder{'s' * many}, which its "
                         f"model_index.json lists; copy {'them' if many else 'it'} from the model's original "
                         f"download, or pass the component itself: load_pipeline(..., {missing[0]}=...)")


def folder_variant(folder: Path, index: dict) -> str | None:
    """The variant (``fp16``, ...) that a local pipeline folder's components store their weights in where some hold
    only that variant's (``save_pretrained(..., variant="fp16")`` writes ``diffusion_pytorch_model.fp16.safetensors``)
    and no other variant is there; else None (plain weights everywhere: what diffusers loads without a variant)."""
    variants, only_variant = set(), False
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or not (folder / name).is_dir():
            continue
        stems = [p.stem for p in (folder / name).iterdir() if p.suffix in (".safetensors", ".bin")]
        labels = {re.sub(r"-\d+-of-\d+$", "", stem.split(".")[-1]) for stem in stems if "." in stem}  # shards too
        variants |= labels
        only_variant |= bool(labels) and all("." in stem for stem in stems)
    return variants.pop() if only_variant and len(variants) == 1 else None


def takes_safety_checker(class_name: str | None) -> bool:
    """Whether the diffusers pipeline class ``class_name`` has a safety checker (SD1.x/2.x: yes, SDXL: no)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, str(class_name), None) if class_name else None
    return isinstance(cls, type) and "safety_checker" in inspect.signature(cls.__init__).parameters


def check_class(name: str, class_name, kwargs: dict) -> None:
    """Raise a TypeError, before any weights load, where the model index names a diffusers pipeline class that
    ``load_pipeline`` does not load (a ``custom_pipeline`` given in ``kwargs`` decides the class instead)."""
    import diffusers

    if "custom_pipeline" not in kwargs and (not class_name or isinstance(class_name, str)
                                            and getattr(diffusers, class_name, None) is None):
        what = f"names {class_name!r}, a class diffusers {diffusers.__version__} does not have" if class_name else \
            "has no _class_name"
        raise TypeError(f"the model_index.json of {name!r} {what}; load_pipeline loads {', '.join(SUPPORTED)}: "
                        f"set its _class_name to the pipeline class the model is (SD1.x/2.x: {SUPPORTED[0]}, SDXL: "
                        f"{SUPPORTED[1]}) or restore the file from the model's download")
    cls = getattr(diffusers, str(class_name), None) if class_name and "custom_pipeline" not in kwargs else None
    if class_name in SUPPORTED or not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        return
    hint = (f". An img2img pipeline such as an SDXL refiner: load it with diffusers' {class_name}.from_pretrained(...) "
            "and pass it to prkit.generate (image=..., strength=...) or prkit.train_residuals"
            if class_name.endswith("Img2ImgPipeline") else "")
    raise TypeError(f"{name!r} is a {class_name} (its model_index.json says so); load_pipeline loads "
                    f"{', '.join(SUPPORTED)}{hint}")


def _source(name: str) -> tuple[str, bool]:
    """Where ``load_pipeline`` loads the model ``name`` from: (a folder or a hub id, whether it is a local folder).
    A missing embedded world, a path to no pipeline folder and a name that is no hub id either are refused."""
    if name == WORLD:
        path = world_path()
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"the embedded world model is missing from {path}; reinstall prkit or rebuild "
                                    "it with `python -m prkit.world.train --stage all`")
        return str(path), True
    local = Path(name).expanduser().exists()
    source = str(Path(name).expanduser()) if local else name
    if local and not (Path(source) / "model_index.json").is_file():
        what = "is a file, not a diffusers pipeline folder" if Path(source).is_file() else \
            "is not a diffusers pipeline folder (no model_index.json)"
        raise FileNotFoundError(f"{source!r} {what}; give the folder that holds model_index.json, or convert "
                                "a single-file checkpoint with diffusers' from_single_file first")
    if not local and _looks_like_path(name):  # no hub id either: said now, not after the hub's retries (~30 s)
        raise RuntimeError(_missing_message(name, None))
    return source, local


def _located(name: str, kwargs: dict) -> tuple[str, bool, bool]:
    """``_source(name)`` and whether only local files may be read (``local_files_only``, popped from ``kwargs``; a
    local folder; HF_HUB_OFFLINE)."""
    source, local = _source(name)
    return source, local, bool(kwargs.pop("local_files_only", False)) or local or _offline()


def _hub_file(repo: str, filename: str, local_only: bool, kwargs: dict) -> Path:
    """One file of the hub pipeline ``repo``, fetched alone (from the cache where ``local_only``); ``kwargs``:
    from_pretrained's, of which the hub's are used."""
    from huggingface_hub import hf_hub_download

    hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    return Path(hf_hub_download(repo, filename, local_files_only=local_only, **hub))


def _model_index(source: str, local: bool, local_only: bool, kwargs: dict) -> dict:
    """The model index of the pipeline at ``source``: its folder's, or the hub's model_index.json alone, to know the
    pipeline class before loading any weights."""
    if local:
        return read_model_index(Path(source))
    return json.loads(_hub_file(source, "model_index.json", local_only, kwargs).read_text())


def unet_structure(name_or_path: str | os.PathLike = WORLD, **kwargs):
    """The UNet that ``load_pipeline(name_or_path)`` holds, built from its config on the meta device: its blocks and
    layers (classes, shapes, config), no weights. Two small JSON files are read (the model index and the UNet's
    config) where loading the pipeline reads every component's weights (seconds and GBs for SD1.5 or SDXL).

    Args:
        name_or_path, kwargs: as ``load_pipeline`` takes them (the hub's ``cache_dir``, ``revision``, ... and
            ``local_files_only`` are used).
    Returns:
        the UNet, or None where it cannot be built so: a pipeline class prkit does not support, a UNet other than
        diffusers' UNet2DConditionModel, a UNet config that cannot be read; ``load_pipeline`` loads such a model or
        says what is wrong with it. Names that are no model (an empty or blank one too), and a model index that
        cannot be read (a hub id not in the cache), are refused as ``load_pipeline`` refuses them.
    """
    from diffusers import UNet2DConditionModel

    check_model_name(name_or_path, "unet_structure")  # Path("") is '.': it read the current folder
    name = str(name_or_path)
    source, local, local_only = _located(name, kwargs)
    try:  # an index that cannot be read is refused as load_pipeline refuses it (not fetched again there: a hub id
        index = _model_index(source, local, local_only, kwargs)  # not in the cache would wait for the hub twice)
    except (OSError, ValueError) as err:
        if local:
            raise
        raise RuntimeError(_missing_message(name, err, local_only, kwargs.get("revision"))) from err
    try:
        if index.get("_class_name") not in SUPPORTED or index.get("unet") != ["diffusers", "UNet2DConditionModel"]:
            return None
        path = Path(source) / "unet" / "config.json" if local else _hub_file(source, "unet/config.json",
                                                                              local_only, kwargs)
        config = UNet2DConditionModel.load_config(str(path))
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)
