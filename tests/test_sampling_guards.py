"""Sampling refuses what it would silently get wrong, and the attention store keeps what a run really saw: sets
that are not on the pipeline's UNet, processors capture cannot replace (IP-Adapter), a store reused across calls,
and grids whose size the UNet's downsampling rounds up or whose aspect is not square."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prkit
from conftest import TEXT_DIM, TOKENS, blocks_from_two_threads, make_pipe, randomize, run_unet
from prkit.attention import AttentionStore, capture_attention
from prkit.lag import lag_sampling
from prkit.residuals import find_projections, wrapped_layers

PROMPT = "a photo of a sks dog"
FAST = dict(steps=2, output_type="np")


def _dog(unet, seed: int = 1, token: str = "sks", class_word: str = "dog"):
    residuals = prkit.add_residuals(unet, name="dog", token=token, class_word=class_word)
    randomize(residuals, seed=seed)
    return residuals


# --- residual sets must live on the pipeline's own UNet -------------------------------------------


def test_a_removed_set_is_refused_not_sampled_as_the_base_model(pipe):
    dog = _dog(pipe.unet)
    base = prkit.generate(pipe, PROMPT, None, **FAST)
    assert np.abs(prkit.generate(pipe, PROMPT, dog, lag=False, **FAST) - base).max() > 1e-3
    prkit.remove_residuals(pipe.unet, "dog")
    for lag in (False, True):
        with pytest.raises(ValueError, match=r"'dog' is no longer on this UNet.*load_residuals\(pipe, path\)"):
            prkit.generate(pipe, PROMPT, dog, lag=lag, **FAST)
    with pytest.raises(ValueError, match="'dog' is no longer on this UNet"):
        with prkit.only_residuals(pipe.unet, [dog]):
            pass
    np.testing.assert_array_equal(prkit.generate(pipe, PROMPT, None, **FAST), base)  # nothing left switched


def test_a_set_on_another_unet_is_refused_even_under_a_name_this_unet_has(tmp_path):
    pipe, other = make_pipe(tmp_path / "a"), make_pipe(tmp_path / "b")
    foreign = _dog(other.unet)
    for lag in (False, True):
        with pytest.raises(ValueError, match=r"'dog' lives on another UNet.*load it onto this pipeline's UNet"):
            prkit.generate(pipe, PROMPT, foreign, lag=lag, **FAST)
    own = _dog(pipe.unet, seed=7, token="zwx", class_word="teapot")  # this UNet's own set called 'dog'
    with pytest.raises(ValueError, match=r"'dog' lives on another UNet.*on this UNet is a different one"):
        prkit.generate(pipe, PROMPT, foreign, lag=True, **FAST)
    with pytest.raises(ValueError, match="'dog' lives on another UNet"):
        with lag_sampling(pipe, foreign, PROMPT):  # checked against the UNet it installs on
            pass
    assert all(not hasattr(p, "mask_source") or p.mask_source is None for p in find_projections(pipe.unet).values())
    # the sets that do live here sample as before; any handle on them will do
    prompt = "a photo of a zwx teapot"
    base = prkit.generate(pipe, prompt, None, **FAST)
    mine = prkit.generate(pipe, prompt, own, lag=True, **FAST)
    np.testing.assert_array_equal(prkit.generate(pipe, prompt, prkit.get_residuals(pipe.unet, "dog"), lag=True,
                                                 **FAST), mine)
    assert np.abs(mine - base).max() > 1e-3


# --- IP-Adapter: refused up front, not a TypeError deep inside --------------------------------------


def _ip_adapter(unet) -> None:
    """IP-Adapter processors (random weights) and image projection, built as diffusers' loader builds them."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    torch.manual_seed(0)
    procs = {}
    for key in unet.attn_processors:
        attn = unet.get_submodule(key.rsplit(".", 1)[0])
        procs[key] = AttnProcessor2_0() if key.endswith("attn1.processor") else IPAdapterAttnProcessor2_0(
            hidden_size=attn.to_k.out_features, cross_attention_dim=TEXT_DIM, scale=1.0, num_tokens=(4,))
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=16, cross_attention_dim=TEXT_DIM, num_image_text_embeds=4)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def test_ip_adapter_is_refused_up_front_by_lag_and_the_store(pipe):
    dog = _dog(pipe.unet)
    _ip_adapter(pipe.unet)
    before = pipe.unet.attn_processors
    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(0))]  # [uncond; cond] image embeds
    plain = prkit.generate(pipe, PROMPT, dog, lag=False, ip_adapter_image_embeds=embeds, **FAST)
    assert plain.shape == (1, 16, 16, 3) and np.isfinite(plain).all()
    expected = r"IPAdapterAttnProcessor2_0, a processor prkit cannot replace.*IP-Adapter.*lag=False and no store"
    with pytest.raises(ValueError, match=expected):
        prkit.generate(pipe, PROMPT, dog, lag=True, ip_adapter_image_embeds=embeds, **FAST)
    store = AttentionStore()
    with pytest.raises(ValueError, match=expected):
        prkit.generate(pipe, PROMPT, None, store=store, ip_adapter_image_embeds=embeds, **FAST)
    with pytest.raises(ValueError, match=expected):
        with capture_attention(pipe.unet):
            pass
    after = pipe.unet.attn_processors
    assert all(after[k] is v for k, v in before.items()) and getattr(pipe.unet, "_prkit_capture", None) is None
    np.testing.assert_array_equal(prkit.generate(pipe, PROMPT, dog, lag=False, ip_adapter_image_embeds=embeds,
                                                 **FAST), plain)


