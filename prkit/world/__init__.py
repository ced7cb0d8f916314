"""The embedded offline world: a procedural renderer, its vocabulary, concepts and oracle.

Importing this package does no I/O and does not import torch; the oracle (torch) and the model
recipe live in `prkit.world.oracle` and `prkit.world.train`. See CONTRACT.md for the module contract.
"""

from .render import Obj, Scene, caption, render, sample_scene
from .vocab import CLASSES, COLORS, IDENTIFIERS, PATTERNS, PLAIN, SCENES

# Imported on first use: imported here, `python -m prkit.world.concepts` found its own module already loaded and
# warned (RuntimeWarning, "may result in unpredictable behaviour") on every run.
_FROM_CONCEPTS = ("BENCH_PROMPTS", "EXAMPLE_CONCEPTS", "WorldConcept", "concept_folder", "render_concept")

__all__ = [
    "BENCH_PROMPTS", "CLASSES", "COLORS", "EXAMPLE_CONCEPTS", "IDENTIFIERS", "PATTERNS", "PLAIN", "SCENES",
    "Obj", "Scene", "WorldConcept", "caption", "concept_folder", "render", "render_concept", "sample_scene",
]


def __getattr__(name: str):
    if name in _FROM_CONCEPTS:
        from . import concepts

        return getattr(concepts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
