"""CLIP-I, CLIP-T and DINO as pure functions of embeddings, and the backbones that make the embeddings.

Owns the metric definitions (METHOD.md section 3) and loading their backbones from hub ids or local
folders; hub ids come from the local cache unless ``download=True``. A backbone that cannot be loaded
is reported as ``MetricUnavailable`` with the reason; no number is ever made up. No generating or training here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # CLIP ViT-B/32: both the DreamBooth and CustomConcept101 protocols
DEFAULT_DINO = "facebook/dino-vits16"  # DINO ViT-S/16
WORLD = "world"  # the small CLIP trained on world renders and captions, shipped in prkit/world/clip/
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIPSCORE_W = 2.5  # CLIPScore weight (Hessel et al.), used by the CustomConcept101 evaluator
CLIP_T_CONVENTIONS = {  # convention -> label written next to every CLIP-T number
    "dreambooth": "CLIP-T raw cosine (DreamBooth)",
    "clipscore": "CLIP-T 2.5*max(cos,0) (CLIPScore, CustomConcept101)",
}


class MetricUnavailable(RuntimeError):
    """A metric's backbone could not be loaded; the message says why and how to get it."""


def _unit(x: torch.Tensor) -> torch.Tensor:
    # float64 on the CPU (mps has no float64; these are a few small rows): in float32 an image scored against itself
    # came out 0.99999994, or 1.0000001, a cosine no two vectors have
    x = torch.as_tensor(x).to("cpu", torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _cosines(dots: torch.Tensor, device) -> torch.Tensor:
    """Dot products of unit rows as cosines: inside [-1, 1], float32 on ``device``."""
    return dots.clamp(-1, 1).to(device, torch.float32)


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` (N, D) with every row of ``b`` (M, D): (N, M), on ``a``'s device.
    A single embedding (D,) counts as one row."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    a, b = (a[None] if a.ndim == 1 else a), (b[None] if b.ndim == 1 else b)
    if not len(a) or not len(b):
        raise ValueError(f"no embeddings to compare ({len(a)} generated, {len(b)} reference)")
    _same_width(a, b, "generated", "reference")
    return _cosines(_unit(a) @ _unit(b).T, a.device)


def _same_width(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{what_a} embeddings have {a.shape[-1]} dimensions, {what_b} embeddings {b.shape[-1]}: "
                         "embed both with the same backbone (CLIP: its projected image and text embeddings)")


def _reduce(values: torch.Tensor, reduce: bool) -> float | torch.Tensor:
    return float(values.mean()) if reduce else values


def clip_i(gen_image_embeds: torch.Tensor, ref_image_embeds: torch.Tensor, reduce: bool = True):
    """CLIP-I: mean pairwise cosine between generated and reference CLIP image embeddings.

    Args:
        gen_image_embeds: (N, D) embeddings of the generated images.
        ref_image_embeds: (M, D) embeddings of the reference (real) images.
        reduce: return the mean over all N x M pairs (a float); False: per generated image, (N,).
    Returns:
        a float, or a tensor (N,) whose mean is the float.
    """
    return _reduce(pairwise_cosine(gen_image_embeds, ref_image_embeds).mean(1), reduce)


def dino(gen_feats: torch.Tensor, ref_feats: torch.Tensor, reduce: bool = True):
    """DINO: mean pairwise cosine between generated and reference DINO CLS features.

    Args:
        gen_feats: (N, D); ref_feats: (M, D); reduce: as for ``clip_i``.
    Returns:
        a float, or a tensor (N,).
    """
    return _reduce(pairwise_cosine(gen_feats, ref_feats).mean(1), reduce)


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor, convention: str = "dreambooth",
           reduce: bool = True):
    """CLIP-T: image-text alignment of each image with its prompt, in one of two labelled conventions.

    Args:
        image_embeds: (N, D) CLIP image embeddings.
        text_embeds: (N, D) embeddings of each image's prompt, or (D,) / (1, D) for one prompt shared by all.
        convention: "dreambooth" (raw cosine) or "clipscore" (2.5 * max(cos, 0)); see ``CLIP_T_CONVENTIONS``.
        reduce: return the mean (a float); False: per image, (N,).
    Returns:
        a float, or a tensor (N,).
    """
    if convention not in CLIP_T_CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CLIP_T_CONVENTIONS)}, got {convention!r}")
    images = _unit(image_embeds)
    if not images.numel():
        raise ValueError("no image embeddings to score")
    texts = _unit(text_embeds)
    _same_width(texts, images, "text", "image")  # not reshaped into rows of the images' width
    texts = texts.reshape(-1, images.shape[-1])
    if texts.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"{texts.shape[0]} text embeddings for {images.shape[0]} images; give one or one per image")
    cos = _cosines((images * texts).sum(-1), torch.as_tensor(image_embeds).device)  # (N,)
    if convention == "clipscore":
        cos = CLIPSCORE_W * cos.clamp_min(0)
    return _reduce(cos, reduce)


def _check_pil(images: Sequence) -> None:
    """Refuse what is no PIL image (an array or tensor: a pipeline's output_type 'np' or 'pt'), naming it."""
    from PIL import Image

    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {i} is a {type(image).__name__}, not a PIL image: pass PIL images (a pipeline's "
                            "default output_type='pil'; an array through PIL.Image.fromarray, as uint8 HxWxC)")


def _pixels(images: Sequence, resize: int, crop: int, mean, std) -> torch.Tensor:
    """PIL images -> (N, 3, crop, crop): shorter side to ``resize`` (bicubic), centre crop, normalize. The longer
    side becomes int(resize * long / short), as transformers' CLIP processor and torchvision's Resize make it. Any
    mode goes to RGB as prkit's loader takes it (transparency on white, as that processor does; 16-bit scaled)."""
    from PIL import Image

    from .images import _to_rgb

    out = []
    for image in images:
        image = _to_rgb(image, image.format)
        w, h = image.size
        long = int(resize * max(w, h) / min(w, h))  # truncated, not rounded: the processors' size, to the pixel
        size = (resize, long) if w <= h else (long, resize)
        image = image.resize((max(crop, size[0]), max(crop, size[1])), Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - crop) // 2, (h - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        out.append(np.asarray(image, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # (N, 3, crop, crop)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@dataclass
class ClipBackbone:
    """A CLIP model with its tokenizer and preprocessing (shorter side to the model's size, centre crop)."""

    model: object  # transformers CLIPModel
    tokenizer: object
    name: str
    batch_size: int = 64
    revision: dict | None = None  # which revision of ``name`` (prkit.revisions); None: not known

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """Projected image embeddings (N, D) of PIL images, on the model's device."""
        if not len(images):
            raise ValueError("no images to embed")
        _check_pil(images)
        size = self.model.config.vision_config.image_size
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = _pixels(images[i:i + self.batch_size], size, size, CLIP_MEAN, CLIP_STD)
            out = self.model.vision_model(pixel_values=x.to(self.device, self.model.dtype))
            feats.append(self.model.visual_projection(out.pooler_output).float())
        return torch.cat(feats)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (N, D), on the model's device (texts truncated to the model's length)."""
        if not len(texts):
            raise ValueError("no texts to embed")
        feats = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
            out = self.model.text_model(input_ids=tok.input_ids.to(self.device),
                                        attention_mask=tok.attention_mask.to(self.device))
            feats.append(self.model.text_projection(out.pooler_output).float())
        return torch.cat(feats)


@dataclass
class DinoBackbone:
    """A DINO ViT with its preprocessing (resize 256, centre crop 224 at ViT-S/16 size; ImageNet normalization)."""

    model: object  # transformers ViTModel
    name: str
    batch_size: int = 64
    revision: dict | None = None  # which revision of ``name`` (prkit.revisions); None: not known

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """CLS features (N, D) of the last layer (after its norm), on the model's device."""
        if not len(images):
            raise ValueError("no images to embed")
        _check_pil(images)
        crop = self.model.config.image_size
        resize = round(crop * 256 / 224)  # 224 -> 256, as the DINO evaluation transform
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = _pixels(images[i:i + self.batch_size], resize, crop, IMAGENET_MEAN, IMAGENET_STD)
            out = self.model(pixel_values=x.to(self.device, self.model.dtype))
            feats.append(out.last_hidden_state[:, 0].float())
        return torch.cat(feats)


def world_clip_path() -> Path:
    """Folder of the world's CLIP (a transformers CLIPModel folder with its tokenizer)."""
    return Path(__file__).resolve().parent / "world" / "clip"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _source(name_or_path: str | os.PathLike, caller: str = "load_clip") -> tuple[str, bool, str | None]:
    """(where to load from, is it local, reason it cannot be) for a hub id, a folder or 'world'; an empty or blank
    name is a reason, in ``caller``'s name (``Path("")`` is '.': it loaded the current folder)."""
    from .model_index import check_model_name

    world = " or 'world'" if caller == "load_clip" else ""
    try:
        check_model_name(name_or_path, caller, give=f"a hub id, a folder that holds the backbone's config.json ('.' "
                                                    f"for the current one){world}")
    except ValueError as err:
        return "", True, str(err)
    name = str(name_or_path)
    if name == WORLD:
        path = world_clip_path()
        if not (path / "config.json").is_file():
            return str(path), True, (f"the world CLIP is not there yet: no {path / 'config.json'} (it is trained with "
                                     "the world model; until it ships, CLIP metrics on the world are unavailable)")
        return str(path), True, None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            return str(path), True, f"{str(path)!r} is not a transformers model folder (no config.json)"
        return str(path), True, None
    from .model_index import _looks_like_path

    if _looks_like_path(name):
        return str(path), True, (f"there is no folder {str(path)!r} (and it is not a hub id, 'owner/name'): pass the "
                                 "folder that holds the backbone's config.json")
    return name, False, None


def _reason(kind: str, name: str, local: bool, download: bool, err: Exception) -> str:
    first = (str(err).splitlines() or [""])[0][:200]
    if local:
        return f"cannot load the {kind} backbone from {name!r}: {type(err).__name__}: {first}"
    where = ("this machine is offline (HF_HUB_OFFLINE=1)" if _offline() else "the hub could not be reached") \
        if download else "downloads are off (download=False)"
    return (f"cannot load the {kind} backbone {name!r}: it is not in the local Hugging Face cache and {where} "
            f"({type(err).__name__}: {first}). Download it where there is internet with `hf download {name} "
            f"--local-dir ./{name.split('/')[-1]}` and pass that folder")