# --- one store, one run ----------------------------------------------------------------------------


@pytest.mark.parametrize("lag", [True, False])
def test_a_reused_store_holds_only_its_latest_run(pipe, lag):
    dog = _dog(pipe.unet)
    first, second = dict(prompt=PROMPT, seed=0), dict(prompt=["sks dog on the beach", "a sks dog"], seed=1)
    alone = AttentionStore()
    prkit.generate(pipe, residuals=dog, lag=lag, store=alone, **second, **FAST)
    shared = AttentionStore()
    prkit.generate(pipe, residuals=dog, lag=lag, store=shared, **first, **FAST)
    one_image = shared.maps[("down_blocks.0.attentions.0", 0)]
    prkit.generate(pipe, residuals=dog, lag=lag, store=shared, **second, **FAST)
    assert one_image.shape[0] == 1 and set(shared.maps) == set(alone.maps) and len(alone.maps) == 7 * 2
    for key, maps in alone.maps.items():
        assert maps.shape[0] == 2 and torch.equal(shared.maps[key], maps)  # not the mean with the first run
        assert shared.layers[key] == 1
    assert set(shared.masks) == set(alone.masks) and (len(alone.masks) == 7 * 2 if lag else not alone.masks)
    assert all(torch.equal(shared.masks[k], m) for k, m in alone.masks.items())


# --- the store's grids: the UNet's own (h, w), aspect kept -----------------------------------------


def _levels(h: int, w: int, count: int) -> list[tuple[int, int]]:
    """Grids of a UNet whose Downsample2D (3x3 conv, stride 2, padding 1) maps n -> ceil(n / 2)."""
    out = [(h, w)]
    for _ in range(count - 1):
        out.append((math.ceil(out[-1][0] / 2), math.ceil(out[-1][1] / 2)))
    return out


def _block_grids(unet) -> dict:
    """block -> the (h, w) its transformer block really gets, recorded by hooks of the test's own."""
    seen = {}
    for block in find_projections(unet):
        unet.get_submodule(block).register_forward_pre_hook(
            lambda m, args, b=block: seen.__setitem__(b, tuple(args[0].shape[-2:])))
    return seen


