"""Personalization concepts of the world: patterned objects the base model has never seen.

Owns the example concepts, their renders, the shipped reference folders (5 PNG + concept.json)
and the benchmark prompts. Regenerate the folders with `python -m prkit.world.concepts`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .render import EXTENT, Obj, Scene, _check_size_and_seed, render
from .vocab import BACKGROUNDS, CLASSES, COLOR_NAMES, PATTERNS, PLAIN, SCENE_PHRASES, SIZES

log = logging.getLogger(__name__)

CONCEPTS_DIR = Path(__file__).parent / "concepts"
PROMPT_TEMPLATE = "a photo of a {token} {class_word}"  # the training prompt of METHOD.md


@dataclass(frozen=True)
class WorldConcept:
    """A concept: identifier token, class word, two-colour pattern (colour, colour2)."""

    name: str
    token: str
    class_word: str
    pattern: str
    colors: tuple[str, str]

    def __post_init__(self) -> None:
        """Refuse, naming the field and the world's choices, a class, pattern or colour pair the world cannot draw
        (an unknown class_word failed in render_concept with a bare KeyError, a colour pair short of two with
        'not enough values to unpack')."""
        for name, value, allowed in (("class_word", self.class_word, CLASSES), ("pattern", self.pattern, PATTERNS)):
            if value not in allowed:
                raise ValueError(f"WorldConcept.{name} {value!r} is not in the world; it has {', '.join(allowed)}")
        colors = self.colors
        if isinstance(colors, str) or not isinstance(colors, (tuple, list)) or len(colors) != 2 or any(
                c not in COLOR_NAMES for c in colors):
            raise ValueError(f"WorldConcept.colors must be two of {', '.join(COLOR_NAMES)} (body, pattern), "
                             f"got {colors!r}")
        object.__setattr__(self, "colors", tuple(colors))


EXAMPLE_CONCEPTS: dict[str, WorldConcept] = {
    c.name: c
    for c in (
        WorldConcept("striped_ball", "sks", "ball", "stripes", ("red", "white")),
        WorldConcept("dotted_box", "zwx", "box", "dots", ("blue", "yellow")),
        WorldConcept("checked_star", "qrv", "star", "checks", ("green", "black")),
        WorldConcept("face_heart", "vbn", "heart", "face", ("purple", "white")),
        WorldConcept("striped_ring", "pfh", "ring", "stripes", ("orange", "blue")),
    )
}

# DreamBooth-like prompts, one per background (scenes, then plain).
BENCH_PROMPTS: list[str] = [
    f"{PROMPT_TEMPLATE} {SCENE_PHRASES[bg][0]}".strip() for bg in BACKGROUNDS
]


def concept_object(concept: WorldConcept, rng: np.random.Generator) -> Obj:
    """Sample one instance of the concept: small or large, anywhere with a margin."""
    lo, hi = SIZES["small"] if rng.random() < 0.5 else SIZES["large"]
    size = float(rng.uniform(lo, hi))
    m = EXTENT[concept.class_word] * size + 2.5
    x, y = rng.uniform(m, 64 - m, 2)
    c1, c2 = concept.colors
    return Obj(concept.class_word, c1, float(x), float(y), size, concept.pattern, c2)


def render_concept(
    concept: WorldConcept | str, n: int, seed: int = 0, background: str = PLAIN, size: int = 64
) -> list[Image.Image]:
    """Render n images of the concept (a WorldConcept, or a shipped one's name; varied position and size) on one
    background."""
    if isinstance(concept, str):
        if concept not in EXAMPLE_CONCEPTS:
            raise ValueError(f"{concept!r} is not a shipped world concept; these are: {', '.join(EXAMPLE_CONCEPTS)}")
        concept = EXAMPLE_CONCEPTS[concept]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a whole number of images >= 1, got {n!r}")
    _check_size_and_seed(size, seed)  # before numpy's seeding says 'expected non-negative integer'
    rng = np.random.default_rng([seed, 7])
    images = []
    for i in range(n):
        img, _ = render(Scene(background, [concept_object(concept, rng)]), seed=seed * 1000 + i, size=size)
        images.append(Image.fromarray(img))
    return images


def concept_folder(name: str) -> Path:
    """Path of the shipped reference folder prkit/world/concepts/<name>/ (a name of ``EXAMPLE_CONCEPTS``)."""
    if name not in EXAMPLE_CONCEPTS:
        raise ValueError(f"{name!r} is not a shipped world concept; these are: {', '.join(EXAMPLE_CONCEPTS)} "
                         "(or give a folder of your own images)")
    return CONCEPTS_DIR / name


def concept_named(name: str = "", token: str | None = None, class_word: str | None = None,
                  skip_unknown: bool = False) -> str | None:
    """The shipped concept to grade residuals of ``token``/``class_word`` with: ``name`` when given (it must have
    those words: the oracle's answer key is the concept's pattern), else the one with those words.
    ``skip_unknown``: words of none of them (a real model's concept) give None and a logged warning instead of the
    error; a ``name`` given is still checked."""
    shipped = ", ".join(f"{c.name} ({c.token} {c.class_word})" for c in EXAMPLE_CONCEPTS.values())
    if name:
        if name not in EXAMPLE_CONCEPTS:
            raise ValueError(f"{name!r} is not a shipped world concept; these are: {shipped}")
        concept = EXAMPLE_CONCEPTS[name]
        if token is not None and (concept.token, concept.class_word) != (token, class_word):
            raise ValueError(f"concept_name={name!r} is '{concept.token} {concept.class_word}', but the residuals are "
                             f"'{token} {class_word}': leave concept_name empty to grade the concept they were "
                             "trained on")
        return name
    for concept in EXAMPLE_CONCEPTS.values():
        if (concept.token, concept.class_word) == (token, class_word):
            return concept.name
    message = (f"'{token} {class_word}' is none of the world's shipped concepts ({shipped}), which the oracle "
               "can grade; grade other concepts with prkit eval (CLIP and DINO metrics)")
    if skip_unknown:
        log.warning("%s. The oracle's grading is skipped.", message)
        return None
    raise ValueError(message)


def run_concept(run_dir, name: str = "", skip_unknown: bool = False) -> str | None:
    """The world concept of a notebook run: ``name`` when given, else the one 01 prepared in ``run_dir/concept``
    (read from its concept.json), else the default striped_ball. ``skip_unknown``: as for ``concept_named``."""
    meta = Path(run_dir) / "concept" / "concept.json"
    if name or not meta.is_file():
        return concept_named(name or "striped_ball")
    words = json.loads(meta.read_text())
    return concept_named("", words.get("token"), words.get("class_word"), skip_unknown)


def another_concept(name: str, token: str) -> str:
    """``name``, or when its identifier is ``token`` (already in use) the first shipped concept with another.
    A ``name`` that is no shipped concept raises ValueError listing them."""
    if name not in EXAMPLE_CONCEPTS:
        raise ValueError(f"{name!r} is not a shipped world concept; these are: {', '.join(EXAMPLE_CONCEPTS)}")
    if EXAMPLE_CONCEPTS[name].token != token:
        return name
    other = next(c.name for c in EXAMPLE_CONCEPTS.values() if c.token != token)
    log.warning("%s has the identifier %r of the run's own concept; using %s instead", name, token, other)
    return other


COMPOSED_FIELDS = ("token", "class_word", "token2", "class_word2")  # 04's composed_prompt: the run's, the second's


def composed_text(template: str, token: str, class_word: str, second: str) -> str:
    """04's ``composed_prompt`` filled with the run's words and those of the shipped concept ``second``, checked
    before anything samples or trains: each set's LAG mask needs its identifier in the prompt.

    Raises:
        ValueError: ``template`` is no string, names a field other than ``COMPOSED_FIELDS`` or lacks {token} or
            {token2}; the message names composed_prompt.
    """
    import string

    example = "'a {token} {class_word} next to a {token2} {class_word2}'"
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"composed_prompt {template!r} is no prompt template: give e.g. {example}") from None
    other = sorted({f for f in fields if f not in COMPOSED_FIELDS})
    missing = [f"{{{f}}}" for f in ("token", "token2") if f not in fields]
    if other or missing:
        what = (f"names {', '.join(f'{{{f}}}' for f in other)}, which is none of "
                f"{', '.join(f'{{{f}}}' for f in COMPOSED_FIELDS)}" if other else
                f"lacks {' and '.join(missing)} (each residual set acts under its own identifier)")
        raise ValueError(f"composed_prompt {template!r} {what}: give e.g. {example}")
    concept = EXAMPLE_CONCEPTS[second]
    return template.format(token=token, class_word=class_word, token2=concept.token, class_word2=concept.class_word)


def write_concept_folder(concept: WorldConcept, folder: Path, n: int = 5, seed: int = 0) -> Path:
    """Write n reference PNGs (plain background) and concept.json into folder; returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # an earlier, larger set's references would stay in the concept (100.png on)
        if old.stem.isdigit():
            old.unlink()
    for i, img in enumerate(render_concept(concept, n, seed=seed)):
        img.save(folder / f"{i:02d}.png")
    meta = {"token": concept.token, "class_word": concept.class_word, "prompt_template": PROMPT_TEMPLATE,
            "pattern": concept.pattern, "colors": list(concept.colors)}
    (folder / "concept.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Render the example concepts' reference folders (by default the shipped ones, in place)."""
    import argparse

    from ..cli_args import _positive_int, _seed, _writable_folder

    ap = argparse.ArgumentParser(prog="python -m prkit.world.concepts", description=main.__doc__)
    ap.add_argument("--out", type=lambda text: Path(text).expanduser(), default=None,
                    help="write NAME/ folders here instead of over the shipped ones in prkit/world/concepts/")
    ap.add_argument("--concepts", nargs="+", default=list(EXAMPLE_CONCEPTS), choices=list(EXAMPLE_CONCEPTS),
                    metavar="NAME", help=f"default: all of {', '.join(EXAMPLE_CONCEPTS)}")
    ap.add_argument("--n", type=_positive_int, default=5, help="reference images per concept")
    ap.add_argument("--seed", type=_seed, default=0)
    args = ap.parse_args(argv)
    if args.out is not None:
        try:  # a file in the way failed with a traceback from mkdir
            _writable_folder(args.out, "--out")
        except ValueError as err:
            ap.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # a concept named twice is rendered once, in the order first named (as world.bench runs it): it was rendered
    # twice over the same folder
    for name in dict.fromkeys(args.concepts):
        folder = args.out / name if args.out is not None else concept_folder(name)
        log.info("wrote %s", write_concept_folder(EXAMPLE_CONCEPTS[name], folder, args.n, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
