"""One reference image -> a square RGB crop: any format Pillow reads, EXIF rotation, odd modes (16-bit, CMYK,
transparency), huge photos decoded at a reduced scale, corrupt files named with what to do."""

from __future__ import annotations

import errno
import os
import threading
import warnings
from pathlib import Path

import numpy as np
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


def _plugin_opens(suffix: str) -> bool:
    """Whether a ``_NEEDS_PLUGIN`` extension opens now; pillow-heif's opener is registered here when the package is
    installed (the command line has no other way to call its register_heif_opener())."""
    if suffix not in _NEEDS_PLUGIN:
        return False
    if Image.registered_extensions().get(suffix) not in Image.OPEN:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            return False
        register_heif_opener()
    return Image.registered_extensions().get(suffix) in Image.OPEN


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# formats whose mode "I" is 0..65535 whatever the values: a 16-bit PNG by definition (Pillow 10.0 opens its grey ones
# as "I", 11.3 on as "I;16"), a PGM/PPM because Pillow rescales its declared maxval (above 255) to 65535
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ConceptDataError(ValueError):
    """A reference image, concept folder, dataset layout or argument is unusable."""


class _Unreadable(Exception):
    """Internal: `path` could not be decoded, for `reason`."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.advice = (f"cannot read image '{path}': {reason}. Remove or replace the file, "
                       "or pass skip_bad=True to skip it.")


def _to_rgb(img: Image.Image, fmt: str | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white. `fmt` is the file's format (Pillow's
    ``img.format``, which a transposed copy no longer has): it decides the range of a mode "I" image."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        # one float32 working copy, changed in place (float64 copies took ~27 bytes a pixel: 3.9 GB for 144 MP)
        arr = np.asarray(img).astype(np.float32)
        top = float(np.nanmax(arr)) if arr.size else 0.0
        if img.mode == "F":  # float images: 0..1 (scaled) or already 0..255
            full = 1.0 if top <= 1.0 else 255.0
        else:  # 16-bit: scale the 16-bit range, do not clip it; a 32-bit image holding 8-bit values stays as is
            # (a TIFF of 32-bit integers declares no range); never guessed for a 16-bit format: a dark 16-bit PNG or
            # PGM whose values stay under 256 is dark, not 8-bit (it came out up to 257x too bright)
            full = 255.0 if img.mode == "I" and fmt not in _SIXTEEN_BIT_I_FORMATS and top <= 255 else 65535.0
        clear = arr == img.info["transparency"] if isinstance(img.info.get("transparency"), int) else None
        np.nan_to_num(arr, copy=False)
        np.clip(arr, 0, full, out=arr)
        arr *= np.float32(255.0 / full)
        if clear is not None:  # a 16-bit grey PNG's transparent level (tRNS): white, as for 8-bit images
            arr[clear] = 255.0
        return Image.fromarray(np.rint(arr, out=arr).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _missing(path: Path) -> str:
    """Why `path`, which does not exist as far as ``exists()`` tells, cannot be read: a link to itself (or links to
    each other) is a symlink loop (``exists()`` is False for both), not a broken link to a missing file."""
    if not path.is_symlink():
        return "no such file"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP or getattr(e, "winerror", None) == 1921:  # (Windows: ERROR_CANT_RESOLVE_FILENAME)
            try:
                target = f" ('{path.name}' -> '{os.readlink(path)}': following the links never reaches a file)"
            except OSError:
                target = ""
            return "a symlink loop" + target
    return "no such file (a broken link)"


def _decode(path: Path, max_side: int | None = None, resolution: int | None = None) -> Image.Image:
    """Open, fully decode, EXIF-rotate and convert `path` to RGB; raise `_Unreadable`.

    A JPEG with a side over `max_side`, or past Pillow's bomb warning (89 megapixels), is decoded at a reduced
    scale (the DCT's 1/2, 1/4 or 1/8) that keeps its long side at least `max_side` and its short side at least
    four times `resolution`: a 108-megapixel phone photo then takes a fraction of the time and memory. Images
    between the bomb warning and Pillow's hard limit (twice it) are read; beyond it is an error.
    """
    try:
        if path.is_dir():
            raise _Unreadable(path, "it is a folder, not an image file")
        if not path.is_file():
            raise _Unreadable(path, _missing(path) if not path.exists()
                              else "not a regular file (a pipe, socket or device)")
        if path.stat().st_size == 0:
            raise _Unreadable(path, "the file is empty (0 bytes)")
    except PermissionError as e:  # a link into a folder this user may not search
        raise _Unreadable(path, f"permission denied ({e.strerror}); make it and its folder readable, or copy it "
                                "somewhere that is") from e
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
                return _to_rgb(ImageOps.exif_transpose(img), img.format)
    except Image.DecompressionBombError as e:
        raise _Unreadable(path, f"{e} Downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
                                "if you trust the file") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
        suffix = path.suffix.lower()
        if suffix in _NEEDS_PLUGIN and not _plugin_opens(suffix):  # what load_concept says of such files in a folder
            raise _Unreadable(path, f"{suffix} images need {_NEEDS_PLUGIN[suffix]} (pip install "
                                    f"{_NEEDS_PLUGIN[suffix]}), or convert it to JPEG or PNG") from e
        tiff = _tiff_reason(path) if isinstance(e, Image.UnidentifiedImageError) else None
        # an image Pillow has no mode for, not a file that is no image: converted, the photo trains
        if tiff and "pixel mode" in tiff:
            raise _Unreadable(path, f"a TIFF whose pixel format Pillow cannot decode (Pillow: {tiff}; e.g. "
                                    "floating-point colour or 64-bit samples): convert it to an 8- or 16-bit TIFF or "
                                    "PNG") from e
        if tiff:
            raise _Unreadable(path, f"a TIFF that Pillow cannot open (Pillow: {tiff})") from e
        raise _Unreadable(path, str(e).rstrip(".") or type(e).__name__) from e


def _tiff_reason(path: Path) -> str | None:
    """Pillow's reason for refusing a file that starts as a TIFF (its ``Image.open`` says only 'cannot identify image
    file'); None for other files."""
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                return None
        from PIL import TiffImagePlugin

        with warnings.catch_warnings():  # Image.open's read of it warned already
            warnings.simplefilter("ignore")
            TiffImagePlugin.TiffImageFile(path).close()
    except Exception as e:  # the header read raises SyntaxError, ValueError, struct.error, ...
        return str(e).rstrip(".") or type(e).__name__
    return None


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
    if resolution:  # never below the crop's side (a panorama's short side): that would be upscaled again
        k = min(k, max(1, min(w, h) // resolution))
        k = max(k, min(w, h) // (4 * resolution))
    if k > 1:
        img.draft(img.mode, (max(1, w // k), max(1, h // k)))


def _square(img: Image.Image, path: Path, resolution: int, center_crop: bool,
            max_side: int) -> Image.Image:
    """Downscale oversized images (never below ``resolution`` on the short side, which the crop keeps), crop the
    central square (or not) and resize."""
    if max(img.size) > max_side:
        factor = min(-(-max(img.size) // max_side), max(1, min(img.size) // resolution))  # ceil division, capped
        if factor > 1:
            img = img.reduce(factor)
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
    for name, value in (("resolution", resolution), ("max_side", max_side)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConceptDataError(f"{name} must be a positive int (pixels), got {value!r}.")
    path = Path(path).expanduser()
    try:
        img = _decode(path, max_side, resolution)
    except _Unreadable as e:  # one file: load_concept's skip_bad is no advice here
        raise ConceptDataError(f"cannot read image '{path}': {e.reason}. Replace the file, or convert it to JPEG or "
                               "PNG.") from e
    return _square(img, path, resolution, center_crop, max_side)