def test_store_grids_follow_the_unets_rounding_on_a_bare_unet(unet, tokenizer):
    """A 12x5 latent has a 6x3 level (18 tokens), which the old square-root guess read as 7x2 and crashed on."""
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 12, 5, generator=gen), torch.tensor(500), torch.randn(2, TOKENS, TEXT_DIM,
                                                                                          generator=gen))
    grids = _block_grids(unet)
    store = AttentionStore(max_resolution=64)  # native size
    with capture_attention(unet, store=store):
        run_unet(unet, inputs)
    assert set(grids.values()) == set(_levels(12, 5, 2)) == {(12, 5), (6, 3)}
    assert len(store.blocks()) == 7
    for block in store.blocks():
        maps = store.maps[(block, 0)]
        assert maps.shape == (2, TOKENS, *grids[block]), block
        torch.testing.assert_close(maps.sum(1), torch.ones(2, *grids[block]), atol=1e-4, rtol=0)  # softmax mass
    dog = _dog(unet)
    lag_store = AttentionStore(max_resolution=64)
    with lag_sampling(unet, dog, [PROMPT] * 2, tokenizer=tokenizer, cfg=False, store=lag_store):
        run_unet(unet, inputs)
    for (block, _), masks in lag_store.masks.items():
        assert masks.shape == (2, *grids[block], 1)
        assert set(masks.unique().tolist()) == {0.0, 1.0}  # median cut at native size: binary
        assert masks.flatten(1).mean(1).tolist() == [(grids[block][0] * grids[block][1]) // 2
                                                     / (grids[block][0] * grids[block][1])] * 2


