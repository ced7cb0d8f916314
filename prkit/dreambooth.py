"""The DreamBooth dataset layout (google/dreambooth ``dataset/``): subject folders, ``prompts_and_classes.txt``
with the subject -> class table and the object / live-subject prompt lists. Reads the layout; loading images is
``data.load_concept``'s job."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .data import Concept, ConceptDataError, check_concept_words, load_concept

LIVE_CLASSES = frozenset({"cat", "dog"})  # DreamBooth's 9 "live subjects" are its cats and dogs


@dataclass
class DreamBoothSubject:
    """One subject of the DreamBooth dataset."""

    name: str  # folder name, e.g. 'dog6'
    class_word: str  # e.g. 'dog'
    folder: Path
    is_live: bool  # cats and dogs get the 'live subject' prompt list


@dataclass
class DreamBoothDataset:
    """The DreamBooth layout: subject folders plus prompts_and_classes.txt."""

    root: Path
    subjects: dict[str, DreamBoothSubject]  # only subjects whose folder exists
    object_prompts: list[str]  # templates with {0} = token, {1} = class word
    live_prompts: list[str]
    listed: dict[str, str] = field(default_factory=dict, repr=False)  # name -> class, all rows

    def subject(self, name: str) -> DreamBoothSubject:
        """Look up a subject by folder name, with a clear error if absent."""
        if name in self.subjects:
            return self.subjects[name]
        if name in self.listed:
            raise ConceptDataError(f"DreamBooth subject {name!r} is listed in prompts_and_classes"
                                   f".txt but its folder '{self.root / name}' is missing.")
        raise ConceptDataError(f"unknown DreamBooth subject {name!r}; available: "
                               f"{', '.join(sorted(self.subjects))}.")

    def prompts(self, subject_name: str, token: str = "sks") -> list[str]:
        """The subject's evaluation prompts (the live list for cats and dogs), formatted.

        Args:
            subject_name: folder name, e.g. 'dog6'; token: the identifier put for {0}.
        Returns:
            Prompts such as 'a sks dog in the jungle'.
        Raises:
            ConceptDataError: a token that the subject's concept (``load_concept``) would refuse.
        """
        s = self.subject(subject_name)
        check_concept_words(token, s.class_word)  # not 'a None dog in the jungle', refused only once the images load
        return [t.format(token, s.class_word)
                for t in (self.live_prompts if s.is_live else self.object_prompts)]

    def concept(self, subject_name: str, token: str = "sks", resolution: int = 512) -> Concept:
        """Load one subject's reference images as a `Concept` with its class word.

        Args:
            subject_name: folder name; token: the identifier V*; resolution: crop side.
        Returns:
            The Concept.
        """
        s = self.subject(subject_name)
        return load_concept(s.folder, token, s.class_word, resolution)


_PROMPT_LIST = re.compile(r"prompt_list\s*=\s*\[(.*?)\]", re.DOTALL)
_PROMPT = re.compile(r"""(['"])(.*?)\1\s*\.format""")


def load_dreambooth(root: str | Path) -> DreamBoothDataset:
    """Parse a DreamBooth dataset folder (google/dreambooth layout).

    Args:
        root: folder holding prompts_and_classes.txt and one folder per subject.
    Returns:
        DreamBoothDataset with the subjects present on disk and both prompt lists.
    """
    root = Path(root)
    spec = root / "prompts_and_classes.txt"
    if not spec.is_file():
        raise ConceptDataError(f"'{spec}' not found; point load_dreambooth at the DreamBooth "
                               "dataset folder (the one holding prompts_and_classes.txt).")
    try:
        text = spec.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = f"not UTF-8 text ({e.reason} at byte {e.start})" if isinstance(e, UnicodeDecodeError) else str(e)
        raise ConceptDataError(f"cannot read '{spec}': {reason}; it should be the DreamBooth dataset's own "
                               "prompts_and_classes.txt (UTF-8): restore it from the dataset") from e
    split = re.search(r"^[ \t]*Prompts[ \t]*$", text, re.M)  # the header between the two parts
    head, prompt_part = (text[: split.start()], text[split.end():]) if split else (text, "")
    listed: dict[str, str] = {}
    for line in head.splitlines():
        m = re.fullmatch(r"\s*([\w.-]+)\s*,\s*(\S.*?)\s*", line)
        if m and m.group(1) != "subject_name":
            listed[m.group(1)] = m.group(2)
    lists: dict[str, list[str]] = {}
    for m in _PROMPT_LIST.finditer(prompt_part):
        before = prompt_part[: m.start()]  # the list belongs to the nearest heading above it
        live = before.rfind("Live Subject Prompts") > before.rfind("Object Prompts")
        lists["live" if live else "object"] = [p for _, p in _PROMPT.findall(m.group(1))]
    if not listed or not split or not lists.get("object") or not lists.get("live"):
        raise ConceptDataError(f"cannot parse '{spec}': expected a class table ('name,class' "
                               "lines) then 'Object Prompts' and 'Live Subject Prompts' lists.")
    subjects = {name: DreamBoothSubject(name, cls, root / name, cls in LIVE_CLASSES)
                for name, cls in listed.items() if (root / name).is_dir()}
    if not subjects:
        raise ConceptDataError(f"no subject folders of '{spec}' exist under '{root}'.")
    return DreamBoothDataset(root, subjects, lists["object"], lists["live"], listed)
