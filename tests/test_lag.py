"""LAG: forced masks reduce to the residual / base model, masks per image and per concept, no extra UNet calls."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import prkit
from conftest import make_pipe, randomize, run_unet, unet_inputs
from prkit.lag import THRESHOLDS, LAGConfig, concept_weights, lag_sampling, make_mask, token_positions
from prkit.residuals import find_projections, wrapped_layers

PROMPT = "a photo of a sks dog"
ONES = LAGConfig(threshold=lambda m: torch.ones_like(m))
ZEROS = LAGConfig(threshold=lambda m: torch.zeros_like(m))
FAST = dict(steps=3, output_type="np")


def _dog(unet, seed: int = 1):
    residuals = prkit.add_residuals(unet, name="dog", token="sks", class_word="dog")
    randomize(residuals, seed=seed)
    return residuals


# --- on a bare UNet: conv, linear and SDXL-like ----------------------------------------------------


def test_forced_masks_give_residual_and_base_model(unet, tokenizer):
    inputs = unet_inputs(batch=2)
    base = run_unet(unet, inputs)
    residuals = _dog(unet)
    personal = run_unet(unet, inputs)
    assert (personal - base).abs().max() > 1e-3
    with lag_sampling(unet, residuals, [PROMPT] * 2, tokenizer=tokenizer, config=ONES, cfg=False):
        ones = run_unet(unet, inputs)
    with lag_sampling(unet, residuals, [PROMPT] * 2, tokenizer=tokenizer, config=ZEROS, cfg=False):
        zeros = run_unet(unet, inputs)
    torch.testing.assert_close(ones, personal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zeros, base, atol=1e-5, rtol=1e-5)
    with lag_sampling(unet, residuals, [PROMPT] * 2, tokenizer=tokenizer, cfg=False):
        median = run_unet(unet, inputs)
    assert (median - base).abs().max() > 1e-4 and (median - personal).abs().max() > 1e-4
    assert all(layer.mask_source is None for layer in wrapped_layers(unet).values())  # cleaned up


def test_cfg_unconditional_half_uses_the_conditional_mask(unet, tokenizer):
    """With CFG the [uncond; cond] batch gets the cond mask twice: the cond half equals a cond-only run."""
    residuals = _dog(unet)
    sample, t, text = unet_inputs(batch=2)
    sample = torch.cat([sample[:1], sample[:1]])  # same latent in both halves, as in the pipeline
    seen = []

    def median(maps):
        seen.append(maps.clone())
        return make_mask(maps, LAGConfig())

    with lag_sampling(unet, residuals, PROMPT, tokenizer=tokenizer, config=LAGConfig(threshold=median), cfg=True):
        both = run_unet(unet, (sample, t, text))
    cfg_maps, seen[:] = list(seen), []
    with lag_sampling(unet, residuals, PROMPT, tokenizer=tokenizer, config=LAGConfig(threshold=median), cfg=False):
        cond_only = run_unet(unet, (sample[1:], t, text[1:]))
    assert len(cfg_maps) == len(seen) == 7  # one mask per block per forward
    for with_cfg, alone in zip(cfg_maps, seen):
        assert with_cfg.shape[0] == 2 and alone.shape[0] == 1
        assert torch.equal(with_cfg[0], with_cfg[1])  # both halves share one map
        torch.testing.assert_close(with_cfg[1:], alone, atol=1e-5, rtol=1e-4)  # and it is the cond map
    torch.testing.assert_close(both[1:], cond_only, atol=1e-5, rtol=1e-4)


def test_masks_are_per_image_binary_and_half_ones_with_median(tokenizer):
    from tiny import tiny_unet

    unet = tiny_unet()
    residuals = _dog(unet)
    masks = {}
    for block, layer in wrapped_layers(unet).items():
        layer.register_forward_pre_hook(lambda m, i, b=block: masks.__setitem__(b, m.mask_source("dog")))
    with lag_sampling(unet, residuals, [PROMPT, "a sks dog on the beach"], tokenizer=tokenizer, cfg=False):
        run_unet(unet, unet_inputs(batch=2))
    assert len(masks) == 7
    for block, mask in masks.items():
        tokens = 64 if block in ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0",
                                 "up_blocks.1.attentions.1") else 16
        assert mask.shape == (2, tokens)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mask.sum(1), torch.full((2,), tokens / 2))  # exactly half above the median
    assert not torch.equal(masks["down_blocks.0.attentions.0"][0], masks["down_blocks.0.attentions.0"][1])


def test_median_threshold_is_per_image():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 64, generator=gen)
    maps[0] *= 1000  # a global threshold would give image 1 no ones at all
    mask = make_mask(maps, LAGConfig())
    assert torch.equal(mask.sum(1), torch.tensor([32.0, 32.0]))
    assert torch.equal(mask[1], (maps[1] > maps[1].median()).float())


@pytest.mark.parametrize("method", THRESHOLDS)
def test_every_threshold_method_gives_masks_in_unit_range(method):
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 64, generator=gen) * torch.tensor([[1.0], [5.0], [0.01]])
    mask = make_mask(maps, LAGConfig(threshold=method))
    assert mask.shape == (3, 64) and mask.dtype == torch.float32
    assert (mask >= 0).all() and (mask <= 1).all()
    if method == "soft":
        torch.testing.assert_close(mask.amin(1), torch.zeros(3))
        torch.testing.assert_close(mask.amax(1), torch.ones(3))
        assert torch.equal(mask.argsort(1), maps.argsort(1))  # monotone in the map
    else:
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask.sum(1) > 0).all() and (mask.sum(1) < 64).all()
        # a mask keeps the strongest positions: every kept value is above every dropped one
        for row, m in zip(maps, mask):
            assert row[m == 1].min() > row[m == 0].max()


def test_otsu_and_fixed_split_two_clusters():
    maps = torch.cat([torch.full((1, 40), 0.1), torch.full((1, 24), 0.9)], dim=1)
    maps = maps + torch.linspace(0, 0.01, 64)
    expected = torch.cat([torch.zeros(40), torch.ones(24)])
    assert torch.equal(make_mask(maps, LAGConfig(threshold="otsu"))[0], expected)
    assert torch.equal(make_mask(maps, LAGConfig(threshold="fixed", value=0.5))[0], expected)
    assert torch.equal(make_mask(maps, LAGConfig(threshold="mean"))[0], expected)
    config = LAGConfig()
    config.threshold = "nope"  # set after the config was made
    with pytest.raises(ValueError, match="unknown LAG threshold"):
        make_mask(maps, config)


@pytest.mark.parametrize("kwargs,says", [
    (dict(threshold="Median"), "LAGConfig.threshold 'Median' is unknown; use one of median, mean, otsu"),
    (dict(threshold=None), "LAGConfig.threshold None is unknown"),
    (dict(value=2), "LAGConfig.value must be a number in [0, 1]"),
    (dict(value=float("nan")), "LAGConfig.value must be a number in [0, 1]"),
    (dict(value="0.5"), "LAGConfig.value must be a number in [0, 1]"),
    (dict(include_class="false"), "LAGConfig.include_class must be True or False"),
])
def test_lag_config_is_checked_when_made(kwargs, says):
    """A misspelt threshold failed only at the first UNet forward of a sampling call (minutes in on a CPU)."""
    with pytest.raises(ValueError, match=re.escape(says)):
        LAGConfig(**kwargs)


# --- tokens --------------------------------------------------------------------------------------


def test_concept_weights_mark_each_concepts_own_tokens(tokenizer):
    from tiny import tiny_unet

    u = tiny_unet()
    dog = prkit.add_residuals(u, name="dog", token="sks", class_word="dog")
    pot = prkit.add_residuals(u, name="pot", token="zwx", class_word="teapot")
    prompt = "a photo of sks dog next to zwx teapot"  # <bos> a photo of sks dog next to zwx teapot <eos>
    weights = concept_weights(tokenizer, [prompt], [dog, pot])
    assert weights.shape == (1, 16, 2)
    assert weights[0, :, 0].nonzero().flatten().tolist() == [4, 5]
    assert weights[0, :, 1].nonzero().flatten().tolist() == [8, 9]
    only_token = concept_weights(tokenizer, [prompt], [dog], include_class=False)
    assert only_token[0, :, 0].nonzero().flatten().tolist() == [4]
    assert token_positions(tokenizer, prompt, ["cat"]) == []


def test_token_positions_follow_the_pipelines_textual_inversion_expansion(pipe):
    """A multi-vector textual-inversion token is expanded by the pipeline (``<t>`` -> ``<t> <t>_1``) before the
    text encoder sees it: LAG's positions are counted on that text, for tokens before the identifier and for a
    multi-vector identifier itself."""
    dog = _dog(pipe.unet)
    gen = torch.Generator().manual_seed(0)
    pipe.load_textual_inversion({"<style>": torch.randn(2, 32, generator=gen)}, token="<style>",
                                tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    prompt = "<style> photo of a sks dog"
    encoded = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer)).input_ids
    sks, word_dog = (pipe.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("sks", "dog"))
    assert encoded.index(sks) == 6 and encoded.index(word_dog) == 7  # bos, <style>, <style>_1, photo, of, a
    with lag_sampling(pipe, dog, prompt) as state:
        assert state.concept_weights[0, :, 0].nonzero().flatten().tolist() == [6, 7]  # not [5, 6]
    # a multi-vector identifier: every vector of it is the concept's
    pipe.load_textual_inversion({"<cat>": torch.randn(3, 32, generator=gen)}, token="<cat>",
                                tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    cat = prkit.add_residuals(pipe.unet, name="cat", token="<cat>", class_word="cat")
    with lag_sampling(pipe, cat, "a photo of a <cat> cat") as state:
        assert state.concept_weights[0, :, 0].nonzero().flatten().tolist() == [5, 6, 7, 8]  # <cat> <cat>_1 <cat>_2 cat
    images = prkit.generate(pipe, prompt, dog, lag=True, **FAST)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_prompt_without_identifier_raises(pipe):
    residuals = _dog(pipe.unet)
    with pytest.raises(ValueError) as err:
        prkit.generate(pipe, "a photo of a dog", residuals, lag=True, **FAST)
    assert "'a photo of a dog'" in str(err.value) and "'sks'" in str(err.value)
    assert "lag=False" in str(err.value)
    no_token = prkit.add_residuals(pipe.unet, name="anon")
    with pytest.raises(ValueError, match="no token"):
        prkit.generate(pipe, PROMPT, no_token, lag=True, **FAST)
    long = "a photo of a dog on the beach next to a cat on the beach next to a sks dog"  # past 16 tokens
    with pytest.raises(ValueError, match=r"'sks' of residual set 'dog' comes after the text encoder's 16 tokens"):
        prkit.generate(pipe, long, residuals, lag=True, **FAST)


def test_lag_sampling_refuses_a_name_clearly(pipe):
    """lag_sampling(pipe, "dog", ...) split the name into letters and failed with "'str' object has no attribute
    'unet'"; it takes handles and says where to get one."""
    _dog(pipe.unet)
    for given in ("dog", ["dog"]):
        with pytest.raises(ValueError, match=r"expected a Residuals handle, got 'dog'.*prkit.get_residuals\(unet, "
                                             r"'dog'\)"):
            with prkit.lag_sampling(pipe, given, PROMPT):
                pass


