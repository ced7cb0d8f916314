"""generate() as a diffusers user calls it: negative prompts, diffusers' own argument names, a caller's generator,
bad numbers, and merged sets (which no mask and no set selection can reach)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prkit
from conftest import randomize

PROMPT = "a photo of a sks dog"
FAST = dict(output_type="np")


def _dog(unet):
    residuals = prkit.add_residuals(unet, name="dog", token="sks", class_word="dog")
    randomize(residuals, seed=1)
    return residuals


def test_one_negative_prompt_serves_every_prompt(pipe):
    prompts = [PROMPT, "a sks dog on the beach"]
    one = prkit.generate(pipe, prompts, None, steps=2, negative_prompt="teapot", **FAST)
    each = prkit.generate(pipe, prompts, None, steps=2, negative_prompt=["teapot", "teapot"], **FAST)
    plain = prkit.generate(pipe, prompts, None, steps=2, **FAST)
    np.testing.assert_array_equal(one, each)
    assert np.abs(one - plain).max() > 1e-4  # the negative prompt was used


def test_a_tuple_of_negative_prompts_works_as_the_list(pipe):
    prompts = (PROMPT, "a sks dog on the beach")  # a tuple of prompts too: generate hands diffusers lists
    as_tuple = prkit.generate(pipe, prompts, None, steps=2, negative_prompt=("teapot", "snow"), **FAST)
    as_list = prkit.generate(pipe, list(prompts), None, steps=2, negative_prompt=["teapot", "snow"], **FAST)
    plain = prkit.generate(pipe, prompts, None, steps=2, **FAST)
    np.testing.assert_array_equal(as_tuple, as_list)
    assert as_tuple.shape == (2, 16, 16, 3) and np.abs(as_tuple - plain).max() > 1e-4  # the negatives were used


def test_diffusers_argument_names_and_a_callers_generator(pipe):
    ours = prkit.generate(pipe, PROMPT, None, steps=2, num_images=2, seed=3, **FAST)
    theirs = prkit.generate(pipe, PROMPT, None, num_inference_steps=2, num_images_per_prompt=2,
                            generator=torch.Generator().manual_seed(3), **FAST)
    np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match=r"num_inference_steps=4 and steps=2 disagree"):
        prkit.generate(pipe, PROMPT, None, steps=2, num_inference_steps=4, **FAST)
    for bad in (dict(steps=0), dict(num_images=0), dict(steps=2.5)):
        with pytest.raises(ValueError, match=r"generate: (steps|num_images) must be a whole number >= 1"):
            prkit.generate(pipe, PROMPT, None, **bad, **FAST)


def test_merged_sets_are_refused_where_they_would_be_wrong(pipe):
    dog = _dog(pipe.unet)
    plain = prkit.generate(pipe, PROMPT, dog, lag=False, steps=2, **FAST)
    dog.merge()
    np.testing.assert_allclose(prkit.generate(pipe, PROMPT, dog, lag=False, steps=2, **FAST), plain, atol=2e-3)
    with pytest.raises(ValueError, match=r"\['dog'\] are merged into the base weights, where no mask"):
        prkit.generate(pipe, PROMPT, dog, lag=True, steps=2, **FAST)
    with pytest.raises(ValueError, match=r"\['dog'\] are merged into the base weights, so they would paint"):
        prkit.generate(pipe, PROMPT, None, steps=2, **FAST)
    dog.unmerge()
    base = prkit.generate(pipe, PROMPT, None, steps=2, **FAST)
    assert np.abs(base - plain).max() > 1e-3


def test_a_store_with_graph_replays_is_refused(pipe):
    from prkit.attention import AttentionStore

    with pytest.raises(ValueError, match=r"store= needs Python at every denoising step.*fast=None or fast=False"):
        prkit.generate(pipe, "a photo of a dog", None, steps=2, store=AttentionStore(), fast=True)
    store = AttentionStore()
    prkit.generate(pipe, "a photo of a dog", None, steps=2, store=store, fast=None)
    assert len({step for _, step in store.maps}) == 2  # a map for every step


def test_a_lone_height_or_width_keeps_the_other_side_native(pipe):
    """diffusers resets both sides to the native size when one is missing; generate fills the missing one instead."""
    tall = prkit.generate(pipe, PROMPT, None, steps=1, height=24, **FAST)
    wide = prkit.generate(pipe, PROMPT, None, steps=1, width=24, **FAST)
    assert tall.shape == (1, 24, 16, 3) and wide.shape == (1, 16, 24, 3)
    with pytest.raises(ValueError, match="divisible by 8"):
        prkit.generate(pipe, PROMPT, None, steps=1, height=20, **FAST)


def test_seed_none_gives_new_images_and_a_bad_seed_is_named(pipe):
    first = prkit.generate(pipe, PROMPT, None, steps=1, seed=None, **FAST)
    second = prkit.generate(pipe, PROMPT, None, steps=1, seed=None, **FAST)
    assert np.abs(first - second).max() > 1e-3
    with pytest.raises(ValueError, match="seed must be a whole number"):
        prkit.generate(pipe, PROMPT, None, steps=1, seed="7", **FAST)


def test_sets_given_by_name_are_the_sets_of_that_name(pipe):
    """residuals="dog" was split into letters: without LAG the base model was sampled in its place, with LAG an
    AttributeError; a name now selects the set of that name on pipe.unet, anything else is refused by name."""
    dog = _dog(pipe.unet)
    for lag in (False, True):
        by_handle = prkit.generate(pipe, PROMPT, dog, lag=lag, steps=2, **FAST)
        np.testing.assert_array_equal(prkit.generate(pipe, PROMPT, "dog", lag=lag, steps=2, **FAST), by_handle)
        np.testing.assert_array_equal(prkit.generate(pipe, PROMPT, ["dog"], lag=lag, steps=2, **FAST), by_handle)
    with pytest.raises(KeyError, match=r"no residual set named 'cat' on this UNet; present: \['dog'\]"):
        prkit.generate(pipe, PROMPT, "cat", steps=2, **FAST)
    from prkit.train_config import TrainResult

    result = TrainResult(dog, [], 0.0, 0, True)
    with pytest.raises(ValueError, match=r"generate: residuals= takes .* got TrainResult"):
        prkit.generate(pipe, PROMPT, result, steps=2, **FAST)


def test_a_keyword_neither_generate_nor_the_pipeline_takes_is_refused(pipe):
    """diffusers' pipeline call swallows unknown keywords (its **kwargs), so generate(..., n_images=4), a slip for
    num_images, gave one image without a word; now it is refused before sampling, naming what was meant."""
    with pytest.raises(TypeError, match=r"n_images.*num_images"):
        prkit.generate(pipe, PROMPT, None, steps=2, n_images=4, **FAST)
    with pytest.raises(TypeError, match="guidance"):
        prkit.generate(pipe, PROMPT, None, steps=2, guidance=3.0, **FAST)
    images = prkit.generate(pipe, PROMPT, None, steps=2, num_images_per_prompt=2, eta=0.0, **FAST)  # the pipeline's
    assert len(images) == 2


def test_steps_and_image_counts_given_as_numpy_integers_are_those_numbers(pipe):
    """steps=np.int64(2) (a sweep over np.arange, a pandas column) was refused as 'got np.int64(2)', though seed
    takes numpy integers; so were num_images and num_images_per_prompt."""
    ours = prkit.generate(pipe, PROMPT, None, steps=2, num_images=2, seed=3, **FAST)
    for kwargs in (dict(steps=np.int64(2), num_images=np.int32(2)), dict(steps=2, num_images_per_prompt=np.int64(2)),
                   dict(num_inference_steps=np.int64(2), num_images=2)):
        np.testing.assert_array_equal(prkit.generate(pipe, PROMPT, None, seed=3, **kwargs, **FAST), ours)
    with pytest.raises(ValueError, match=r"generate: steps must be a whole number >= 1, got np.float64\(2.0\)"):
        prkit.generate(pipe, PROMPT, None, steps=np.float64(2), **FAST)


@pytest.mark.parametrize("lag", [False, True], ids=["plain", "lag"])
def test_return_dict_false_still_gives_the_images(pipe, lag):
    """return_dict=False (the pipeline then returns a tuple) failed after the whole sampling with "'tuple' object has
    no attribute 'images'"; generate returns the images either way."""
    dog = _dog(pipe.unet)
    wanted = prkit.generate(pipe, PROMPT, dog, lag=lag, steps=2, **FAST)
    np.testing.assert_array_equal(prkit.generate(pipe, PROMPT, dog, lag=lag, steps=2, return_dict=False, **FAST),
                                  wanted)


