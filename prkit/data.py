"""Reference images -> square RGB crops and tensors, and concept folders.

Owns reading user images robustly (EXIF, odd modes, huge or corrupt files) and concept folders
(`load_concept`, `Concept.save`); the DreamBooth/DreamBench layout is in `dreambooth` (re-exported here). Does no
model work: no tokenizer, VAE or UNet is touched here.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

_COMMON_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


# other raster formats, where this Pillow opens them (not its stubs for scientific data, or EPS/WMF that need
# other programs: a .h5 file beside the photos is not an image)
_MORE_EXTENSIONS = (".jfif", ".jpe", ".apng", ".avif", ".jp2", ".j2k", ".jpx", ".qoi", ".tga", ".ppm", ".pgm",
                    ".pbm", ".pnm", ".psd", ".dib", ".pcx", ".ico", ".sgi")


def _pillow_extensions() -> tuple[str, ...]:
    """The common extensions, then those of ``_MORE_EXTENSIONS`` this Pillow opens."""
    Image.init()
    registered = Image.registered_extensions()
    return _COMMON_EXTENSIONS + tuple(e for e in _MORE_EXTENSIONS if registered.get(e) in Image.OPEN)


IMAGE_EXTENSIONS = _pillow_extensions()
_NEEDS_PLUGIN = {".heic": "pillow-heif", ".heif": "pillow-heif"}  # phone photos Pillow reads only with a plugin
DEFAULT_PROMPT_TEMPLATE = "a photo of a {token} {class_word}"
_IGNORED_NAMES = frozenset({"concept.json", "thumbs.db", "desktop.ini"})
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass
class DataConfig:
    """Settings for turning a folder of reference images into training crops."""

    resolution: int = 512  # side of the square crops (native resolution: 512 for SD1.x)
    center_crop: bool = True  # crop the central square; False squashes the whole image
    skip_bad: bool = False  # skip unreadable files with a warning instead of raising
    min_images: int = 1  # fewer usable images than this is an error
    max_side: int = 8192  # larger images are downscaled by an integer factor before cropping


class ConceptDataError(ValueError):
    """A reference image, concept folder, dataset layout or argument is unusable."""


class _Unreadable(Exception):
    """Internal: `path` could not be decoded, for `reason`."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.advice = (f"cannot read image '{path}': {reason}. Remove or replace the file, "
                       "or pass skip_bad=True to skip it.")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        top = float(np.nanmax(arr)) if arr.size else 0.0
        if img.mode == "F":  # float images: 0..1 (scaled) or already 0..255
            full = 1.0 if top <= 1.0 else 255.0
        else:  # 16-bit: scale the 16-bit range, do not clip it; a 32-bit image holding 8-bit values stays as is
            full = 255.0 if img.mode == "I" and top <= 255 else 65535.0
        clear = arr == img.info["transparency"] if isinstance(img.info.get("transparency"), int) else None
        arr = np.clip(np.nan_to_num(arr), 0, full) * (255.0 / full)
        if clear is not None:  # a 16-bit grey PNG's transparent level (tRNS): white, as for 8-bit images
            arr[clear] = 255.0
        return Image.fromarray(np.rint(arr).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _decode(path: Path, max_side: int | None = None, resolution: int | None = None) -> Image.Image:
    """Open, fully decode, EXIF-rotate and convert `path` to RGB; raise `_Unreadable`.

    A JPEG with a side over `max_side`, or past Pillow's bomb warning (89 megapixels), is decoded at a reduced
    scale (the DCT's 1/2, 1/4 or 1/8) that keeps its long side at least `max_side` and its short side at least
    four times `resolution`: a 108-megapixel phone photo then takes a fraction of the time and memory. Images
    between the bomb warning and Pillow's hard limit (twice it) are read; beyond it is an error.
    """
    if path.is_dir():
        raise _Unreadable(path, "it is a folder, not an image file")
    if not path.is_file():
        raise _Unreadable(path, "no such file" + (" (a broken link)" if path.is_symlink() else ""))
    if path.stat().st_size == 0:
        raise _Unreadable(path, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # huge photos are downscaled below
            try:
                img = Image.open(path)
            except Image.DecompressionBombError:
                img = _open_huge_jpeg(path, max_side, resolution)
                if img is None:
                    raise
            with img:
                if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":  # MPO: a phone photo + its preview
                    warnings.warn(f"image '{path}' has {img.n_frames} frames; using the first", stacklevel=4)
                if img.format in ("JPEG", "MPO"):
                    _draft(img, max_side, resolution)
                img.load()  # decode now, so truncated files fail here and not later
                return _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:
        raise _Unreadable(path, f"{e} Downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
                                "if you trust the file") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
        raise _Unreadable(path, str(e).rstrip(".") or type(e).__name__) from e


_LIMIT = threading.Lock()  # Pillow's pixel limit is process-wide: lifted for one header read at a time


def _open_huge_jpeg(path: Path, max_side: int | None, resolution: int | None) -> Image.Image | None:
    """A JPEG past Pillow's hard pixel limit (a 200-megapixel phone photo), opened with the limit lifted for its
    header only and set to decode at a reduced scale; None when it is not a JPEG or the reduction does not bring it
    under the limit (Pillow's error stands then)."""
    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return None
    limit = Image.MAX_IMAGE_PIXELS
    with _LIMIT:
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    _draft(img, max_side, resolution)
    if limit and img.size[0] * img.size[1] > 2 * limit:
        img.close()
        return None
    return img


def _draft(img: Image.Image, max_side: int | None, resolution: int | None) -> None:
    """Ask a huge JPEG for a reduced-scale decode (see `_decode`); ordinary photos decode at full size."""
    w, h = img.size
    limit = Image.MAX_IMAGE_PIXELS or float("inf")
    if not ((max_side and max(w, h) > max_side) or w * h > limit):
        return
    # either reduction loses nothing that would be kept: _square shrinks past max_side anyway, and a crop with 4x
    # the pixels it needs per side is resized down with a filter after this
    k = max(w, h) // max_side if max_side and max(w, h) > max_side else 1
    if resolution:
        k = max(k, min(w, h) // (4 * resolution))
    if k > 1:
        img.draft(img.mode, (max(1, w // k), max(1, h // k)))


def _square(img: Image.Image, path: Path, resolution: int, center_crop: bool,
            max_side: int) -> Image.Image:
    """Downscale oversized images, crop the central square (or not) and resize."""
    if max(img.size) > max_side:
        img = img.reduce(-(-max(img.size) // max_side))  # ceil division
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s) if center_crop \
        else (0, 0, w, h)
    upscale = s < resolution  # the crop's short side (also without cropping)
    if upscale:
        warnings.warn(f"image '{path}' is only {w}x{h}, smaller than resolution {resolution}; "
                      "upscaling it (expect blur). Use larger originals if you have them.",
                      stacklevel=3)
    resample = Image.Resampling.BICUBIC if upscale else Image.Resampling.LANCZOS
    # crop first: resize(box=...) would let the filter read pixels outside the crop
    return img.crop(box).resize((resolution, resolution), resample)


def load_image(path: str | Path, resolution: int = 512, center_crop: bool = True, *,
               max_side: int = 8192) -> Image.Image:
    """Read one reference image as an RGB square of `resolution` pixels.

    Args:
        path: image file (any format Pillow reads; EXIF orientation is applied).
        resolution: side of the returned square.
        center_crop: crop the central square; False resizes the whole image (aspect changes).
        max_side: images with a larger side are first downscaled by an integer factor.
    Returns:
        PIL image, mode RGB, size (resolution, resolution).
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise ConceptDataError(f"resolution must be a positive int, got {resolution!r}.")
    path = Path(path).expanduser()
    try:
        img = _decode(path, max_side, resolution)
    except _Unreadable as e:
        raise ConceptDataError(e.advice) from e
    return _square(img, path, resolution, center_crop, max_side)


@dataclass
class Concept:
    """Prepared reference crops of one concept plus its identifier and class word."""

    images: list[Image.Image]
    token: str
    class_word: str
    paths: list[Path]
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    crop: str = ""  # how the files were cut to crops when not the default (a checkpoint's stamp covers it)

    @property
    def prompt(self) -> str:
        """The training prompt, e.g. 'a photo of a sks dog'."""
        return self.prompt_template.format(token=self.token, class_word=self.class_word)

    def __len__(self) -> int:
        return len(self.images)

    def tensors(self, flip: bool = False) -> torch.Tensor:
        """Stack the crops as a float32 batch in [-1, 1].

        Args:
            flip: return the horizontally mirrored images.
        Returns:
            Tensor (N, 3, R, R).
        """
        sizes = sorted({im.size for im in self.images})
        if len(sizes) > 1:
            raise ValueError(f"the concept's images come in {len(sizes)} sizes ({', '.join(f'{w}x{h}' for w, h in sizes[:4])}"
                             f"{', ...' if len(sizes) > 4 else ''}); they train as one batch: crop or resize them to one "
                             "size (prkit.load_concept does, at its resolution=)")
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in self.images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, R, R)
        return (x.flip(-1) if flip else x).contiguous()

    def save(self, folder: str | Path) -> Path:
        """Write the crops as 00.png, 01.png, ... plus concept.json; `load_concept` reads it back.

        Args:
            folder: target folder, created if needed; must not hold other images.
        Returns:
            The folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        width = max(2, len(str(len(self.images) - 1)))
        names = [f"{i:0{width}d}.png" for i in range(len(self.images))]
        stale = sorted(p.name for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in names)
        if stale:
            raise ConceptDataError(f"cannot save concept to '{folder}': it already holds other "
                                   f"images ({', '.join(stale[:5])}). Use an empty folder.")
        from .files import atomic_path  # each file whole or not at all: an interrupt leaves no half a PNG

        for im, name in zip(self.images, names):
            with atomic_path(folder / name) as tmp:
                im.save(tmp, format="PNG")
        meta = {"token": self.token, "class_word": self.class_word,
                "prompt_template": self.prompt_template, "sources": [str(p) for p in self.paths]}
        with atomic_path(folder / "concept.json") as tmp:
            Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
        return folder


def _check_words(token: object, class_word: object, template: str) -> tuple[str, str]:
    """Validate the identifier, the class word and the prompt template."""
    for arg, value in (("token", token), ("class_word", class_word)):
        if value is None:
            raise ConceptDataError(f"{arg} is required: pass {arg}=... (e.g. token='sks', "
                                   "class_word='dog'), or load a folder written by Concept.save() "
                                   "whose concept.json holds it.")
        if not isinstance(value, str) or not value.strip():
            raise ConceptDataError(f"{arg} must be a non-empty string, got {value!r}.")
    assert isinstance(token, str) and isinstance(class_word, str)
    if re.search(r"\s", token):
        raise ConceptDataError(f"token {token!r} contains whitespace; the identifier must be one "
                               "rare word such as 'sks'.")
    if token.strip().lower() == class_word.strip().lower():
        raise ConceptDataError(f"token and class_word are both {token!r}; the token must be a "
                               "rare identifier (e.g. 'sks') distinct from the class word.")
    try:
        ok = "{token}" in template and bool(template.format(token=token, class_word=class_word))
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ConceptDataError(f"prompt_template {template!r} must contain {{token}} and may "
                               "use only {token} and {class_word}.")
    return token, class_word.strip()


def load_concept(folder: str | Path, token: str | None = None, class_word: str | None = None,
                 resolution: int = 512, *, config: DataConfig | None = None,
                 skip_bad: bool = False, prompt_template: str | None = None) -> Concept:
    """Load a folder of reference images as a `Concept`.

    Args:
        folder: folder of images; a concept.json in it (from `Concept.save`) supplies
            token, class_word and prompt_template when those are not given.
        token: the rare identifier V*, one word (e.g. 'sks').
        class_word: the class noun (e.g. 'dog'); may be several words.
        resolution: crop side; ignored in favour of `config` when that is given.
        config: full settings; conflicts with non-default `resolution`/`skip_bad`.
        skip_bad: skip unreadable files with a warning instead of raising.
        prompt_template: format string with {token} and {class_word}.
    Returns:
        Concept with images sorted by file name, each (resolution, resolution) RGB.
    """
    if config is None:
        config = DataConfig(resolution=resolution, skip_bad=skip_bad)
    elif resolution not in (512, config.resolution) or (skip_bad and not config.skip_bad):
        raise ConceptDataError("pass resolution/skip_bad either directly or through config, "
                               "not both with different values.")
    if not isinstance(config.resolution, int) or isinstance(config.resolution, bool) or config.resolution < 1:
        raise ConceptDataError(f"resolution must be a positive int (the crops' side in pixels), "
                               f"got {config.resolution!r}.")
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ConceptDataError(f"concept folder '{folder}' does not exist; check the path.")
    if not folder.is_dir():
        raise ConceptDataError(f"concept folder '{folder}' is not a directory; pass the folder "
                               "that holds the reference images.")
    meta_path = folder / "concept.json"
    if meta_path.is_file() and (token is None or class_word is None or prompt_template is None):
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, found a {type(meta).__name__}")
        except (OSError, ValueError) as e:
            raise ConceptDataError(f"cannot read '{meta_path}': {e}. Fix or delete it, or pass "
                                   "token and class_word explicitly.") from e
        token = meta.get("token") if token is None else token
        class_word = meta.get("class_word") if class_word is None else class_word
        prompt_template = prompt_template or meta.get("prompt_template")
    prompt_template = prompt_template or DEFAULT_PROMPT_TEMPLATE
    token, class_word = _check_words(token, class_word, prompt_template)

    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    visible = [p for p in entries
               if not p.name.startswith(".") and p.name.lower() not in _IGNORED_NAMES]
    # by name: a broken link to an image is then named as one when it is read, not passed over
    images = [p for p in visible if not p.is_dir() and p.suffix.lower() in IMAGE_EXTENSIONS]
    others = [p.name + ("/" if p.is_dir() else "") for p in visible if p not in images]
    plugins = sorted({_NEEDS_PLUGIN[p.suffix.lower()] for p in visible if p.suffix.lower() in _NEEDS_PLUGIN})
    accepted = ", ".join(_COMMON_EXTENSIONS) + ", or any other format this Pillow opens"
    if plugins:
        accepted += (f"; {', '.join(o for o in others if Path(o).suffix.lower() in _NEEDS_PLUGIN)} need "
                     f"{' and '.join(plugins)} (pip install it, then register_heif_opener()) or conversion to JPEG")
    if not images:
        seen = (f"found {len(others)} other file(s) or folder(s) ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''})" if others else "the folder is empty")
        raise ConceptDataError(f"no images in concept folder '{folder}': {seen}. Accepted "
                               f"extensions: {accepted} (any case).")
    if others:
        warnings.warn(f"ignoring {len(others)} file(s) or folder(s) that are not images in '{folder}': "
                      f"{', '.join(others)} (accepted: {accepted}).", stacklevel=2)

    crops, paths = [], []
    for p in images:
        try:
            img = _decode(p, config.max_side, config.resolution)
        except _Unreadable as e:
            if not config.skip_bad:
                raise ConceptDataError(e.advice) from e
            warnings.warn(f"skipping unreadable image '{p}': {e.reason}.", stacklevel=2)
            continue
        crops.append(_square(img, p, config.resolution, config.center_crop, config.max_side))
        paths.append(p)
    if not crops:
        raise ConceptDataError(f"none of the {len(images)} image file(s) in '{folder}' could be "
                               "read (see the warnings); add readable images.")
    if len(crops) < config.min_images:
        raise ConceptDataError(f"concept folder '{folder}' has {len(crops)} usable image(s), "
                               f"fewer than min_images={config.min_images}.")
    if not 3 <= len(crops) <= 15:
        warnings.warn(f"concept folder '{folder}' has {len(crops)} usable image(s); the method "
                      "expects 3-15 reference images.", stacklevel=2)
    crop = "" if (config.center_crop, config.max_side) == (True, 8192) else \
        f"center_crop={config.center_crop} max_side={config.max_side}"
    return Concept(crops, token, class_word, paths, prompt_template, crop)


_DREAMBOOTH = ("LIVE_CLASSES", "DreamBoothDataset", "DreamBoothSubject", "load_dreambooth")


def __getattr__(name: str):
    """The DreamBooth layout lives in ``prkit.dreambooth`` (which imports this module); prkit.data stays an import
    path for it."""
    if name in _DREAMBOOTH:
        from . import dreambooth

        return getattr(dreambooth, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