# --- through the pipeline --------------------------------------------------------------------------


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_pipeline_forced_masks_give_residual_and_base_images(tmp_path, linear):
    pipe = make_pipe(tmp_path, linear=linear)
    residuals = _dog(pipe.unet)
    plain = prkit.generate(pipe, PROMPT, residuals, lag=False, seed=0, **FAST)
    base = prkit.generate(pipe, PROMPT, None, seed=0, **FAST)
    assert np.abs(plain - base).max() > 1e-3  # the residuals change the images
    ones = prkit.generate(pipe, PROMPT, residuals, lag=True, lag_config=ONES, seed=0, **FAST)
    zeros = prkit.generate(pipe, PROMPT, residuals, lag=True, lag_config=ZEROS, seed=0, **FAST)
    assert ones.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(ones, plain, atol=1e-5)
    np.testing.assert_allclose(zeros, base, atol=1e-5)


def test_lag_adds_no_unet_forward_calls(pipe):
    residuals = _dog(pipe.unet)
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True)
    prkit.generate(pipe, PROMPT, residuals, lag=False, guidance_scale=7.5, **FAST)
    plain, calls[:] = list(calls), []
    prkit.generate(pipe, PROMPT, residuals, lag=True, guidance_scale=7.5, **FAST)
    assert calls == plain == [2, 2, 2]  # 3 steps, CFG batch of 2, no extra pass