def test_a_negative_prompt_for_a_pipeline_that_has_none_is_refused(pipe):
    """An LCM pipeline's call has no negative_prompt and drops it with its **kwargs: generate(lcm, ...,
    negative_prompt="blurry") sampled as if it had not been given."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    lcm = LatentConsistencyModelPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        unet=UNet2DConditionModel(**{**config, "time_cond_proj_dim": 32}).eval(),
        scheduler=LCMScheduler.from_config(pipe.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    lcm.set_progress_bar_config(disable=True)
    with pytest.raises(TypeError, match=r"LatentConsistencyModelPipeline's call takes no negative_prompt"):
        prkit.generate(lcm, PROMPT, None, steps=2, negative_prompt="snow", **FAST)
    assert prkit.generate(lcm, PROMPT, None, steps=2, **FAST).shape == (1, 16, 16, 3)


@pytest.mark.parametrize("lag", [False, True], ids=["plain", "lag"])
def test_tensors_handed_out_are_ordinary_tensors_as_the_pipelines_own(pipe, lag):
    """generate ran the pipeline under torch.inference_mode (diffusers' own call: no_grad), so its output_type='pt'
    images and the latents a step callback kept were inference tensors: an in-place clamp_ failed with "Inplace
    update to inference tensor outside InferenceMode", and using them where autograd records (a training step on
    generated images) with "Inference tensors cannot be saved for backward"."""
    dog = _dog(pipe.unet)
    kept = []

    def keep(p, i, t, kwargs):
        kept.append(kwargs["latents"])
        return kwargs

    images = prkit.generate(pipe, PROMPT, dog, lag=lag, steps=2, output_type="pt", callback_on_step_end=keep)
    theirs = pipe(PROMPT, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert not theirs.is_inference()  # diffusers' own call hands out ordinary tensors
    assert not images.is_inference() and not any(latents.is_inference() for latents in kept) and len(kept) == 2
    assert images.shape == (1, 3, 16, 16)
    clamped = images.clone()
    images.clamp_(0.25, 0.75)  # in place, as on the pipeline's own output
    torch.testing.assert_close(images, clamped.clamp(0.25, 0.75))
    weight = torch.nn.Parameter(torch.ones(()))
    (images * weight).sum().backward()  # recorded by autograd, as in a training step
    torch.testing.assert_close(weight.grad, images.sum())


@pytest.mark.parametrize("kwargs, named", [({"lag": "False"}, r"generate: lag must be True or False, got 'False'"),
                                           ({"lag": 0}, r"generate: lag must be True or False, got 0"),
                                           ({"fast": "no"}, r"generate: fast must be True or False or None")])
def test_flags_that_are_no_bools_are_named(pipe, kwargs, named):
    """lag='False' (a string from a config file or papermill's -r) is truthy: generate sampled with LAG, the
    opposite of what was written, without a word."""
    dog = _dog(pipe.unet)
    with pytest.raises(ValueError, match=named):
        prkit.generate(pipe, PROMPT, dog, steps=2, **kwargs, **FAST)
    assert prkit.generate(pipe, PROMPT, dog, lag=False, fast=None, steps=2, **FAST).shape == (1, 16, 16, 3)
