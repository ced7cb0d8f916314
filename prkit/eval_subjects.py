"""The subjects of each evaluation protocol: the world's benchmark concepts, a DreamBooth dataset folder and a
CustomConcept101 folder, each as ``Subject``s with their formatted prompts and a loader for their images.
It only reads datasets: it must not train, sample or score (the runner in ``evaluate`` does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .evaluate import EvalConfig

PROTOCOLS = ("world", "dreambooth", "customconcept101")


@dataclass
class Subject:
    """One concept of a protocol: its words, its evaluation prompts (formatted) and how to load its images."""

    name: str
    token: str
    class_word: str
    prompts: list[str]
    load: Callable  # resolution -> prkit.data.Concept
    world: object = None  # the WorldConcept (world protocol)
    folder: Path | None = None  # its image folder, where the protocol names one (checked before any job)


def load_customconcept101(root: str | Path, token: str = "sks") -> list[Subject]:
    """Subjects of a CustomConcept101 folder.

    Assumed layout (that of the customconcept101 folder of adobe-research/custom-diffusion): ``root/dataset.json``,
    a list of {"instance_data_dir", "class_prompt", "prompt_filename"} with paths relative to ``root``; each
    prompt file has one prompt per line with ``{}`` where the concept goes ("{} swimming in a pool."). ``{}``
    becomes "<token> <class_prompt>" (our identifier instead of their "<new1>"). Without dataset.json: one
    folder per concept holding its images, a ``prompts.txt`` and a ``concept.json`` with "class_word".
    The subject's name is its image folder's name: two concepts of one name are refused here (a missing image
    folder by ``load_subjects``, for the subjects run), as is a token that ``load_concept`` would refuse for a
    concept (None, '', several words, its class word), before any model loads.
    """
    from .data import ConceptDataError, check_concept_words, load_concept

    root = Path(root)
    spec = root / "dataset.json"
    entries = []

    def read_json(path: Path):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConceptDataError(f"cannot read '{path}': {e}; fix it (CustomConcept101's layout) or restore it "
                                   "from the dataset") from e

    def field(item, key: str, path: Path, what: str):
        value = item.get(key) if isinstance(item, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise ConceptDataError(f"'{path}': {what} has no {key!r} (a non-empty string); CustomConcept101's "
                                   f"layout gives it for every concept")
        return value

    if spec.is_file():
        items = read_json(spec)
        if not isinstance(items, list):
            raise ConceptDataError(f"'{spec}' must hold a list of concepts (CustomConcept101's dataset.json), found "
                                   f"a {type(items).__name__}")
        for i, item in enumerate(items):
            what = f"entry {i}"
            folder, class_word = field(item, "instance_data_dir", spec, what), field(item, "class_prompt", spec, what)
            entries.append((root / folder, class_word, root / field(item, "prompt_filename", spec, what)))
    elif root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "prompts.txt").is_file()):
            meta = folder / "concept.json"
            if not meta.is_file():
                raise ConceptDataError(f"'{meta}' is missing: it must give the concept's class_word")
            entries.append((folder, field(read_json(meta), "class_word", meta, "the concept"), folder / "prompts.txt"))
    if not entries:
        raise ConceptDataError(f"no CustomConcept101 concepts under '{root}': expected dataset.json or concept "
                               "folders each with prompts.txt and concept.json")
    subjects, seen = [], {}
    for folder, class_word, prompt_file in entries:
        if folder.name in seen:  # the evaluation knows a subject by its folder's name: one of them would not run
            raise ConceptDataError(f"two concepts are named {folder.name!r} (their image folder's name): "
                                   f"'{seen[folder.name]}' and '{folder}'; a subject is named by its folder, so "
                                   f"rename one folder (and its instance_data_dir) or remove the duplicate entry")
        seen[folder.name] = folder
        if not prompt_file.is_file():
            raise ConceptDataError(f"prompt file '{prompt_file}' of concept '{folder.name}' is missing")
        lines = [ln.strip() for ln in prompt_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise ConceptDataError(f"prompt file '{prompt_file}' of concept '{folder.name}' has no prompts; write "
                                   "one per line, with {} where the concept goes")
        bare = next((ln for ln in lines if "{}" not in ln), None)  # it would train, then fail at LAG's sampling
        if bare is not None:
            raise ConceptDataError(f"prompt file '{prompt_file}' of concept '{folder.name}': the prompt {bare!r} has "
                                   "no {} where the concept goes ('<token> <class>'); every prompt needs one")
        check_concept_words(token, class_word)  # not 'Photo of a  dog.', refused only at the concept's first job
        prompts = [ln.replace("{}", f"{token} {class_word}") for ln in lines]

        def load(resolution: int, folder=folder, class_word=class_word):
            return load_concept(folder, token, class_word, resolution)
        subjects.append(Subject(folder.name, token, class_word, prompts, load, folder=folder))
    return subjects


def load_subjects(config: EvalConfig) -> list[Subject]:
    """The protocol's subjects (only ``config.subjects`` when given), prompts cut to ``config.max_prompts``."""
    from .data import load_concept

    if config.protocol == "world":
        from .world.concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS, concept_folder

        subjects = []
        for name, c in EXAMPLE_CONCEPTS.items():
            prompts = [p.format(token=c.token, class_word=c.class_word) for p in BENCH_PROMPTS]

            def load(resolution: int, name=name):
                return load_concept(concept_folder(name), resolution=resolution)
            subjects.append(Subject(name, c.token, c.class_word, prompts, load, world=c))
    elif config.protocol == "dreambooth":
        from .dreambooth import load_dreambooth

        if not config.data:
            raise ValueError("the dreambooth protocol needs --data: the DreamBooth dataset folder")
        ds = load_dreambooth(config.data)
        subjects = []
        for name in sorted(ds.subjects):
            def load(resolution: int, name=name):
                return ds.concept(name, config.token, resolution)
            s = ds.subjects[name]
            subjects.append(Subject(name, config.token, s.class_word, ds.prompts(name, config.token), load))
    elif config.protocol == "customconcept101":
        if not config.data:
            raise ValueError("the customconcept101 protocol needs --data: the CustomConcept101 folder")
        subjects = load_customconcept101(config.data, config.token)
    else:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {config.protocol!r}")
    if config.subjects:
        known = {s.name for s in subjects}
        missing = [n for n in config.subjects if n not in known]
        if missing:
            raise ValueError(f"unknown subjects {missing}; this protocol has: {', '.join(sorted(known))}")
        subjects = [s for s in subjects if s.name in config.subjects]
    for s in subjects:
        s.prompts = s.prompts[:config.max_prompts] if config.max_prompts is not None else s.prompts
        if s.folder is not None and not s.folder.is_dir():  # refused now, not at its first job (hours into a run)
            from .data import ConceptDataError

            raise ConceptDataError(f"image folder '{s.folder}' of subject '{s.name}' does not exist; fix the path the "
                                   "dataset gives it (CustomConcept101: instance_data_dir in dataset.json), or leave "
                                   "the subject out with --subjects")
    return subjects
