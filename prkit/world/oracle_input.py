"""What the oracle reads: any common image form turned into one (N, 3, 64, 64) float batch in [0, 1].

Accepted: a PIL image (16-bit, 32-bit integer and float grey modes read at their depth, as the arrays they
hold), a numpy array or a torch tensor of one image ((H, W), (H, W, C) or (C, H, W)) or of a batch ((N, H, W, C)
or (N, C, H, W)), or a list of any of these, each resized on its own. Channels: grey (1), RGB (3) or RGBA (4,
alpha dropped). Values: uint8 0-255, uint16 0-65535 (numpy or torch), other integers 0-255 (0-65535 where
larger), or floats in [0, 1]; floats outside [0, 1] (0-255 floats, [-1, 1] tensors), NaN or infinity and other
integers outside 0-65535 are refused rather than read as something else.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 64
_CHANNELS = (1, 3, 4)
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL grey modes deeper than 8 bits
_SLACK = 0.01  # float images a decoder left a hair outside [0, 1] are fine (clamped)


def _channels_first(x: torch.Tensor, what: str) -> torch.Tensor:
    """(N, C, H, W) from (N, H, W, C) or (N, C, H, W); C made 3."""
    if x.shape[1] in _CHANNELS and x.shape[-1] not in _CHANNELS:
        pass
    elif x.shape[-1] in _CHANNELS:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"{what}: shape {tuple(x.shape)} has no channel axis of 1, 3 or 4 (expected images as "
                         "(N, H, W, 3) or (N, 3, H, W))")
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    return x[:, :3]  # RGBA: alpha dropped, as PIL's convert("RGB") does


def _unit(x: torch.Tensor, what: str) -> torch.Tensor:
    """Values to float [0, 1] by dtype; floats must already be there."""
    if x.numel() == 0:
        return x.float()
    if x.dtype == torch.uint8:
        return x.float() / 255
    if x.dtype in (torch.int16, torch.int32, torch.int64):  # integers of unknown depth: 8-bit when they fit
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 65535:  # clamped, they read as black or white
            raise ValueError(f"{what}: {str(x.dtype).removeprefix('torch.')} values span [{lo}, {hi}]; the oracle "
                             "reads integers in 0-255 or 0-65535 (pass uint8 or uint16 images, or floats in [0, 1])")
        return x.float() / (65535 if hi > 255 else 255)
    if x.dtype == torch.bool:
        return x.float()
    if not x.is_floating_point():  # int8 and the like: no image depth they could stand for
        raise ValueError(f"{what}: {str(x.dtype).removeprefix('torch.')} values are no image depth the oracle "
                         "knows; pass uint8 (0-255), uint16 or int16-int64 (0-255 or 0-65535), or floats in [0, 1]")
    x = x.float()
    if not bool(torch.isfinite(x).all()):  # NaN passes every comparison: it was read as an image
        raise ValueError(f"{what}: float values include NaN or infinity (a sample that diverged?); the oracle reads "
                         "finite floats in [0, 1]: check the pipeline's output (e.g. fp16 overflow in its VAE)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_SLACK or hi > 1 + _SLACK:
        raise ValueError(f"{what}: float values span [{lo:.3g}, {hi:.3g}]; the oracle reads floats in [0, 1] "
                         "(divide 0-255 images by 255, map [-1, 1] ones with (x + 1) / 2, or pass uint8)")
    return x


def _tensor(image, what: str) -> torch.Tensor:
    """A tensor of the image; 16-bit unsigned ones already as floats in [0, 1] (their depth is their dtype's)."""
    if isinstance(image, torch.Tensor):
        image = image.detach()
        if image.dtype == torch.uint16:  # few kernels take it
            return image.to(torch.int32).float() / 65535
        return image
    if hasattr(image, "convert") and image.mode not in _DEEP_MODES:  # PIL
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    # 16-bit, 32-bit int and float PIL images at their depth (convert() clips to 0-255), copied: PIL's are read-only
    array = np.array(image) if hasattr(image, "convert") else np.asarray(image)
    if array.dtype.kind in "OUSV":  # torch said "can't convert np.ndarray of type numpy.object_"
        hint = " (a file path? open it with PIL.Image.open)" if isinstance(image, (str, os.PathLike)) else ""
        raise ValueError(f"{what}: a {type(image).__name__} is not an image{hint}; pass PIL images, numpy arrays or "
                         "torch tensors, one image, a batch or a list of them")
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16, either byte order (PIL's I;16B)
        return torch.from_numpy(array.astype(np.float32) / 65535)
    array = np.ascontiguousarray(array)
    # np.asarray(pil_image) is read-only, for which torch warns that writing is undefined: nothing writes, copy it
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _batch(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim == 2:
        x = x[None, ..., None]
    elif x.ndim == 3:
        x = x[None]
    elif x.ndim != 4:
        raise ValueError(f"{what}: a {x.ndim}-d array is not an image or a batch of images")
    x = _unit(_channels_first(x, what), what)
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def as_batch(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """Any accepted form (module docstring) -> (N, 3, 64, 64) float32 on ``device``; N may be 0."""
    if isinstance(images, (list, tuple)):
        parts = [_batch(_tensor(image, f"images[{i}]"), f"images[{i}]") for i, image in enumerate(images)]
        x = torch.cat([p.to(device) for p in parts]) if parts else torch.zeros(0, 3, SIZE, SIZE)
    else:
        x = _batch(_tensor(images, "images"), "images")
    return x.to(device)
