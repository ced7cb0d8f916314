"""What notebook parameters meet before anything runs: the ablation sweeps (05), a shipped concept's name (01)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("bad,match", [
    (dict(ranks="[0.05]"),
     r"AblationConfig\.ranks must be a non-empty list, got '\[0\.05\]' \(papermill: -y 'ranks: \[a, b\]'"),
    (dict(ranks=()), r"AblationConfig\.ranks must be a non-empty list"),
    (dict(ranks=(0.05, 1.0)), r"AblationConfig\.ranks\[1\]: rank 1\.0 is neither a fraction"),
    (dict(targets=("residuals", "bogus")), r"AblationConfig\.targets: \['bogus'\] unknown; use some of residuals"),
    (dict(thresholds=("median", "bogus")), r"AblationConfig\.thresholds: \['bogus'\] unknown; use some of median"),
    (dict(concept="bogus"), r"AblationConfig\.concept 'bogus' is not an example concept; use one of striped_ball"),
    (dict(step_counts=(30, 0)), r"AblationConfig\.step_counts\[1\] must be a whole number >= 1, got 0"),
    (dict(steps="60"), r"AblationConfig\.steps must be a whole number >= 1, got '60'"),
    (dict(images_per_prompt=0), r"AblationConfig\.images_per_prompt must be a whole number >= 1, got 0"),
    (dict(sample_steps="20"), r"AblationConfig\.sample_steps must be a whole number >= 1, got '20'"),
    (dict(seed="1"), r"TrainConfig\.seed must be a whole number")])
def test_an_ablation_sweep_is_checked_before_anything_trains(bad, match):
    from prkit.world import ablate

    with pytest.raises(ValueError, match=match):
        ablate.AblationConfig(**bad)
    assert ablate.AblationConfig(ranks=[0.05, 4], thresholds=[]).ranks == (0.05, 4)  # lists become tuples


def test_an_unknown_shipped_concept_name_lists_the_shipped_ones():
    from prkit.world.concepts import EXAMPLE_CONCEPTS, concept_folder

    with pytest.raises(ValueError, match=r"'bogus' is not a shipped world concept; these are: striped_ball, .*own"):
        concept_folder("bogus")
    assert all((concept_folder(name) / "concept.json").is_file() for name in EXAMPLE_CONCEPTS)


def test_05_says_what_its_identity_counts():
    """05's header said identity was 'the concept's pattern and colours read back'; the ablations count the pattern
    alone (prkit.world.bench.identity(...)[0]), as prkit/world/ablate.py's docstring says."""
    import inspect
    import json
    from pathlib import Path

    from prkit.world import ablate

    book = Path(__file__).resolve().parent.parent / "notebooks" / "05_ablations.ipynb"
    header = "".join(json.loads(book.read_text())["cells"][0]["source"])
    assert "identity(r, concept, m)[0]" in inspect.getsource(ablate.score)  # (pattern, pattern + colours)[0]
    assert "pattern and colours" not in header and "pattern read on an object, its colours not checked" in header