def _missing_weights(kind: str, name: str, model, info: dict) -> str | None:
    """Why a backbone just loaded cannot score: weights its checkpoint lacks, which transformers fills in at random
    with a warning only (a CLIP or DINOv2 folder given as DINO scored with a random ViT); None when it has them all."""
    missing = sorted(info.get("missing_keys") or ())
    if not missing:
        return None
    layout = "a CLIPModel" if kind == "CLIP" else "a ViT (DINO ViT-S/16's layout)"
    return (f"{name!r} is no {kind} checkpoint (its model type is {model.config.model_type!r}): {len(missing)} "
            f"weights are missing from it (e.g. {missing[0]!r}), which would score with random ones; pass {layout} "
            "folder or hub id")


def _revision(name_or_path, source: str, local: bool, kwargs: dict) -> dict | None:
    """The revision record of a backbone just loaded: a hub id's from the cache snapshot it was loaded from (the
    one its cache_dir and revision resolve to now), a folder's or the world CLIP's from its files."""
    from .revisions import cached_commit, model_revision

    commit = None if local else cached_commit(source, kwargs.get("cache_dir"), kwargs.get("revision"))
    return model_revision(name_or_path, world_folder=world_clip_path(), commit=commit)


def try_load_clip(name_or_path: str | os.PathLike = DEFAULT_CLIP, device: str | torch.device = "cpu",
                  download: bool = False, **kwargs) -> tuple[ClipBackbone | None, str | None]:
    """Load a CLIP backbone, or say why not.

    Args:
        name_or_path: a hub id, a local folder (CLIPModel + tokenizer files) or "world".
        device: where the model runs.
        download: let a hub id be fetched when it is not in the local cache (default: cache only, no network).
        **kwargs: passed to ``from_pretrained`` (e.g. ``cache_dir``).
    Returns:
        (backbone, None) or (None, reason).
    """
    source, local, reason = _source(name_or_path)
    if reason:
        return None, reason
    try:
        from transformers import AutoTokenizer, CLIPModel

        opts = dict(local_files_only=local or _offline() or not download, **kwargs)
        model, info = CLIPModel.from_pretrained(source, output_loading_info=True, **opts)
        tokenizer = AutoTokenizer.from_pretrained(source, **opts)
    except Exception as err:  # noqa: BLE001 - any failure to load is reported as the metric's reason
        return None, _reason("CLIP", str(name_or_path), local, download, err)
    problem = _missing_weights("CLIP", str(name_or_path), model, info)
    if problem:
        return None, problem
    model = model.eval().requires_grad_(False).to(device)
    revision = _revision(name_or_path, source, local, kwargs)
    return ClipBackbone(model, tokenizer, str(name_or_path), revision=revision), None