@pytest.mark.parametrize("lag", [False, True])
def test_world_pipeline_store_at_96x40(lag):
    """The world UNet (3 levels) at 96x40: 24x10 latents, then 12x5 and 6x3 (ceil), stored without a crash."""
    pipe = prkit.load_pipeline("world", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    dog = prkit.add_residuals(pipe.unet, name="ball", token="sks", class_word="ball") if lag else None
    grids = _block_grids(pipe.unet)
    store = AttentionStore(max_resolution=32)
    images = prkit.generate(pipe, "a photo of a sks ball", dog, lag=lag, steps=1, height=96, width=40,
                            output_type="np", store=store)
    assert images.shape == (1, 96, 40, 3)
    assert set(grids.values()) == set(_levels(24, 10, 3)) == {(24, 10), (12, 5), (6, 3)}
    assert {b: tuple(m.shape[-2:]) for (b, _), m in store.maps.items()} == grids
    assert {b: tuple(m.shape[1:3]) for (b, _), m in store.masks.items()} == (grids if lag else {})
    capped = AttentionStore()  # max_resolution 16: 24x10 -> 16x7, the smaller grids as they are
    prkit.generate(pipe, "a photo of a sks ball", dog, lag=lag, steps=1, height=96, width=40, output_type="np",
                   store=capped)
    assert {tuple(m.shape[-2:]) for m in capped.maps.values()} == {(16, 7), (12, 5), (6, 3)}
    torch.testing.assert_close(capped.maps[("down_blocks.0.attentions.0", 0)],
                               F.adaptive_avg_pool2d(store.maps[("down_blocks.0.attentions.0", 0)], (16, 7)))


def test_non_square_maps_and_masks_keep_their_aspect(pipe):
    """16x64 images (8x32 latents) under a cap of 8: maps and masks both 2x8, the area average of the native grid."""
    dog = _dog(pipe.unet)
    native, capped = AttentionStore(max_resolution=64), AttentionStore(max_resolution=8)
    for store in (native, capped):
        prkit.generate(pipe, PROMPT, dog, lag=True, height=16, width=64, store=store, **FAST)
    assert {tuple(m.shape[-2:]) for m in native.maps.values()} == {(8, 32), (4, 16)}
    for key, maps in capped.maps.items():
        assert maps.shape == (1, TOKENS, 2, 8), key
        torch.testing.assert_close(maps, F.adaptive_avg_pool2d(native.maps[key], (2, 8)))
        masks, full = capped.masks[key], native.masks[key]  # (B, h, w, S)
        assert masks.shape == (1, 2, 8, 1) and set(full.unique().tolist()) == {0.0, 1.0}
        torch.testing.assert_close(masks, F.adaptive_avg_pool2d(full.permute(0, 3, 1, 2), (2, 8)).permute(0, 2, 3, 1))
    assert capped.aggregate().shape == (1, TOKENS, 2, 8)  # the long side at max_resolution, aspect kept
    assert capped.aggregate(size=16).shape == (1, TOKENS, 4, 16)
    assert capped.aggregate(size=(16, 64)).shape == (1, TOKENS, 16, 64)  # an image's own (h, w)


# --- LAG follows the call that really runs ---------------------------------------------------------


def test_lag_refuses_a_pipeline_call_with_other_prompts_than_its_masks(pipe):
    """The masks are made from lag_sampling's prompts; a call encoding other text used them on the wrong tokens
    (the identifier at other positions) without a word."""
    dog = _dog(pipe.unet)
    with lag_sampling(pipe, dog, PROMPT):
        with pytest.raises(ValueError, match=r"encoding prompt=\['a sks dog on the beach'\].*made for \['a photo"):
            pipe("a sks dog on the beach", num_inference_steps=2, output_type="np")
    with lag_sampling(pipe, dog, [PROMPT]):
        with pytest.raises(ValueError, match="LAG's masks were made for"):
            pipe([PROMPT, "a sks dog"], num_inference_steps=2, output_type="np")
    with lag_sampling(pipe, dog, [PROMPT, PROMPT]):  # the same rows: repeated prompts or num_images_per_prompt
        pipe(PROMPT, num_images_per_prompt=2, num_inference_steps=2, output_type="np")
    with lag_sampling(pipe, dog, PROMPT):  # the same text, as a string or a list, passes
        pipe([PROMPT, PROMPT], num_inference_steps=2, output_type="np")
        want = pipe([PROMPT], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert "encode_prompt" not in pipe.__dict__  # the watch is gone with the block
    np.testing.assert_allclose(prkit.generate(pipe, PROMPT, dog, lag=True, **FAST), want.images, atol=1e-6)


def test_lag_refuses_a_unet_call_from_another_pipeline_object(pipe):
    """A pipeline built from the same components runs with its own guidance flag; read from a pipeline given to
    lag_sampling that was never called in the block, it split the batch wrongly; read after a call of that pipeline
    in the block, it was that call's stale flag. (A stale flag whose batch happens to fit is a known limit.)"""
    from diffusers import StableDiffusionImg2ImgPipeline

    dog = _dog(pipe.unet)
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    call = dict(image=image, strength=0.75, num_inference_steps=4, output_type="np")
    with lag_sampling(pipe, dog, PROMPT):
        with pytest.raises(RuntimeError, match=r"the UNet ran without pipe encoding a prompt.*Give lag_sampling the"):
            i2i(PROMPT, **call)
    with lag_sampling(pipe, dog, PROMPT):
        pipe(PROMPT, num_inference_steps=2, output_type="np")  # with guidance: pipe's flag stays True after it
        with pytest.raises(RuntimeError, match=r"batch of 1 rows, but pipe's last call encoded 1 prompt rows with "
                                               r"classifier-free guidance \(2 rows\)"):
            i2i(PROMPT, guidance_scale=1.0, **call)  # without guidance: one row per image
    with lag_sampling(i2i, dog, PROMPT):
        got = i2i(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    np.testing.assert_allclose(got, prkit.generate(i2i, PROMPT, dog, lag=True, seed=0, **{**call, "steps": 4,
                                                                                        "num_inference_steps": 4}),
                               atol=1e-6)
    with lag_sampling(pipe, dog, PROMPT, cfg=True):  # told explicitly, it needs no pipeline's word
        i2i(PROMPT, **call)


def test_generate_takes_text_prompts_and_says_what_to_do_with_embeddings(pipe):
    dog = _dog(pipe.unet)
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    for lag in (False, True):
        with pytest.raises(ValueError, match=r"not prompt_embeds=.*prkit.lag_sampling\(pipe, sets, prompts\)"):
            prkit.generate(pipe, None, dog, lag=lag, prompt_embeds=embeds, **FAST)
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list of strings, got None"):
        prkit.generate(pipe, None, dog, **FAST)
    with pytest.raises(ValueError, match="got \\[\\]"):
        prkit.generate(pipe, [], dog, **FAST)


def test_half_precision_masks_keep_the_median_split(pipe):
    """On the CPU path the maps came from probabilities rounded to the model's half precision; ties at the median
    dropped positions from the masks (0.44 of the grid instead of half in some blocks, and fp16 LAG images far from
    fp32 ones). The median mask splits every block's grid in half."""
    dog = _dog(pipe.unet)
    pipe.to(torch.float16)
    store = AttentionStore()
    prkit.generate(pipe, PROMPT, dog, lag=True, store=store, num_images=2, **FAST)
    assert len(store.masks) == 2 * len(find_projections(pipe.unet))  # every block, both steps
    for key, mask in store.masks.items():
        assert mask.flatten(1, 2).mean(1).eq(0.5).all(), (key, mask.flatten(1, 2).mean(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_masks_under_a_callers_autocast_keep_the_median_split(pipe, dtype):
    """Under torch.autocast around the call (as diffusers' older docs sampled), autocast ran the capture's float32
    scores and its map reduction in half precision again: ties at the median dropped positions from the masks
    (0.4375 of a grid instead of half, in 10 of 14 blocks under bf16)."""
    dog = _dog(pipe.unet)
    store = AttentionStore()
    with torch.autocast("cpu", dtype=dtype):
        prkit.generate(pipe, PROMPT, dog, lag=True, store=store, num_images=2, **FAST)
    assert len(store.masks) == 2 * len(find_projections(pipe.unet))  # every block, both steps
    for key, mask in store.masks.items():
        assert mask.flatten(1, 2).mean(1).eq(0.5).all(), (key, mask.flatten(1, 2).mean(1))


def test_lag_on_a_compiled_unet_samples_as_eager(pipe):
    """torch.compile(pipe.unet) and LAG: reading the pipeline's guidance flag inside dynamo's trace of the attention
    processors crashed ("already tracked for mutation"); the flag is read once per forward, outside the trace."""
    dog = _dog(pipe.unet)
    want = {lag: prkit.generate(pipe, PROMPT, dog, lag=lag, **FAST) for lag in (False, True)}
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    try:
        for lag in (False, True):
            np.testing.assert_allclose(prkit.generate(pipe, PROMPT, dog, lag=lag, **FAST), want[lag], atol=1e-6)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("kwargs, named", [({"lag_config": "median"}, "lag_config must be a prkit.LAGConfig"),
                                           ({"lag_config": {"threshold": "otsu"}}, "lag_config must be"),
                                           ({"store": True}, "store must be a prkit.AttentionStore"),
                                           ({"store": True, "lag": False}, "store must be a prkit.AttentionStore")])
def test_sampling_arguments_of_the_wrong_type_are_named(pipe, kwargs, named):
    """lag_config='median' failed with "'str' object has no attribute 'include_class'" and store=True with
    "'bool' object has no attribute 'clear'"; both are now refused naming the argument, the UNet untouched."""
    residuals = prkit.add_residuals(pipe.unet, token="sks", class_word="dog", seed=0)
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(TypeError, match=named):
        prkit.generate(pipe, "a photo of a sks dog", residuals, steps=2, **kwargs)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(TypeError, match="store must be"):
        with capture_attention(pipe.unet, store=[]):
            pass
    with pytest.raises(TypeError, match="config must be a prkit.LAGConfig"):
        with lag_sampling(pipe, residuals, "a photo of a sks dog", config="median"):
            pass


# --- two threads sampling one pipeline --------------------------------------------------------------


@pytest.mark.parametrize("lag", [False, True], ids=["plain", "lag"])
def test_generate_calls_from_two_threads_each_sample_their_own_sets_and_leave_them_as_they_were(pipe, lag):
    """A second thread's generate, started while the first one samples (here: from the first call's step
    callback), waits for it. It ran inside the first call: it switched the UNet's sets under it and put back the
    first call's selection as 'the state before' (the pipeline's other sets stayed off for good), or with LAG
    failed with 'attention capture is already installed'."""
    import threading

    dog = _dog(pipe.unet)
    cat = prkit.add_residuals(pipe.unet, name="cat", token="zwx", class_word="cat")
    randomize(cat, seed=2)
    other = "a photo of a zwx cat"
    wanted = {"a": prkit.generate(pipe, PROMPT, dog, lag=lag, **FAST),
              "b": prkit.generate(pipe, other, cat, lag=lag, **FAST)}
    before = {b: dict(layer.active) for b, layer in wrapped_layers(pipe.unet).items()}
    got, errors = {}, []
    inside, first_done = threading.Event(), threading.Event()

    def in_second(pipeline, step, timestep, kwargs):
        inside.set()
        first_done.wait(timeout=60)  # before the fix: the first call runs its steps meanwhile, under these sets
        return kwargs

    def second():
        try:
            got["b"] = prkit.generate(pipe, other, cat, lag=lag, callback_on_step_end=in_second, **FAST)
        except Exception as err:  # noqa: BLE001 - shown in the assertion
            errors.append(err)

    thread = threading.Thread(target=second)

    def start_second(pipeline, step, timestep, kwargs):
        if step == 0:
            thread.start()
            inside.wait(timeout=1)  # the second call waits for this one (the fix), or is inside it (before)
        return kwargs

    got["a"] = prkit.generate(pipe, PROMPT, dog, lag=lag, callback_on_step_end=start_second, **FAST)
    first_done.set()
    thread.join(timeout=60)
    assert not errors, errors
    for key in "ab":
        np.testing.assert_allclose(got[key], wanted[key], atol=1e-6)
    assert {b: dict(layer.active) for b, layer in wrapped_layers(pipe.unet).items()} == before


@pytest.mark.parametrize("outer", [dict(lag=True), dict(lag=False, store=True)], ids=["lag", "store"])
def test_a_generate_from_a_step_callback_of_a_capturing_call_is_refused(pipe, outer):
    """A preview sampled from a step callback of a generate call with LAG or a store ran through that call's
    attention capture: with a store its UNet evaluations became the outer call's steps (a 3-step call's store held
    5 steps), with LAG it was refused as 'the pipeline is encoding prompt=..., but LAG's masks were made for ...:
    pass the same prompts to lag_sampling'. Refused now saying what happened; the outer call leaves the UNet as
    it was, and a preview from a call without capture still works."""
    dog = _dog(pipe.unet)
    store = AttentionStore() if outer.pop("store", False) else None
    before = dict(pipe.unet.attn_processors)

    def preview(pipeline, step, timestep, kwargs):
        prkit.generate(pipe, "a sks dog on the beach", None, lag=False, **FAST)
        return kwargs

    with pytest.raises(RuntimeError, match=r"generate: called while another generate call samples this UNet with "
                                           r"LAG or store= \(from one of its step callbacks\?\)"):
        prkit.generate(pipe, PROMPT, dog, store=store, callback_on_step_end=preview, **outer, **FAST)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert all(layer.mask_source is None for layer in wrapped_layers(pipe.unet).values())
    wanted = prkit.generate(pipe, PROMPT, dog, lag=False, **FAST)
    np.testing.assert_array_equal(prkit.generate(pipe, PROMPT, dog, lag=False, callback_on_step_end=preview,
                                                 **FAST), wanted)  # no capture: the preview runs, as before
    if store is not None:
        prkit.generate(pipe, PROMPT, dog, store=store, **outer, **FAST)
        assert store.num_steps() == 2


# --- NaN latents or images: refused, not written as black images -----------------------------------


def _dpm_at_every_training_timestep(pipe) -> int:
    """DPM-Solver++ 2M as the world model's scheduler, on 20 training timesteps: at 20 steps its linspace timesteps
    repeat one (10), the solver divides by the zero step and the latents end as NaN (1000 steps on the world
    model). Returns those steps."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler(num_train_timesteps=20, beta_schedule="scaled_linear",
                                                 steps_offset=1, final_sigmas_type="zero")
    return 20


@pytest.mark.parametrize("output_type", ["pil", "np", "latent"])
def test_non_finite_latents_raise_naming_the_steps_and_the_scheduler(pipe, output_type):
    """They were returned: as black PIL images (diffusers casts NaN to 0), and `prkit sample` wrote them."""
    steps = _dpm_at_every_training_timestep(pipe)
    fine = prkit.generate(pipe, PROMPT, None, steps=steps - 1, output_type=output_type)
    assert np.isfinite(np.asarray(fine[0] if output_type == "pil" else fine, dtype=np.float32)).all()
    with pytest.raises(RuntimeError, match=r"^generate: 20 denoising steps of DPMSolverMultistepScheduler gave "
                                           r"non-finite latents \(NaN or inf\), which would be black images; none "
                                           r"are returned. Sample with fewer steps \(near its 20 training"):
        prkit.generate(pipe, PROMPT, None, steps=steps, output_type=output_type)
    assert not pipe.vae.decoder._forward_hooks  # the check leaves with the call


def test_a_vae_that_makes_nan_of_finite_latents_is_named(pipe):
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(RuntimeError, match=r"the VAE \(AutoencoderKL\) decoded finite latents into non-finite pixels "
                                           r"\(NaN or inf\), which would be black images; none are returned: its "
                                           "weights hold NaN or inf"):
        prkit.generate(pipe, PROMPT, None, steps=2)
    assert torch.isfinite(prkit.generate(pipe, PROMPT, None, steps=2, output_type="latent")).all()  # the latents


@pytest.mark.parametrize("block", ["only_residuals", "lag_sampling"])
def test_blocks_entered_from_two_threads_on_one_unet_run_one_after_the_other(pipe, block):
    """only_residuals and lag_sampling used directly took no lock (generate did): a second thread's block switched
    the sets under the first one's (and put the first one's selection back as its 'before'), or with LAG failed
    with 'attention capture is already installed'. Now it waits for the first block to end, as generate does."""
    dog = _dog(pipe.unet)
    cat = prkit.add_residuals(pipe.unet, name="cat", token="zwx", class_word="cat")
    prompts = {"dog": PROMPT, "cat": "a photo of a zwx cat"}

    def enter(residuals):
        if block == "only_residuals":
            return prkit.only_residuals(pipe.unet, [residuals])
        return lag_sampling(pipe, residuals, prompts[residuals.name])

    def selected() -> set:
        """The sets on (only_residuals), or the sets LAG masks (lag_sampling), on every layer."""
        layers = wrapped_layers(pipe.unet).values()
        if block == "only_residuals":
            return {n for layer in layers for n, on in layer.active.items() if on}
        return {n for layer in layers if layer.mask_source is not None for n in layer.mask_source.index}

    before = selected()
    waited, seen = blocks_from_two_threads(enter, dog, cat, selected)
    assert not waited and seen == {"first": {"dog"}, "second": {"cat"}}
    assert selected() == before == ({"dog", "cat"} if block == "only_residuals" else set())


def test_a_refused_decode_lets_the_pipeline_finish_its_call_so_an_upcast_vae_is_cast_back(tmp_path):
    """The check raised inside the VAE's decoder, so the pipeline's own steps after the decode never ran: SDXL, which
    upcasts a float16 VAE (force_upcast) for the decode and casts it back after, was left with a float32 VAE, and
    every later float16 call failed on its latents' dtype. The call now ends as usual, then raises."""
    from test_pipeline import _tiny_sdxl

    pipe = _tiny_sdxl(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(RuntimeError, match=r"the VAE \(AutoencoderKL\) decoded finite latents into non-finite "
                                           r"pixels .*: its weights hold NaN or inf"):
        prkit.generate(pipe, "a photo of a dog", None, steps=2)
    assert pipe.vae.dtype == torch.float16  # as the pipeline's call leaves it
    assert not pipe.vae.decoder._forward_hooks


def test_non_finite_latents_are_refused_also_where_a_step_callback_decoded_a_preview(pipe):
    """With output_type='latent' the returned latents were checked only where nothing had been decoded in the call: a
    step callback that decodes a preview (pipe.vae.decode, finite at the first step) let NaN latents through."""
    steps = _dpm_at_every_training_timestep(pipe)
    previews = []

    def preview(p, i, t, kwargs):
        if i == 0:
            latents = kwargs["latents"] / p.vae.config.scaling_factor
            previews.append(p.vae.decode(latents).sample)
        return kwargs

    with pytest.raises(RuntimeError, match=r"^generate: 20 denoising steps of DPMSolverMultistepScheduler gave "
                                           r"non-finite latents"):
        prkit.generate(pipe, PROMPT, None, steps=steps, output_type="latent", callback_on_step_end=preview)
    assert len(previews) == 1 and torch.isfinite(previews[0]).all()
