"""Revision records: which exact model a name stood for, kept beside the name in residual file headers
(``base_model_revision``) and in an evaluation's run.json (``revisions``: the base model and the metric backbones).

A hub id: ``{"kind": "hub", "id", "commit"}``, the commit of the local cache's snapshot it was loaded from (the
snapshot folder's name, ``.../snapshots/<commit>/``; no network). A local folder: ``{"kind": "folder", "path",
"fingerprint", "commit"}``, its resolved path, a fingerprint of its files (``fingerprint``) and the commit it was
downloaded at where it says (a cache snapshot, or a folder ``hf download --local-dir`` wrote; else None). The
embedded world: ``{"kind": "world", "prkit_version", "fingerprint"}``. Nothing here raises: where a revision
cannot be known (a hub id whose snapshot is not known, a pipeline built in memory, an unreadable folder), the
record is None.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

COMMIT = re.compile(r"[0-9a-f]{40}")
WHOLE = 1 << 20  # files up to 1 MiB (configs, tokenizers) are hashed whole
SLICES, SLICE = 64, 1 << 16  # larger ones (weights): their size and 64 slices of 64 KiB spread over them
MAX_FILES = 10_000  # a folder with more files is no model folder: not fingerprinted
_UNSET = object()


def snapshot_commit(path) -> str | None:
    """The commit of the hub cache snapshot that ``path`` lies in (``.../snapshots/<commit>/...``), else None."""
    parts = Path(str(path)).parts
    found = [b for a, b in zip(parts, parts[1:]) if a == "snapshots" and COMMIT.fullmatch(b)]
    return found[-1] if found else None


def cached_commit(repo_id: str, cache_dir=None, revision: str | None = None) -> str | None:
    """The commit of the local Hugging Face cache's snapshot of ``repo_id`` at ``revision`` (default: main), what a
    load with ``local_files_only`` resolves it to, read from the cache alone; None where the cache has none."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model_index.json", "config.json"):
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
            if isinstance(found, str):
                return snapshot_commit(found)
    except Exception as err:  # noqa: BLE001 - a record, never a failure
        log.debug("no cached commit of %r: %s", repo_id, err)
    return None


