"""Copies among a concept folder's images, which ``load_concept`` trains once (a copy would weight its picture double):
files with the same bytes (photo.jpg and 'photo (1).jpg') or the same decoded pixels (the picture saved again with
other settings or metadata). The shortest name is kept ('photo.jpg', not the 'photo (1).jpg' that sorts before it).
Decodes no image itself (``images`` does)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image


def file_digest(path: Path) -> str | None:
    """A hash of a regular file's bytes (exact copies share it); None where the file cannot be read, so reading it as
    an image names the problem (a pipe is not opened here: that would wait for a writer)."""
    try:
        if not path.is_file():
            return None
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def byte_copies(paths: list[Path]) -> dict[Path, Path]:
    """Each file of ``paths`` whose bytes an earlier one has -> the file kept (the shortest name); files that cannot be
    read are none."""
    digests = {p: file_digest(p) for p in paths}
    original: dict[str, Path] = {}  # file bytes' hash -> the file kept
    for p in sorted(paths, key=lambda p: (len(p.name), p.name)):
        if digests[p] is not None:
            original.setdefault(digests[p], p)
    return {p: original[d] for p, d in digests.items() if d is not None and original[d] != p}


def pixels_digest(img: Image.Image) -> str:
    """A hash of a decoded image's pixels (the same picture in other bytes shares it: another PNG compression,
    other metadata, another lossless format). ``load_concept`` hashes each file's training crop: two files that
    crop to the same pixels would train the same picture twice."""
    return hashlib.blake2b(f"{img.mode} {img.size}".encode() + img.tobytes(), digest_size=16).hexdigest()


def without_same_pixels(crops: list, paths: list[Path], pictures: dict[str, list[int]],
                         left_out: list[tuple[Path, Path]]) -> tuple[list, list[Path]]:
    """The crops and paths without the files whose decoded pixels an earlier one has (``pictures``: pixels' hash ->
    indices), the shortest name kept as for exact copies; each one left out joins ``left_out`` (in name order)."""
    dropped, kept_for = set(), {}
    for indices in pictures.values():
        kept = min(indices, key=lambda i: (len(paths[i].name), paths[i].name))
        kept_for.update((paths[i], paths[kept]) for i in indices if i != kept)
        dropped.update(i for i in indices if i != kept)
    # a byte copy's original that is itself left out as a pixel copy: the copy names the file that trains instead
    left_out[:] = [(copy, kept_for.get(kept, kept)) for copy, kept in left_out] + list(kept_for.items())
    left_out.sort(key=lambda pair: pair[0].name)
    return ([c for i, c in enumerate(crops) if i not in dropped], [p for i, p in enumerate(paths) if i not in dropped])


def copy_names(left_out: list[tuple[Path, Path]]) -> list[str]:
    """'copy' (same bytes as 'kept', or same pixels: the picture saved again in other bytes) for each copy
    ``load_concept`` left out."""
    return [f"'{copy.name}' (same {'bytes' if _same_bytes(copy, kept) else 'pixels'} as '{kept.name}')"
            for copy, kept in left_out]


def _same_bytes(a: Path, b: Path) -> bool:
    digest = file_digest(a)
    return digest is not None and digest == file_digest(b)