@pytest.mark.parametrize("prompts, num_images", [(PROMPT, 2), ([PROMPT, "a sks dog on the beach"], 1),
                                                 ([PROMPT, "a sks dog on the beach"], 2)])
def test_several_images_and_prompts(pipe, prompts, num_images):
    residuals = _dog(pipe.unet)
    n = num_images * (1 if isinstance(prompts, str) else len(prompts))
    plain = prkit.generate(pipe, prompts, residuals, lag=False, num_images=num_images, **FAST)
    ones = prkit.generate(pipe, prompts, residuals, lag=True, lag_config=ONES, num_images=num_images, **FAST)
    base = prkit.generate(pipe, prompts, None, num_images=num_images, **FAST)
    zeros = prkit.generate(pipe, prompts, residuals, lag=True, lag_config=ZEROS, num_images=num_images, **FAST)
    median = prkit.generate(pipe, prompts, residuals, lag=True, num_images=num_images, **FAST)
    assert plain.shape == median.shape == (n, 16, 16, 3)
    np.testing.assert_allclose(ones, plain, atol=1e-5)
    np.testing.assert_allclose(zeros, base, atol=1e-5)
    assert np.isfinite(median).all()
    assert np.abs(median - plain).max() > 1e-4 and np.abs(median - base).max() > 1e-4


