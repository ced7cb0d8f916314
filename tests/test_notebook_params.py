"""Notebook parameter checks: a list parameter given as one string (papermill's -p) is refused with the list syntax."""

from __future__ import annotations

import pytest

from prkit.notebook_params import as_list


def test_as_list_takes_lists_and_tuples():
    assert as_list(["a", "b"], "prompts") == ["a", "b"]
    assert as_list(("a",), "prompts") == ["a"]
    assert as_list([], "prompts") == []


@pytest.mark.parametrize("value", ["a photo of a {token} {class_word} in the snow", b"ab", 3, None])
def test_as_list_refuses_a_string_and_names_the_parameter(value):
    with pytest.raises(TypeError) as err:
        as_list(value, "prompts")
    said = str(err.value)
    assert said.startswith("parameter prompts must be a list") and repr(value) in said
    assert """-y 'prompts: ["first", "second"]'""" in said  # the papermill syntax that gives a list


def test_04_checks_its_list_and_second_concept_before_sampling():
    """04 split a prompts string into characters (or failed formatting it), and met an unknown second_concept only
    after all the sampling."""
    import json
    from pathlib import Path

    book = Path(__file__).resolve().parent.parent / "notebooks" / "04_lag_sampling.ipynb"
    cells = ["".join(c["source"]) for c in json.loads(book.read_text())["cells"] if c["cell_type"] == "code"]
    first_sampling = next(i for i, c in enumerate(cells) if "prkit.generate(" in c)
    before = "\n".join(cells[:first_sampling]) + cells[first_sampling].split("prkit.generate(")[0]
    assert 'as_list(prompts, "prompts")' in before and "another_concept(second_concept" in before


def test_04_checks_its_composed_prompt_before_sampling():
    """A typo in 04's composed_prompt ('{token_2}') or a prompt without {token2} failed only in its last cells, after
    the three sample sets and the second concept's training: KeyError 'token_2', or LAG's missing identifier."""
    import json
    from pathlib import Path

    from prkit.world.concepts import composed_text

    book = Path(__file__).resolve().parent.parent / "notebooks" / "04_lag_sampling.ipynb"
    cells = ["".join(c["source"]) for c in json.loads(book.read_text())["cells"] if c["cell_type"] == "code"]
    first_sampling = next(i for i, c in enumerate(cells) if "prkit.generate(" in c)
    before = "\n".join(cells[:first_sampling]) + cells[first_sampling].split("prkit.generate(")[0]
    assert "composed_text(composed_prompt, " in before and "composed_prompt.format" not in "\n".join(cells)
    default = "a {token} {class_word} next to a {token2} {class_word2} on the grass"
    assert composed_text(default, "sks", "dog", "dotted_box") == "a sks dog next to a zwx box on the grass"
    for template, said in (("a {token} next to a {token_2} {class_word2}", "names {token_2}, which is none of "
                                                                           "{token}, {class_word}, {token2}"),
                           ("a {token} {class_word} next to a box", "lacks {token2} (each residual set acts"),
                           ("a {token {token2}", "is no prompt template"), (["a {token}"], "is no prompt template")):
        with pytest.raises(ValueError) as err:
            composed_text(template, "sks", "dog", "dotted_box")
        assert str(err.value).startswith(f"composed_prompt {template!r} ") and said in str(err.value)


def test_02_checks_its_validation_prompts_list():
    import json
    from pathlib import Path

    book = Path(__file__).resolve().parent.parent / "notebooks" / "02_train_residuals.ipynb"
    code = "\n".join("".join(c["source"]) for c in json.loads(book.read_text())["cells"] if c["cell_type"] == "code")
    assert 'as_list(validation_prompts, "validation_prompts")' in code and "tuple(validation_prompts)" not in code


@pytest.mark.parametrize("name", ["resume", "flip", "gradient_checkpointing"])
@pytest.mark.parametrize("value", ["false", "False", 0, None])
def test_train_config_refuses_a_switch_that_is_no_bool(name, value):
    """02's resume from `-p resume false` (the report and papermill both hand over the string 'false') is truthy: the
    run resumed the checkpoint it was told to start over from."""
    import prkit

    with pytest.raises(ValueError) as err:
        prkit.TrainConfig(**{name: value})
    said = str(err.value)
    assert said.startswith(f"TrainConfig.{name} must be True or False, got {value!r}")
    assert prkit.TrainConfig(resume=False, flip=False, gradient_checkpointing=True).resume is False


@pytest.mark.parametrize("given,expected", [
    ({}, (50, ("a photo of a {token} {class_word}", "a photo of a {token} {class_word} on the grass"))),
    ({"validate_every": 0}, (0, ())),
    ({"validation_prompts": []}, (0, ())),
])
def test_02_switches_validation_off_with_either_parameter_without_a_warning(given, expected):
    """02 switched validation off by validate_every=0 alone, its prompts still given: the warning train_residuals
    gives for one of the two without the other would show on every such run. Either parameter switches it off."""
    import json
    import warnings
    from pathlib import Path
    from types import SimpleNamespace

    from prkit.train_config import TrainConfig, _check_validation

    book = Path(__file__).resolve().parent.parent / "notebooks" / "02_train_residuals.ipynb"
    cells = [c for c in json.loads(book.read_text())["cells"] if c["cell_type"] == "code"]
    parameters = next("".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", []))
    training = next("".join(c["source"]) for c in cells if "prkit.TrainConfig(" in "".join(c["source"]))

    class Trained(Exception):
        pass

    def train_residuals(pipe, concept, config):
        made.append(config)
        raise Trained

    made = []
    stub = SimpleNamespace(load_pipeline=lambda *a, **k: None, load_concept=lambda *a, **k: None,
                           native_resolution=lambda pipe: 64, TrainConfig=TrainConfig, train_residuals=train_residuals)
    space = {}
    exec(parameters, space)
    space.update(given, prkit=stub, run_file=lambda *a: None, Path=Path, as_list=as_list)
    with pytest.raises(Trained):
        exec(training, space)
    assert (made[0].validate_every, made[0].validation_prompts) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_validation(made[0])  # what train_residuals checks first