def fingerprint(folder) -> str | None:
    """``sha256:<hex>`` over the model's files: a pipeline folder's model_index.json, prkit_defaults.json and the
    component folders its index lists (links followed: components shared by symlink; other files, such as a
    training run's logs and checkpoints beside them, left out), else every file of the folder; hidden ones left out
    (``.git``, ``hf download``'s ``.cache``). Each file counts with its path in the folder and size, its bytes where
    it is small (up to ``WHOLE``), else ``SLICES`` slices of 64 KiB spread over it. Cheap on multi-GB weights (a
    few MiB read), the same for a copy (no modification times); a fingerprint, not a hash: a change of a large
    file's bytes that misses every slice goes unseen. None where it cannot be read, and for an empty or blank name
    (``Path("")`` is '.': it fingerprinted the current folder)."""
    from .model_index import blank_name

    if blank_name(folder):
        return None
    folder = Path(folder)
    try:
        roots = [folder]
        if (folder / "model_index.json").is_file():
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
            listed = [key for key, value in index.items() if isinstance(value, list) and not key.startswith("_")]
            roots = [folder / "model_index.json", folder / "prkit_defaults.json", *(folder / key for key in listed)]
        files, seen = [], set()
        for root in roots:
            if root.is_file():
                files.append(root)
                continue
            for here, dirs, names in os.walk(root, followlinks=True):
                real = os.path.realpath(here)
                if real in seen:  # a link back up the tree
                    dirs[:] = []
                    continue
                seen.add(real)
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                files += [Path(here, name) for name in names if not name.startswith(".")]
                if len(files) > MAX_FILES:
                    return None
        digest = hashlib.sha256()
        for relative, path in sorted((p.relative_to(folder).as_posix(), p) for p in files):
            if not path.is_file():  # a broken link, a socket
                continue
            size = path.stat().st_size
            digest.update(f"{relative}\0{size}\0".encode())
            with open(path, "rb") as f:
                if size <= WHOLE:
                    digest.update(f.read())
                    continue
                for i in range(SLICES):
                    f.seek(max(0, size - SLICE) * i // (SLICES - 1))
                    digest.update(f.read(SLICE))
    except (OSError, ValueError) as err:
        log.debug("no fingerprint of %s: %s", folder, err)
        return None
    return "sha256:" + digest.hexdigest()


def _folder_commit(folder: Path) -> str | None:
    """The commit a local folder was downloaded at: a cache snapshot's name, or ``hf download --local-dir``'s
    metadata (its first line)."""
    commit = snapshot_commit(folder)
    if commit:
        return commit
    for name in ("model_index.json", "config.json"):
        path = folder / ".cache" / "huggingface" / "download" / f"{name}.metadata"
        if path.is_file():
            first = path.read_text(encoding="utf-8", errors="replace").partition("\n")[0].strip()
            if COMMIT.fullmatch(first):
                return first
    return None


def model_revision(name_or_path, *, world_folder=None, commit: str | None = None) -> dict | None:
    """The revision record of the model ``name_or_path`` names: "world" (``world_folder``, by default the world
    pipeline's), a local folder, or a hub id loaded from the snapshot ``commit`` (None: not known, no record; this
    does not guess the cache's main). None where nothing can be said; never raises."""
    try:
        name = str(name_or_path or "")
        if name == "world":
            from . import __version__
            from .model_index import world_path

            return {"kind": "world", "prkit_version": __version__,
                    "fingerprint": fingerprint(world_folder or world_path())}
        path = Path(name).expanduser()
        if name and path.is_dir():
            path = path.resolve()
            return {"kind": "folder", "path": str(path), "fingerprint": fingerprint(path),
                    "commit": _folder_commit(path)}
        from .model_index import _looks_like_path

        if name and commit and not _looks_like_path(name):
            return {"kind": "hub", "id": name, "commit": commit}
    except Exception as err:  # noqa: BLE001 - a record, never a failure
        log.debug("no revision of %r: %s", name_or_path, err)
    return None


def pipeline_revision(pipe) -> dict | None:
    """The revision record of a loaded pipeline: the one ``load_pipeline`` made when it loaded it, else one made from
    its ``name_or_path`` where its UNet (the residuals sit there) was loaded from that model: from the snapshot of
    that hub id diffusers loaded it from, or from inside that folder. None where it cannot be known (a UNet built in
    memory or loaded from elsewhere); never raises."""
    recorded = getattr(pipe, "__dict__", {}).get("prkit_revision", _UNSET)
    if recorded is not _UNSET:
        return recorded
    try:
        name = str(getattr(pipe, "name_or_path", None) or "")
        unet = getattr(pipe, "unet", None)
        place = str(getattr(getattr(unet, "config", None), "_name_or_path", None) or "")
        if not name or not place:
            return None
        key = (id(unet), name, place)  # once per pipeline and UNet: each training run records it (a fingerprint
        cached = pipe.__dict__.get("_prkit_revision_cache")  # reads a few MiB of a model folder)
        if cached is not None and cached[0] == key:
            return cached[1]
        pipe.__dict__["_prkit_revision_cache"] = (key, _unet_revision(name, place))
        return pipe.__dict__["_prkit_revision_cache"][1]
    except Exception as err:  # noqa: BLE001
        log.debug("no revision of the pipeline: %s", err)
        return None


def _unet_revision(name: str, place: str) -> dict | None:
    """The revision of the model ``name`` where the UNet was loaded from ``place`` inside it, else None."""
    if name == "world" or Path(name).expanduser().is_dir():
        folder = _world_folder() if name == "world" else Path(name).expanduser().resolve()
        inside = Path(place).expanduser().resolve().is_relative_to(Path(folder).resolve())
        return model_revision(name) if inside else None
    repo = "models--" + name.replace("/", "--")
    commit = snapshot_commit(place) if repo in Path(place).parts else None
    return model_revision(name, commit=commit)


def _world_folder() -> Path:  # imported late: pipeline imports this module
    from .model_index import world_path

    return world_path()