def test_multi_concept_each_set_under_its_own_mask(pipe):
    dog = _dog(pipe.unet, seed=1)
    pot = prkit.add_residuals(pipe.unet, name="pot", token="zwx", class_word="teapot")
    randomize(pot, seed=2)
    prompt = "a photo of sks dog next to zwx teapot"
    got = {}  # (block, set) -> list of masks handed to the layer

    def record(block, source):
        def wrapped(name):
            mask = source(name)
            got.setdefault((block, name), []).append((mask, source.state.concept_map(block)))
            return mask
        return wrapped

    def pre(module, args):  # wraps the mask sources that LAG installed, before the first block runs
        for block, layer in wrapped_layers(module).items():
            if hasattr(layer.mask_source, "state"):
                layer.mask_source = record(block, layer.mask_source)

    handle = pipe.unet.register_forward_pre_hook(pre)
    images = prkit.generate(pipe, prompt, [dog, pot], lag=True, **FAST)
    handle.remove()
    assert np.isfinite(images).all()
    assert {name for _, name in got} == {"dog", "pot"}
    differs = 0
    for (block, name), calls in got.items():
        s = 0 if name == "dog" else 1
        for mask, maps in calls:
            assert torch.equal(mask, make_mask(maps[..., s], LAGConfig()))  # its own concept's map
        other = got[(block, "pot" if name == "dog" else "dog")]
        differs += sum(not torch.equal(a[0], b[0]) for a, b in zip(calls, other))
    assert differs > 0  # the two concepts are localized differently
    # forced masks: both on equals both sets everywhere, both off equals the base model
    both = prkit.generate(pipe, prompt, [dog, pot], lag=False, **FAST)
    base = prkit.generate(pipe, prompt, None, **FAST)
    np.testing.assert_allclose(prkit.generate(pipe, prompt, [dog, pot], lag=True, lag_config=ONES, **FAST), both,
                               atol=1e-5)
    np.testing.assert_allclose(prkit.generate(pipe, prompt, [dog, pot], lag=True, lag_config=ZEROS, **FAST), base,
                               atol=1e-5)
    with pytest.raises(ValueError, match="zwx"):
        prkit.generate(pipe, PROMPT, [dog, pot], lag=True, **FAST)


# --- the CUDA side stream: mask work forks after attn2 and joins at proj_out --------------------------


