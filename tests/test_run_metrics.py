"""CLIP-I / CLIP-T / DINO of one run's residuals on a model the world's oracle does not know (notebook 06's path for
a real model's concept)."""

from __future__ import annotations

import math

import pytest

from conftest import make_concept, randomize

import prkit
from prkit.run_metrics import METHODS, score_residuals, scores_table
from tiny import tiny_clip, tiny_pipeline, tiny_vit


def test_a_runs_residuals_are_scored_per_method_against_its_photos(tmp_path):
    pipe = tiny_pipeline(tmp_path / "pipe")
    residuals = prkit.add_residuals(pipe.unet, token="sks", class_word="dog")
    randomize(residuals)
    concept = make_concept()
    rows, unavailable = score_residuals(pipe, residuals, concept, prompts=("a photo of a {}", "a {} on the beach"),
                                        images_per_prompt=2, steps=2, clip=str(tiny_clip(tmp_path / "clip")),
                                        dino=str(tiny_vit(tmp_path / "dino")), train_seconds=3.0)
    assert unavailable == {}
    assert [r["method"] for r in rows] == [m for m in METHODS for _ in range(4)]
    assert {r["prompt"] for r in rows} == {"a photo of a sks dog", "a sks dog on the beach"}
    for r in rows:
        assert all(math.isfinite(r[m]) for m in ("clip_i", "clip_t_dreambooth", "dino"))
    by = {m: [r["clip_i"] for r in rows if r["method"] == m] for m in METHODS}
    assert by["base"] != by["residuals"]  # the residuals change the images they score
    summary, table = scores_table(rows, unavailable)
    assert [s["method"] for s in summary] == ["base", "residuals", "residuals+lag"]
    assert summary[1]["parameters"] == residuals.num_parameters() and "CLIP-I" in table and "DINO" in table


def test_without_any_backbone_it_says_why_and_samples_nothing(tmp_path, monkeypatch):
    import prkit.sample

    pipe = tiny_pipeline(tmp_path / "pipe")
    residuals = prkit.add_residuals(pipe.unet, token="sks", class_word="dog")
    monkeypatch.setattr(prkit.sample, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    rows, unavailable = score_residuals(pipe, residuals, make_concept(), clip=str(tmp_path / "no_clip"), dino=None)
    assert rows == [] and "there is no folder" in unavailable["CLIP-I/CLIP-T"]
    assert unavailable["DINO"] == "switched off"
    assert "unavailable" in scores_table(rows, unavailable)[1]


def test_one_prompt_template_is_one_prompt_and_a_template_without_braces_is_refused(tmp_path, monkeypatch):
    """prompts="a {} on the beach" scored one prompt per letter ('a', ' ', 'sks dog', ...); a template without {}
    made the base images, then LAG refused the prompt without the token."""
    import prkit.sample

    pipe = tiny_pipeline(tmp_path / "pipe")
    residuals = prkit.add_residuals(pipe.unet, token="sks", class_word="dog")
    clip = str(tiny_clip(tmp_path / "clip"))
    rows, _ = score_residuals(pipe, residuals, make_concept(), prompts="a {} on the beach", images_per_prompt=1,
                              steps=1, clip=clip, dino=None)
    assert [r["prompt"] for r in rows] == ["a sks dog on the beach"] * len(METHODS)
    monkeypatch.setattr(prkit.sample, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    for prompts, match in [(("a {}", "a dog in the snow"), r"templates with \{\} where 'sks dog' goes .*got 'a dog "
                                                          r"in the snow'"), ((), "prompts is empty")]:
        with pytest.raises(ValueError, match=match):
            score_residuals(pipe, residuals, make_concept(), prompts=prompts, clip=clip, dino=None)