def try_load_dino(name_or_path: str | os.PathLike = DEFAULT_DINO, device: str | torch.device = "cpu",
                  download: bool = False, **kwargs) -> tuple[DinoBackbone | None, str | None]:
    """Load a DINO ViT backbone, or say why not; arguments as for ``try_load_clip`` (no 'world')."""
    source, local, reason = _source(name_or_path, "load_dino") if str(name_or_path) != WORLD else \
        (WORLD, True, "there is no world DINO; DINO on world renders needs an ImageNet DINO folder")
    if reason:
        return None, reason
    try:
        from transformers import ViTModel

        model, info = ViTModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True,
                                               local_files_only=local or _offline() or not download, **kwargs)
    except Exception as err:  # noqa: BLE001
        return None, _reason("DINO", str(name_or_path), local, download, err)
    problem = _missing_weights("DINO", str(name_or_path), model, info)
    if problem:
        return None, problem
    return DinoBackbone(model.eval().requires_grad_(False).to(device), str(name_or_path),
                        revision=_revision(name_or_path, source, local, kwargs)), None


def load_clip(name_or_path: str | os.PathLike = DEFAULT_CLIP, device: str | torch.device = "cpu",
              download: bool = False, **kwargs) -> ClipBackbone:
    """``try_load_clip`` that raises ``MetricUnavailable`` with the reason."""
    backbone, reason = try_load_clip(name_or_path, device, download, **kwargs)
    if backbone is None:
        raise MetricUnavailable(reason)
    return backbone


def load_dino(name_or_path: str | os.PathLike = DEFAULT_DINO, device: str | torch.device = "cpu",
              download: bool = False, **kwargs) -> DinoBackbone:
    """``try_load_dino`` that raises ``MetricUnavailable`` with the reason."""
    backbone, reason = try_load_dino(name_or_path, device, download, **kwargs)
    if backbone is None:
        raise MetricUnavailable(reason)
    return backbone
