"""Reference images -> square RGB crops and tensors, and concept folders.

Owns concept folders (`load_concept`, `Concept.save`); one image is read robustly (EXIF, odd modes, huge or corrupt
files) by `images`; copies among a folder's images (the same bytes or pixels) are found by `image_copies`; the
DreamBooth/DreamBench layout is in `dreambooth` (re-exported here). Does no model work: no tokenizer, VAE or UNet is
touched here.
"""

from __future__ import annotations

import json
import os
import re
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image_copies import byte_copies, copy_names, pixels_digest, without_same_pixels
# reading one image, re-exported: prkit.data stays their import path
from .images import (  # noqa: F401
    _COMMON_EXTENSIONS, _NEEDS_PLUGIN, IMAGE_EXTENSIONS, ConceptDataError, _decode, _plugin_opens, _square, _Unreadable,
    load_image)

DEFAULT_PROMPT_TEMPLATE = "a photo of a {token} {class_word}"
_IGNORED_NAMES = frozenset({"concept.json", "thumbs.db", "desktop.ini"})


@dataclass
class DataConfig:
    """Settings for turning a folder of reference images into training crops."""

    resolution: int = 512  # side of the square crops (native resolution: 512 for SD1.x)
    center_crop: bool = True  # crop the central square; False squashes the whole image
    skip_bad: bool = False  # skip unreadable files with a warning instead of raising
    min_images: int = 1  # fewer usable images than this is an error
    max_side: int = 8192  # larger images are downscaled by an integer factor before cropping


