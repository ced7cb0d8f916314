"""The evaluation's scorer: loads the metric backbones (CLIP, DINO; or says why each is unavailable) and the
world's oracle once, and scores one job's images against the subject's references and prompts.
It must not train or sample, and it writes nothing: the runner in ``evaluate`` turns its rows into results.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .eval_subjects import Subject
    from .evaluate import EvalConfig

log = logging.getLogger("prkit.evaluate")  # the harness's logger, as before the scorer had its own module


def strip_token(prompt: str, token: str) -> str:
    """The prompt without the identifier ("a photo of a sks dog" -> "a photo of a dog"), as CLIP-T reads it."""
    return re.sub(rf"\s*(?<!\w){re.escape(token)}(?!\w)", "", prompt).strip()


def _reference_images(concept) -> list:
    """The concept's original reference images (full size, EXIF-rotated) when its files exist, else its crops; in RGB
    as ``load_concept`` takes them (transparency on white, 16-bit scaled)."""
    from PIL import Image, ImageOps

    from .images import _to_rgb

    paths = [p for p in concept.paths if Path(p).is_file()]
    if len(paths) != len(concept.images):
        return list(concept.images)
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(_to_rgb(ImageOps.exif_transpose(im), im.format))
    return out


def _identity(backbone) -> str | None:
    """A loaded backbone as the settings record it: its hub id, "world", or its folder resolved; None: not loaded."""
    from .metrics import WORLD

    if backbone is None:
        return None
    path = Path(backbone.name).expanduser()
    return str(path.resolve()) if backbone.name != WORLD and path.exists() else backbone.name


class Scorer:
    """Holds the metric backbones (or why each is unavailable) and the oracle, and scores one job's images."""

    def __init__(self, config: EvalConfig, device, oracle=None, need_oracle: bool = True):
        from .metrics import DEFAULT_CLIP, DEFAULT_DINO, WORLD, try_load_clip, try_load_dino

        clip = {"auto": WORLD if config.protocol == "world" else DEFAULT_CLIP}.get(config.clip, config.clip)
        dino = {"auto": DEFAULT_DINO}.get(config.dino, config.dino)
        get = config.download_backbones
        self.clip, clip_reason = try_load_clip(clip, device, get) if clip else (None, "switched off")
        self.dino, dino_reason = try_load_dino(dino, device, get) if dino else (None, "switched off")
        self.unavailable = {"CLIP-I/CLIP-T": clip_reason, "DINO": dino_reason}
        # which backbones score (None: that metric is not scored), as a rerun's settings compare them
        self.backbones = {"clip": _identity(self.clip), "dino": _identity(self.dino)}
        # which revision of each (prkit.revisions; None: not loaded, or not known), as run.json records them
        self.revisions = {"clip": getattr(self.clip, "revision", None), "dino": getattr(self.dino, "revision", None)}
        for name, reason in self.unavailable.items():
            if reason:
                log.warning("%s unavailable: %s", name, reason)
        self.oracle = oracle
        if config.protocol == "world" and oracle is None and need_oracle:
            from .world.oracle import load_oracle

            self.oracle = load_oracle(device)
        self._refs: dict[str, tuple] = {}

    def _ref(self, subject: Subject, concept) -> tuple:
        if subject.name not in self._refs:
            images = _reference_images(concept)
            self._refs[subject.name] = (self.clip.embed_images(images) if self.clip else None,
                                        self.dino.embed_images(images) if self.dino else None)
        return self._refs[subject.name]

    def score(self, subject: Subject, concept, images: list[list], base: list[list] | None) -> list[dict]:
        """Rows (prompt_index, prompt, seed, metrics) for ``images[prompt][seed]``; ``base`` as for the world."""
        from . import metrics

        per = len(images[0])
        flat = [im for group in images for im in group]
        rows = [{"prompt_index": i, "prompt": p, "seed": j} for i, p in enumerate(subject.prompts) for j in range(per)]
        if self.oracle is not None and subject.world is not None:
            from .world.bench import grade, mirrored_readings
            from .world.oracle import read

            side = 64  # the oracle reads (and masks) 64x64 images: grade at that size
            gen64 = [im if im.size == (side, side) else im.resize((side, side)) for im in flat]
            base64 = [im if im.size == (side, side) else im.resize((side, side)) for group in base for im in group]
            graded = grade(gen64, base64, read(gen64, self.oracle), read(base64, self.oracle), subject.world,
                           subject.prompts, per, mirrored_readings(gen64, subject.world, self.oracle))
            for row, g in zip(rows, graded):
                row.update({k: g[k] for k in ("identity", "identity_colors", "scene", "class", "background_change")})
        clip_ref, dino_ref = self._ref(subject, concept)
        if self.clip is not None:
            gen = self.clip.embed_images(flat)
            texts = self.clip.embed_texts([strip_token(p, subject.token) for p in subject.prompts])
            texts = texts.repeat_interleave(per, dim=0)  # (N, D): each image's prompt
            scores = {"clip_i": metrics.clip_i(gen, clip_ref, reduce=False),
                      "clip_t_dreambooth": metrics.clip_t(gen, texts, "dreambooth", reduce=False),
                      "clip_t_clipscore": metrics.clip_t(gen, texts, "clipscore", reduce=False)}
            for k, v in scores.items():
                for row, x in zip(rows, v.tolist()):
                    row[k] = x
        if self.dino is not None:
            for row, x in zip(rows, metrics.dino(self.dino.embed_images(flat), dino_ref, reduce=False).tolist()):
                row["dino"] = x
        return rows
