"""Words and colours of the embedded world: classes, colours, scenes, patterns, identifiers.

Pure data shared by the renderer, the tokenizer, the concepts and the oracle. No I/O, no logic.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("ball", "box", "star", "heart", "triangle", "ring")

# Eight colours, far apart in RGB (min pairwise distance > 100) so a blurry sample stays readable.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (255, 125, 0),
    "yellow": (250, 225, 30),
    "green": (30, 190, 60),
    "blue": (30, 80, 235),
    "purple": (145, 45, 200),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SCENES: tuple[str, ...] = (
    "snow",
    "grass",
    "beach",
    "night sky",
    "wooden floor",
    "pink fabric",
    "cobblestone street",
)
PLAIN = "plain"  # flat light-gray background; its captions carry no scene phrase
BACKGROUNDS: tuple[str, ...] = SCENES + (PLAIN,)

# Scene phrases used in captions; the first one is the default (rng=None).
SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "snow": ("in the snow", "on the snow"),
    "grass": ("on the grass", "in the grass"),
    "beach": ("on the beach",),
    "night sky": ("under the night sky", "in the night sky"),
    "wooden floor": ("on the wooden floor", "on a wooden floor"),
    "pink fabric": ("on the pink fabric", "on a pink fabric"),
    "cobblestone street": ("on the cobblestone street", "on a cobblestone street"),
    PLAIN: ("",),
}
CAPTION_TEMPLATES: tuple[str, ...] = ("a photo of {objects}", "{objects}", "a picture of {objects}")

PATTERNS: tuple[str, ...] = ("stripes", "dots", "checks", "face")
# How captions name a pattern: "a red and white striped ball" (the example concepts never appear).
PATTERN_WORDS: dict[str, str] = {"stripes": "striped", "dots": "dotted", "checks": "checkered", "face": "smiling"}
IDENTIFIERS: tuple[str, ...] = ("sks", "zwx", "qrv", "vbn", "pfh")  # never in training captions

POSITIONS: tuple[str, ...] = ("left", "center", "right")  # x thirds of the image
SIZES: dict[str, tuple[float, float]] = {"small": (8.0, 11.0), "large": (13.0, 18.0)}  # radius, px @64

# Extra single-token words for DreamBooth-like prompts (not used by training captions).
EXTRA_WORDS: tuple[str, ...] = (
    "an", "and", "with", "top", "of", "in", "on", "at", "the", "a", "photo", "picture", "image",
    "next", "to", "under", "near", "by", "front", "behind", "inside", "above", "below", "left",
    "right", "center", "small", "large", "big", "tiny", "close", "up", "view", "background",
    "plain", "gray", "sitting", "lying", "floating", "shiny", "wet", "cube", "toy", "object",
    "striped", "stripes", "dotted", "dots", "checkered", "checks", "face", "smiling", "pattern",
)


def world_words() -> list[str]:
    """Return every word the world tokenizer must map to a single token (sorted, unique)."""
    words: set[str] = set(CLASSES) | set(COLORS) | set(IDENTIFIERS) | set(EXTRA_WORDS)
    for text in [*CAPTION_TEMPLATES, *(p for ps in SCENE_PHRASES.values() for p in ps), *SCENES]:
        words.update(w for w in text.replace("{objects}", "").split())
    words.update(POSITIONS)
    words.update(SIZES)
    return sorted(words)