def test_side_stream_bookkeeping_with_a_stand_in_stream(tokenizer, monkeypatch):
    """The fork/join logic on the CPU, a stand-in for the CUDA stream: a block's masks are prepared after its last
    attn2 layer (not before), what the side stream reads is held until the join, every block's end joins, and the
    hooks go on exit."""
    import contextlib

    from tiny import tiny_unet

    from prkit.attention import CaptureState

    class Stream:
        device = torch.device("cpu")

        def wait_stream(self, other):
            pass

    side = Stream()
    monkeypatch.setattr(CaptureState, "_side_stream", lambda self, q: setattr(self, "_side", side) or side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: side)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    unet = tiny_unet(linear=True, sdxl_like=True)
    residuals = _dog(unet)
    calls = []
    with lag_sampling(unet, residuals, [PROMPT] * 2, tokenizer=tokenizer, cfg=False) as state:
        assert sorted(set(state.layer_counts.values())) == [1, 2]  # one block has two transformer layers
        for block, prepare in list(state.on_block_ready.items()):
            state.on_block_ready[block] = lambda b=block, p=prepare: (calls.append((b, state.step)), p())
        q, k = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 16, 8)
        two = next(b for b, n in state.layer_counts.items() if n == 2)
        state.record_fused(two, 0, q, k, 0.3)
        assert calls == [] and len(state._pending) == 1  # layer 0 of 2: the block's maps are not complete yet
        state.record_fused(two, 1, q, k, 0.3)
        assert calls == [(two, state.step)] and len(state._pending) == 2
        state._pending.append((q, k))
        run_unet(unet, unet_inputs(batch=2))  # (the CPU forward itself takes the inline path)
        assert state._pending == []  # the first block's end joined
    assert state.on_block_ready == {}
    assert not any(module._forward_hooks for module in unet.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream exists on CUDA only (run on a GPU)")
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_side_stream_and_laid_out_masks_give_the_inline_result_on_cuda(tokenizer, graph):
    """Two prompts, two images each with CFG (UNet batch 8, 4 mask rows): the side stream (graphs only) and the
    masks laid out like the middle give what inline bool row masks give, bit for bit."""
    import prkit.attention as attention
    import prkit.lag as lagmod
    from tiny import tiny_unet

    from prkit.graphs import graphed_unet

    unet = tiny_unet(linear=True, sdxl_like=True).cuda()
    residuals = _dog(unet)
    sample, t, text = (x.cuda() for x in unet_inputs(batch=8))
    out = {}
    for side, layout in ((False, False), (False, True), (True, True)):
        attention.SIDE_STREAM, lagmod.LAYOUT_MASKS = side, layout
        try:
            with torch.no_grad(), lag_sampling(unet, residuals, [PROMPT, "a sks dog"], tokenizer=tokenizer,
                                               cfg=True) as state, graphed_unet(unet, enabled=graph) as runner:
                runs = [unet(sample, t, encoder_hidden_states=text, return_dict=False)[0].clone() for _ in range(3)]
        finally:
            attention.SIDE_STREAM, lagmod.LAYOUT_MASKS = True, True
        assert (state._side is not None) == (side and graph)  # eager calls stay on one stream
        assert not graph or (runner.replays == 2 and not runner.failed)
        assert all(torch.equal(r, runs[0]) for r in runs)
        out[side, layout] = runs[0]
    personal = run_unet(unet, (sample, t, text))
    assert torch.equal(out[True, True], out[False, False]) and torch.equal(out[False, True], out[False, False])
    assert (out[True, True] - personal).abs().max() > 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_tokens_are_the_words_wherever_the_tokenizer_pads(tokenizer, side):
    """prompt_tokens gives the positions of the words in the padded sequence the text encoder sees, for a tokenizer
    that pads on the right (SD) or on the left (the world's runs 6-7): an attention store keyed by them shows words."""
    from prkit.lag import prompt_tokens

    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        prompt = "a photo of a sks dog"
        positions, labels = prompt_tokens(tokenizer, prompt)
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length).input_ids
        words = tokenizer(prompt, add_special_tokens=False).input_ids
        assert [ids[i] for i in positions] == words and len(labels) == len(words)
        assert labels[labels.index("sks") + 1] == "dog"
        assert positions == token_positions(tokenizer, prompt, prompt.split())
        assert (positions[0] == 1) == (side == "right")  # left: the words end just before the end token
        assert (positions[-1] == tokenizer.model_max_length - 2) == (side == "left")
    finally:
        tokenizer.padding_side = old


def test_identifier_and_class_match_whole_words_only(tokenizer):
    """'sks' inside 'xsks' (BPE: 'x' + 'sks</w>') and 'dog' inside 'hotdog' are not the concept's words: LAG would
    mask the wrong token, and a prompt without the identifier would pass the check."""
    prompt = "a photo of a xsks hotdog"
    ids = tokenizer(prompt).input_ids
    sks, dog = (tokenizer(w, add_special_tokens=False).input_ids[-1] for w in ("sks", "dog"))
    assert sks in ids and dog in ids  # the tails are there as tokens
    assert token_positions(tokenizer, prompt, ["sks", "dog"]) == []
    assert token_positions(tokenizer, "a photo of a sks dog, (sks) dog", ["sks"]) == [5, 9]  # after "," and "("
    with pytest.raises(ValueError, match="does not contain the identifier"):
        concept_weights(tokenizer, [prompt], [_dog_set()])