@dataclass
class Concept:
    """Prepared reference crops of one concept plus its identifier and class word."""

    images: list[Image.Image]
    token: str
    class_word: str
    paths: list[Path]
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    crop: str = ""  # how the files were cut to crops when not the default (a checkpoint's stamp covers it)
    # exact copies in the folder that load_concept left out: (copy, the file kept with its bytes or its decoded
    # pixels); a checkpoint written when copies still trained is refused naming them
    left_out: list[tuple[Path, Path]] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        """The training prompt, e.g. 'a photo of a sks dog'."""
        return self.prompt_template.format(token=self.token, class_word=self.class_word)

    def __len__(self) -> int:
        return len(self.images)

    def size(self) -> tuple[int, int]:
        """(height, width) of the images, which train as one batch: a ValueError where they come in several sizes."""
        sizes = sorted({im.size for im in self.images})
        if not sizes:
            raise ValueError("the concept has no images; load_concept reads them from a folder (3-15 photos)")
        if len(sizes) > 1:
            raise ValueError(f"the concept's images come in {len(sizes)} sizes ({', '.join(f'{w}x{h}' for w, h in sizes[:4])}"
                             f"{', ...' if len(sizes) > 4 else ''}); they train as one batch: crop or resize them to one "
                             "size (prkit.load_concept does, at its resolution=)")
        width, height = sizes[0]
        return height, width

    def tensors(self, flip: bool = False) -> torch.Tensor:
        """Stack the crops as a float32 batch in [-1, 1].

        Args:
            flip: return the horizontally mirrored images.
        Returns:
            Tensor (N, 3, R, R).
        """
        self.size()
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in self.images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, R, R)
        return (x.flip(-1) if flip else x).contiguous()

    def save(self, folder: str | Path) -> Path:
        """Write the crops as 00.png, 01.png, ... plus concept.json; `load_concept` reads it back.

        Args:
            folder: target folder, created if needed; must not hold other images, nor images of the names it
                writes unless an earlier save wrote them (its concept.json is there): a concept's own photos are
                never overwritten.
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
        taken = sorted(name for name in names if (folder / name).exists())
        if taken and not (folder / "concept.json").is_file():  # not an earlier save's crops: someone's images
            sources = {os.path.realpath(p) for p in self.paths}
            own = any(os.path.realpath(folder / name) in sources for name in taken)
            raise ConceptDataError(f"cannot save concept to '{folder}': it already holds "
                                   f"{', '.join(taken[:5])}, which no earlier save wrote (no concept.json)"
                                   f"{' and which are this concept' + chr(39) + 's own source photos' if own else ''}"
                                   "; the crops would overwrite them. Save to an empty folder.")
        from .atomic import atomic_path  # each file whole or not at all: an interrupt leaves no half a PNG

        for im, name in zip(self.images, names):
            with atomic_path(folder / name) as tmp:
                im.save(tmp, format="PNG")
        meta = {"token": self.token, "class_word": self.class_word,
                "prompt_template": self.prompt_template, "sources": [str(p) for p in self.paths]}
        with atomic_path(folder / "concept.json") as tmp:
            Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
        return folder


def token_uses(template: str) -> int:
    """How many times a prompt template (a valid format string) names ``{token}``."""
    return [name for _, name, _, _ in string.Formatter().parse(template)].count("token")


def template_problem(template: object) -> str | None:
    """What is wrong with the prompt template ``template`` (load_concept's and TrainConfig's rule, each caller naming
    it), or None: a string that names {token} once, and only {token} and {class_word}, as plain fields."""
    try:  # plain fields only: "{{token}}" is a literal, "{class_word.x}" or "{token!r}" not the word itself
        if not isinstance(template, str):
            raise ValueError("not a string")
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
        ok = ("token" in [f[0] for f in fields] and all(name in ("token", "class_word") and not spec and not conv
                                                         for name, spec, conv in fields))
    except ValueError:
        ok = False
    if not ok:
        return "must contain {token} and may use only {token} and {class_word}, as plain fields"
    if token_uses(template) > 1:  # the identifier's attention (and LAG's mask) split over them
        return f"holds {{token}} {token_uses(template)} times; use it once"
    return None


def check_concept_words(token: object, class_word: object) -> tuple[str, str]:
    """Validate the identifier and the class word (load_concept's rule; train_residuals applies it to a Concept
    made by hand)."""
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
    return token, class_word


def _check_words(token: object, class_word: object, template: str) -> tuple[str, str]:
    """Validate the identifier, the class word and the prompt template."""
    token, class_word = check_concept_words(token, class_word)
    if not isinstance(template, str):
        raise ConceptDataError(f"prompt_template must be a string with {{token}} (and {{class_word}}), got "
                               f"{template!r}; fix it where it comes from (the argument or concept.json).")
    problem = template_problem(template)
    if problem:
        raise ConceptDataError(f"prompt_template {template!r} {problem}.")
    word, literal = token.strip().lower(), template.replace("{token}", " ").replace("{class_word}", " ")
    # its words as the text encoder reads them, punctuation apart ('sks!' is 'sks' and '!'), in a row in the other text
    parts = re.findall(r"\w+", word)
    held = [(what, text) for what, text, words in (("class word", class_word, class_word),
                                                   ("prompt template", template, literal))
            if _in_a_row(parts, re.findall(r"\w+", words.lower()))]  # its attention (and LAG's mask) would take it
    if held:
        places = " and ".join(f"the {what} {text!r}" for what, text in held)
        # 'sks' only where the prompt's other words do not hold it: for '<sks>' or 'sks!', it is what they hold
        example = "" if "sks" in re.findall(r"\w+", f"{class_word} {literal}".lower()) else " such as 'sks'"
        it = "it" if parts == [word] else f"its word{'s' * (len(parts) > 1)} {' '.join(parts)!r}"
        raise ConceptDataError(f"token {token!r} is also another word of the training prompt "
                               f"{template.format(token=token, class_word=class_word)!r}: {places} "
                               f"{'contain' if len(held) > 1 else 'contains'} {it}. Choose another token (a rare "
                               f"identifier{example}), or {' and '.join('a ' + what for what, _ in held)} without it.")
    return token, class_word.strip()


def _in_a_row(parts: list[str], words: list[str]) -> bool:
    """Whether ``words`` hold ``parts`` one after another (never for no parts: a token of punctuation alone)."""
    return bool(parts) and any(words[i:i + len(parts)] == parts for i in range(len(words) - len(parts) + 1))


def _from_file(check, read: list[str], meta_path: Path):
    """``check()``; its ConceptDataError names the concept.json that the values ``read`` came from (they were not
    passed: the caller's arguments are not what to fix)."""
    try:
        return check()
    except ConceptDataError as e:
        # only the words the refusal is about: `--token ''` with a class word from the file blamed the file
        read = [r for r in read if r in str(e) or r.replace("_", " ") in str(e)]
        if not read:
            raise
        names = ", ".join(read)
        raise ConceptDataError(f"{str(e).rstrip('.')} ({names} read from '{meta_path}': fix or delete it there, or "
                               f"pass {names} explicitly).") from None


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, False where it cannot be asked (a link into a folder this user may not search): the entry
    is then read as an image, and reading names it."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds a file with an image extension (False where it cannot be listed)."""
    try:
        return any(not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and not _is_dir(p)
                   for p in folder.iterdir())
    except OSError:
        return False


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
        Concept with images sorted by file name, each (resolution, resolution) RGB; a file with the same bytes as
        an earlier one (photo.jpg and 'photo (1).jpg'), or the same decoded pixels (the picture saved again with
        other settings or metadata), is left out with a warning naming both.
    """
    if config is None:
        config = DataConfig(resolution=resolution, skip_bad=skip_bad)
    elif resolution not in (512, config.resolution) or (skip_bad and not config.skip_bad):
        raise ConceptDataError("pass resolution/skip_bad either directly or through config, "
                               "not both with different values.")
    if not isinstance(config.resolution, int) or isinstance(config.resolution, bool) or config.resolution < 1:
        raise ConceptDataError(f"resolution must be a positive int (the crops' side in pixels), "
                               f"got {config.resolution!r}.")
    if not isinstance(config.max_side, int) or isinstance(config.max_side, bool) or config.max_side < 1:
        raise ConceptDataError(f"DataConfig.max_side must be a positive int (pixels; larger photos are downscaled "
                               f"first), got {config.max_side!r}.")
    folder = Path(folder).expanduser()
    meta_path = folder / "concept.json"
    try:  # a folder this user may not read is named as such, not by a concept.json that may not be there
        entries = sorted(folder.iterdir(), key=lambda p: p.name) if folder.is_dir() else None
        has_meta = entries is not None and meta_path.is_file()
    except PermissionError as e:
        raise ConceptDataError(f"cannot read concept folder '{folder}' (permission denied); ask for read access "
                               "to it, or copy the images to a folder of yours.") from e
    if entries is None and not folder.exists():
        raise ConceptDataError(f"concept folder '{folder}' does not exist; check the path.")
    if entries is None:
        raise ConceptDataError(f"concept folder '{folder}' is not a directory; pass the folder "
                               "that holds the reference images.")
    if has_meta and (token is None or class_word is None or prompt_template is None):
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, found a {type(meta).__name__}")
        except (OSError, ValueError) as e:
            if token is None or class_word is None:
                raise ConceptDataError(f"cannot read '{meta_path}': {e}. Fix or delete it, or pass "
                                       "token and class_word explicitly.") from e
            warnings.warn(f"cannot read '{meta_path}' ({e}); training with the token and class word given and "
                          f"{'the prompt template given' if prompt_template else 'the default prompt template'} "
                          "(fix or delete the file to silence this)", stacklevel=2)
            meta = {}
        if prompt_template is None and not isinstance(meta.get("prompt_template", ""), (str, type(None))):
            raise ConceptDataError(f"'{meta_path}': prompt_template must be a string with {{token}} (and "
                                   f"{{class_word}}), got {meta['prompt_template']!r}; fix or delete it there, or pass "
                                   "prompt_template=...")
        # the words taken from the file, named if the checks refuse them (they were not passed)
        read = [arg for arg, taken in (("token", token is None), ("class_word", class_word is None),
                                       ("prompt_template", not prompt_template)) if taken and meta.get(arg) is not None]
        token = meta.get("token") if token is None else token
        class_word = meta.get("class_word") if class_word is None else class_word
        prompt_template = prompt_template or meta.get("prompt_template")
    else:
        read = []
    prompt_template = prompt_template or DEFAULT_PROMPT_TEMPLATE
    read = read if token is not None and class_word is not None else []  # a missing word's error says where to put it
    _from_file(lambda: check_concept_words(token, class_word), [r for r in read if r != "prompt_template"], meta_path)
    token, class_word = _from_file(lambda: _check_words(token, class_word, prompt_template), read, meta_path)

    visible = [p for p in entries
               if not p.name.startswith(".") and p.name.lower() not in _IGNORED_NAMES]
    # by name: a broken link to an image is then named as one when it is read, not passed over
    images = [p for p in visible if not _is_dir(p)
              and (p.suffix.lower() in IMAGE_EXTENSIONS or _plugin_opens(p.suffix.lower()))]
    others = [p.name + ("/" if _is_dir(p) else "") for p in visible if p not in images]
    plugins = sorted({_NEEDS_PLUGIN[Path(o).suffix.lower()] for o in others if Path(o).suffix.lower() in _NEEDS_PLUGIN})
    accepted = ", ".join(_COMMON_EXTENSIONS) + ", or any other format this Pillow opens"
    if plugins:
        accepted += (f"; {', '.join(o for o in others if Path(o).suffix.lower() in _NEEDS_PLUGIN)} need "
                     f"{' and '.join(plugins)} (pip install it) or conversion to JPEG")
    if not images:
        seen = (f"found {len(others)} other file(s) or folder(s) ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''})" if others else "the folder is empty")
        # photos one level down (an unzipped dog.zip: dog/dog/*.jpg, or a dataset's root): which folder to pass
        inner = [folder / o.rstrip("/") for o in others if o.endswith("/") and _holds_images(folder / o.rstrip("/"))]
        down = (f" Subfolders are not searched: pass the folder that holds the images, "
                f"{' or '.join(repr(str(p)) for p in inner[:3])}{' or another' if len(inner) > 3 else ''}."
                if inner else "")
        raise ConceptDataError(f"no images in concept folder '{folder}': {seen}.{down} Accepted "
                               f"extensions: {accepted} (any case).")
    if others:
        warnings.warn(f"ignoring {len(others)} file(s) or folder(s) that are not images in '{folder}': "
                      f"{', '.join(others)} (accepted: {accepted}).", stacklevel=2)

    crops, paths, skipped, left_out = [], [], [], []
    pictures: dict[str, list[int]] = {}  # crops' pixels hash -> the crops (other bytes, the same picture)
    copies = byte_copies(images)
    for p in images:
        if p in copies:  # an exact copy would train that photo with double weight
            left_out.append((p, copies[p]))
            continue
        try:
            img = _decode(p, config.max_side, config.resolution)
        except _Unreadable as e:
            if not config.skip_bad:
                raise ConceptDataError(e.advice) from e
            warnings.warn(f"skipping unreadable image '{p}': {e.reason}.", stacklevel=2)
            skipped.append(f"{p.name} ({e.reason})")
            continue
        crop = _square(img, p, config.resolution, config.center_crop, config.max_side)
        # the crop's pixels, which are what trains: hashing a 12-megapixel original made loading 15 of them 36% slower
        pictures.setdefault(pixels_digest(crop), []).append(len(crops))
        crops.append(crop)
        paths.append(p)
    crops, paths = without_same_pixels(crops, paths, pictures, left_out)
    if left_out:
        warnings.warn(f"concept folder '{folder}' holds exact copies of images; training on each image once, "
                      f"leaving out {', '.join(copy_names(left_out))}. Delete the copies from the folder to silence "
                      "this.", stacklevel=2)
    if not crops:
        raise ConceptDataError(f"none of the {len(images)} image file(s) in '{folder}' could be read: "
                               f"{'; '.join(skipped[:5])}{'; ...' if len(skipped) > 5 else ''}. Add readable images.")
    if len(crops) < config.min_images:
        raise ConceptDataError(f"concept folder '{folder}' has {len(crops)} usable image(s), "
                               f"fewer than min_images={config.min_images}.")
    if not 3 <= len(crops) <= 15:
        warnings.warn(f"concept folder '{folder}' has {len(crops)} usable image(s); the method "
                      "expects 3-15 reference images.", stacklevel=2)
    crop = "" if (config.center_crop, config.max_side) == (True, 8192) else \
        f"center_crop={config.center_crop} max_side={config.max_side}"
    return Concept(crops, token, class_word, paths, prompt_template, crop, left_out)


_DREAMBOOTH = ("LIVE_CLASSES", "DreamBoothDataset", "DreamBoothSubject", "load_dreambooth")


def __getattr__(name: str):
    """The DreamBooth layout lives in ``prkit.dreambooth`` (which imports this module); prkit.data stays an import
    path for it."""
    if name in _DREAMBOOTH:
        from . import dreambooth

        return getattr(dreambooth, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