def test_a_class_word_after_a_textual_inversion_token_written_in_capitals_is_found(tokenizer):
    """A textual-inversion identifier written with capitals ("<Sks>") comes back lowercased from the tokenizer
    ("<sks>"), which is no key of get_added_vocab: the class word after it was not taken for a word's start, so LAG
    silently left the class word's map out, and prompt_tokens marked the identifier as the head of a longer word."""
    from types import SimpleNamespace

    from prkit.lag import prompt_tokens, word_index

    tokenizer.add_tokens(["<Sks>"])
    concept = SimpleNamespace(name="dog", token="<Sks>", class_word="dog")
    weights = concept_weights(tokenizer, ["a photo of a <Sks> dog"], [concept])
    assert weights[0, :, 0].nonzero().flatten().tolist() == [5, 6]  # the identifier and its class word
    _, labels = prompt_tokens(tokenizer, "a photo of a <Sks> dog")
    assert labels[4] == "<sks>" and labels[4].ends_word is True and word_index(labels, "<Sks>") == 4


def _dog_set():
    """A residual-set stand-in with the words concept_weights reads."""
    from types import SimpleNamespace

    return SimpleNamespace(name="dog", token="sks", class_word="dog")


def test_lag_adds_no_unet_evaluation_counted_inside_the_unet(pipe):
    residuals = prkit.add_residuals(pipe.unet, name="dog", token="sks", class_word="dog")
    randomize(residuals)
    calls = {"conv_in": 0, "blocks": 0}
    pipe.unet.conv_in.register_forward_hook(lambda *_: calls.__setitem__("conv_in", calls["conv_in"] + 1))
    for block in find_projections(pipe.unet):
        pipe.unet.get_submodule(block).register_forward_hook(
            lambda *_: calls.__setitem__("blocks", calls["blocks"] + 1))
    seen = {}
    for lag in (False, True):
        calls.update(conv_in=0, blocks=0)
        prkit.generate(pipe, PROMPT, residuals, lag=lag, guidance_scale=7.5, steps=3, output_type="np")
        seen[lag] = dict(calls)
    assert seen[False] == {"conv_in": 3, "blocks": 3 * 7}
    assert seen[True] == seen[False]


def test_a_concepts_class_word_is_the_one_after_its_identifier(tokenizer):
    """Every copy of the class word used to count for the concept: with two dogs, each set's mask took in the other
    dog, and "... next to the dog" put the residual on an ordinary dog. Now the class word after the identifier
    counts (up to CLASS_WORD_REACH tokens on, before the next identifier)."""
    from tiny import tiny_unet

    u = tiny_unet()
    a = prkit.add_residuals(u, name="a", token="sks", class_word="dog")
    b = prkit.add_residuals(u, name="b", token="zwx", class_word="dog")

    def marked(prompt, sets):
        weights = concept_weights(tokenizer, [prompt], sets)
        return [weights[0, :, s].nonzero().flatten().tolist() for s in range(len(sets))]
    # <bos> a sks dog next to a zwx dog <eos>
    assert marked("a sks dog next to a zwx dog", [a, b]) == [[2, 3], [7, 8]]
    assert marked("a sks dog next to a dog", [a]) == [[2, 3]]
    assert marked("a dog next to a sks dog", [a]) == [[6, 7]]
    assert marked("a sks photo of a dog", [a]) == [[2, 6]]  # three tokens on: still its own
    assert marked("a sks photo of a a dog", [a]) == [[2]]  # farther: the identifier alone
    assert marked("sks zwx dog", [a, b]) == [[1], [2, 3]]  # the next identifier comes first
    assert marked("a sks dog next to a sks dog", [a]) == [[2, 3, 7, 8]]  # each identifier its own


@pytest.mark.parametrize("threshold, got", [(lambda m: m.mean(dim=1), "(2,)"), (lambda m: m.tolist(), "list")])
def test_a_threshold_function_of_the_wrong_shape_is_named(threshold, got):
    """A callable threshold returning another shape failed deep inside the residual layer ("shape '[2, 1, 8, 8]' is
    invalid for input of size 2"); make_mask now names the threshold and the shape it must return."""
    maps = torch.rand(2, 64)
    with pytest.raises(ValueError, match=re.escape(f"returned {got} for maps of shape (2, 64)")):
        make_mask(maps, LAGConfig(threshold=threshold))
    assert torch.equal(make_mask(maps, ONES), torch.ones(2, 64))


def test_a_bare_unet_must_say_whether_its_batches_hold_cfgs_two_halves(unet, tokenizer):
    """cfg=None on a bare UNet was read as False: a [uncond; cond] batch then took masks from the negative prompt's
    tokens and from the wrong prompts (2 prompts: up to 1.4 from the right output), without a word."""
    residuals = _dog(unet)
    with pytest.raises(ValueError, match="bare UNet needs cfg=: True where its batches are"):
        with lag_sampling(unet, residuals, [PROMPT] * 2, tokenizer=tokenizer):
            pass


def test_otsu_on_nan_maps_gives_a_mask_not_an_index_error():
    """NaN attention maps (a UNet whose output is NaN anyway) stopped LAG sampling with "index -9223372036854775808 is
    out of bounds" from otsu's histogram; the other thresholds gave masks."""
    from prkit.lag import make_mask

    maps = torch.tensor([[0.1, float("nan"), 0.9, 0.5], [0.2, 0.4, 0.6, 0.8]])
    mask = make_mask(maps, LAGConfig(threshold="otsu"))
    assert mask.shape == maps.shape and torch.isfinite(mask).all()
    assert mask[1].tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_threshold_reads_half_precision_maps_as_float32_ones(dtype):
    """make_mask(maps.half(), otsu) failed with "scatter(): Expected self.dtype to be equal to src.dtype" (its
    histogram is float32), and soft gave half-precision masks where every other method gives float32 ones."""
    maps = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    for method in THRESHOLDS:
        mask = make_mask(maps, LAGConfig(threshold=method))
        assert mask.dtype == torch.float32
        torch.testing.assert_close(mask, make_mask(maps.float(), LAGConfig(threshold=method)))


def test_text_longer_than_one_tokenizer_window_is_named(unet, tokenizer):
    """Embeddings of more token positions than the tokenizer's window (compel's and other long-prompt weighting
    chunk a prompt into several windows, as lag_sampling's docs invite for prompt weighting) stopped sampling with
    "einsum(): subscript t has size 16 ... does not broadcast with previously seen size 32"; the error says which
    lengths disagree and what to do, and the UNet is left as it was."""
    residuals = _dog(unet)
    sample, t, text = unet_inputs(batch=2)
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    with pytest.raises(ValueError, match=r"32 token positions, but LAG's masks are made for 16 \(the tokenizer's "
                                         r"model_max_length\).*at most 16 tokens.*or lag=False"):
        with lag_sampling(unet, residuals, PROMPT, tokenizer=tokenizer, cfg=True):
            run_unet(unet, (sample, t, torch.cat([text, text], 1)))
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    assert all(layer.mask_source is None for layer in wrapped_layers(unet).values())


def test_prompt_tokens_of_a_pipeline_follow_its_textual_inversion_expansion(pipe):
    """prompt_tokens counted a multi-vector textual-inversion token (``<style>``, which the pipeline expands to
    ``<style> <style>_1`` before its text encoder) as one: every later word's position, and the store's maps kept for
    it, were one off (LAG's own positions were right). Given the pipeline it counts what the text encoder sees; given
    the bare tokenizer of such a prompt it says to pass the pipeline."""
    from prkit.lag import prompt_tokens

    dog = _dog(pipe.unet)
    pipe.load_textual_inversion({"<style>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                                token="<style>", tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    prompt = "<style> photo of a sks dog"
    positions, labels = prompt_tokens(pipe, prompt)
    assert labels == ["<style>", "<style>_1", "photo", "of", "a", "sks", "dog"] and positions == list(range(1, 8))
    with lag_sampling(pipe, dog, prompt) as state:
        lag_positions = state.concept_weights[0, :, 0].nonzero().flatten().tolist()
    assert lag_positions == [positions[labels.index("sks")], positions[labels.index("dog")]] == [6, 7]
    with pytest.raises(ValueError, match=r"'<style>'.*expands.*prkit.prompt_tokens\(pipe, prompt\)"):
        prompt_tokens(pipe.tokenizer, prompt)
    assert prompt_tokens(pipe.tokenizer, PROMPT) == prompt_tokens(pipe, PROMPT)  # nothing to expand: the same


def test_token_positions_of_a_pipeline_follow_its_textual_inversion_expansion(pipe):
    """token_positions counted a multi-vector textual-inversion token (``<style>``, which the pipeline expands to
    ``<style> <style>_1``) as one, silently: 'dog' came out one position early, so an AttentionStore keyed by it kept
    the identifier's map under the class word's name. Given the pipeline it counts what the text encoder sees (words
    rewritten as well); given the bare tokenizer of such a prompt it says to pass the pipeline, as prompt_tokens."""
    pipe.load_textual_inversion({"<style>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                                token="<style>", tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    prompt = "<style> photo of a sks dog"
    assert token_positions(pipe, prompt, ["dog"]) == [7] and token_positions(pipe, prompt, ["sks"]) == [6]
    assert token_positions(pipe, prompt, ["<style>"]) == [1, 2]  # every vector of a multi-vector word
    with pytest.raises(ValueError, match=r"'<style>'.*expands.*prkit.lag.token_positions\(pipe, prompt, words\)"):
        token_positions(pipe.tokenizer, prompt, ["dog"])
    assert token_positions(pipe.tokenizer, PROMPT, ["dog"]) == token_positions(pipe, PROMPT, ["dog"]) == [6]


def test_lag_without_prompts_says_so_before_any_unet_call(tmp_path):
    """No prompt to place the masks: it failed at the first UNet call with 'integer modulo by zero'."""
    pipe = make_pipe(tmp_path)
    res = prkit.add_residuals(pipe.unet, 0.5, "a", token="sks", class_word="dog")
    with pytest.raises(ValueError, match=r"lag_sampling needs the prompt\(s\) that will be sampled"):
        with lag_sampling(pipe, res, []):
            pass
    assert all(layer.mask_source is None for layer in wrapped_layers(pipe.unet).values())


def test_an_identifier_two_sets_share_goes_to_the_set_whose_class_word_follows_it(tokenizer):
    """Two sets trained with the same 'sks' (DreamBooth's habit): each occurrence is the subject its class word names.
    Before, each set took both occurrences, so each residual also applied where the other subject is."""
    from tiny import tiny_unet

    u = tiny_unet()
    dog = prkit.add_residuals(u, name="dog", token="sks", class_word="dog")
    pot = prkit.add_residuals(u, name="pot", token="sks", class_word="teapot")
    prompt = "a photo of sks dog next to sks teapot"  # <bos> a photo of sks dog next to sks teapot <eos>
    weights = concept_weights(tokenizer, [prompt], [dog, pot])
    assert weights[0, :, 0].nonzero().flatten().tolist() == [4, 5]
    assert weights[0, :, 1].nonzero().flatten().tolist() == [8, 9]
    assert concept_weights(tokenizer, [prompt], [dog])[0, :, 0].nonzero().flatten().tolist() == [4, 5, 8]  # alone
    with pytest.raises(ValueError, match=r"holds the identifier 'sks' of residual set 'pot' only where another set"):
        concept_weights(tokenizer, ["a photo of sks dog"], [dog, pot])
    other = prkit.add_residuals(u, name="other", token="sks", class_word="dog")
    with pytest.raises(ValueError, match=r"sets 'dog', 'other' share the identifier 'sks'.*several of their class"):
        concept_weights(tokenizer, ["a photo of sks dog"], [dog, other])
    with pytest.raises(ValueError, match=r"share the identifier 'sks'.*none of their class words"):
        concept_weights(tokenizer, ["a photo of sks next to sks teapot"], [dog, pot])


def test_a_set_without_a_class_word_sharing_an_identifier_is_told_to_get_one(tokenizer):
    """A set without a class word (add_residuals(..., token='sks') alone) beside another set with the same 'sks': the
    refusal told the user to write "'sks <class>' where this set's subject goes", which no prompt can do (only a
    class word after it gives a shared identifier to a set). It names the missing class word and how to set it."""
    from tiny import tiny_unet

    u = tiny_unet()
    dog = prkit.add_residuals(u, name="dog", token="sks", class_word="dog")
    bare = prkit.add_residuals(u, name="bare", token="sks")
    with pytest.raises(ValueError, match=r"residual set 'bare' has no class word.*"
                                         r"prkit\.get_residuals\(pipe\.unet, 'bare'\)\.class_word = "):
        concept_weights(tokenizer, ["a photo of sks dog"], [dog, bare])
    bare.class_word = "teapot"  # as the message says: then it is told apart
    weights = concept_weights(tokenizer, ["a photo of sks dog next to sks teapot"], [dog, bare])
    assert weights[0, :, 1].nonzero().flatten().tolist() == [8, 9]
