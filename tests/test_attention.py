"""Attention capture: processor swap and restore, refusal to nest, unchanged outputs, the AttentionStore."""

from __future__ import annotations

import pytest
import torch

import prkit
from conftest import randomize, run_unet, unet_inputs
from prkit.attention import AttentionStore, CaptureProcessor, CaptureState, capture_attention
from prkit.lag import lag_sampling
from tiny import tiny_unet


def _same_processors(unet, original: dict) -> None:
    now = unet.attn_processors
    assert now.keys() == original.keys()
    for key, proc in original.items():
        assert now[key] is proc, key


def test_restores_original_processors_on_exit(unet):
    original = unet.attn_processors
    with capture_attention(unet) as state:
        assert isinstance(state, CaptureState)
        run_unet(unet, unet_inputs())
    _same_processors(unet, original)
    assert unet._prkit_capture is None
    assert not unet._forward_pre_hooks  # the step hook is gone too


def test_restores_original_processors_on_error(unet):
    original = unet.attn_processors
    with pytest.raises(ZeroDivisionError):
        with capture_attention(unet):
            run_unet(unet, unet_inputs())
            raise ZeroDivisionError
    _same_processors(unet, original)
    assert not unet._forward_pre_hooks
    with capture_attention(unet):  # installable again after an error
        pass
    _same_processors(unet, original)


def test_refuses_to_install_twice(unet):
    original = unet.attn_processors
    with capture_attention(unet):
        with pytest.raises(RuntimeError, match="already installed"):
            with capture_attention(unet):
                pass
        assert all(isinstance(p, CaptureProcessor) for k, p in unet.attn_processors.items() if "attn2" in k)
    _same_processors(unet, original)


def test_only_attn2_is_swapped(unet, arch):
    original = unet.attn_processors
    attn1 = [k for k in original if k.endswith("attn1.processor")]
    attn2 = [k for k in original if k.endswith("attn2.processor")]
    assert len(attn1) == len(attn2) == (11 if arch == "sdxl" else 7)  # SDXL-like: 2 layers in the 64-channel blocks
    with capture_attention(unet):
        during = unet.attn_processors
        for key in attn1:
            assert during[key] is original[key]
        for key in attn2:
            assert isinstance(during[key], CaptureProcessor)
            assert during[key] is not original[key]


def test_output_unchanged_by_capture(unet):
    inputs = unet_inputs(batch=2)
    plain = run_unet(unet, inputs)
    weights = torch.zeros(1, 16, 1)
    weights[0, 3:5, 0] = 1
    with capture_attention(unet, CaptureState(weights, cfg=True)) as state:
        captured = run_unet(unet, inputs)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    maps = state.concept_map("down_blocks.0.attentions.0")  # (B, N, S)
    assert maps.shape == (2, 64, 1)
    assert torch.equal(maps[0], maps[1])  # CFG: the conditional map serves both halves
    assert (maps >= 0).all() and (maps <= 1 + 1e-6).all()


def test_half_precision_capture_with_large_attention_logits_stays_finite():
    """SD2.x asks for upcast attention (its half-precision logits overflow); the capture computed q k^T in float16
    and scaled it after, so logits past 65504 before the scale became inf and the UNet's output NaN where diffusers'
    own processors (scaled, or upcast) are finite."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(64, cross_attention_dim=32, heads=1, dim_head=64, upcast_attention=True).half()
    hidden, text = torch.randn(1, 8, 64).half(), torch.randn(1, 4, 32).half()
    with torch.no_grad():
        for layer in (attn.to_q, attn.to_k):
            layer.weight.mul_(110)  # q.k up to ~77000: float16 overflows before the 1/8 scale, not after it
        plain = attn(hidden, text)
        state = CaptureState(torch.ones(1, 4, 1))
        state.block_hw["block"] = (2, 4)
        attn.set_processor(CaptureProcessor(state, "block", 0))
        captured = attn(hidden, text)
    assert torch.isfinite(plain).all() and torch.isfinite(captured).all()
    torch.testing.assert_close(captured, plain, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(state.concept_map("block"), torch.ones(1, 8, 1))  # every token: mass 1


def test_capture_map_is_the_sum_of_token_probabilities(unet):
    """The concept map is the head-averaged softmax mass on the chosen tokens; all tokens sum to 1."""
    inputs = unet_inputs(batch=1)
    everything = torch.ones(1, 16, 2)
    everything[0, :8, 1] = 0  # concept 1: the last 8 tokens only
    with capture_attention(unet, CaptureState(everything)) as state:
        run_unet(unet, inputs)
    blocks = [b for b in state.sums]
    assert len(blocks) == 7
    for block in blocks:
        maps = state.concept_map(block)
        torch.testing.assert_close(maps[..., 0], torch.ones_like(maps[..., 0]), atol=1e-5, rtol=0)
        assert (maps[..., 1] < 1 - 1e-4).any() and (maps[..., 1] > 1e-4).all()


@pytest.mark.parametrize("cfg", [False, True])
def test_attention_store_fills_capped_maps(unet, arch, cfg):
    store = AttentionStore(max_resolution=4)
    inputs = unet_inputs(batch=2)
    with capture_attention(unet, CaptureState(cfg=cfg), store=store):
        for _ in range(3):  # three denoising steps
            run_unet(unet, inputs)
    blocks = store.blocks()
    assert len(blocks) == 7 and blocks[0] == "down_blocks.0.attentions.0" and blocks[-1] == "up_blocks.1.attentions.1"
    assert store.num_steps() == 3
    assert set(store.maps) == {(b, s) for b in blocks for s in range(3)}
    batch = 1 if cfg else 2
    for (block, step), maps in store.maps.items():
        assert maps.shape == (batch, 16, 4, 4), (block, maps.shape)  # 8x8 blocks pooled to 4x4
        assert maps.dtype == torch.float32 and maps.device.type == "cpu"
        torch.testing.assert_close(maps.sum(1), torch.ones(batch, 4, 4), atol=1e-4, rtol=0)  # softmax mass
    assert store.aggregate(size=8).shape == (batch, 16, 8, 8)
    assert store.get(blocks[0]).shape == (batch, 16, 4, 4)


def test_attention_store_keeps_chosen_tokens_steps_and_resolution(unet):
    store = AttentionStore(tokens=[3, 5], max_resolution=16, steps=[1])
    with capture_attention(unet, store=store):
        for _ in range(3):
            run_unet(unet, unet_inputs(batch=1))
    assert {s for _, s in store.maps} == {1}
    shapes = {b: m.shape for (b, _), m in store.maps.items()}
    assert shapes["down_blocks.0.attentions.0"] == (1, 2, 8, 8)  # below the cap: native resolution
    assert shapes["mid_block.attentions.0"] == (1, 2, 4, 4)
    with pytest.raises(KeyError, match="no maps"):
        store.get("nowhere")


def test_capture_on_a_pipeline_keeps_the_conditional_rows_as_generate_does(pipe):
    """Given the UNet alone the store keeps the guided batch's two halves ([unconditional; conditional]), and the
    README's pipeline call read row 0, the empty prompt's map; given the pipeline it keeps the prompt's rows."""
    import prkit

    text = "a photo of a dog"
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
    via_generate = AttentionStore()
    prkit.generate(pipe, text, None, seed=0, steps=2, store=via_generate, output_type="np")
    on_unet, on_pipe = AttentionStore(), AttentionStore()
    with capture_attention(pipe.unet, store=on_unet):
        pipe(text, generator=torch.Generator().manual_seed(0), **kw)
    with capture_attention(pipe, store=on_pipe):
        pipe(text, generator=torch.Generator().manual_seed(0), **kw)
    block = on_pipe.blocks()[0]
    assert on_unet.get(block, 0).shape[0] == 2 and on_pipe.get(block, 0).shape[0] == 1
    assert torch.allclose(on_pipe.get(block, 0), via_generate.get(block, 0))
    assert torch.allclose(on_unet.get(block, 0)[1:], on_pipe.get(block, 0))
    assert not torch.allclose(on_unet.get(block, 0)[:1], on_pipe.get(block, 0))
    with capture_attention(pipe, store=on_pipe):  # no guidance: every row is the prompt's
        pipe(text, num_inference_steps=1, guidance_scale=1.0, output_type="np")
    assert on_pipe.get(block, 0).shape[0] == 1


def test_store_token_positions_outside_the_prompt_are_named(pipe):
    import prkit

    with pytest.raises(ValueError, match=r"positions \[400\] outside the prompt's"):
        prkit.generate(pipe, "a photo of a dog", None, steps=1, store=AttentionStore(tokens=[1, 400]),
                       output_type="np")


def test_capture_on_a_pipeline_that_does_not_say_whether_it_guides_is_refused(pipe):
    class Upscaler:  # as diffusers' upscale pipelines: guidance decided inside __call__, no property
        unet = pipe.unet

    with pytest.raises(ValueError, match="does not say whether it runs classifier-free guidance"):
        with capture_attention(Upscaler(), store=AttentionStore()):
            pass


PROMPT = "a photo of a sks dog"


def _hooks(module):
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in module.named_modules()
            if m._forward_pre_hooks or m._forward_hooks}


def test_capture_and_lag_leave_no_hook_on_any_module(tokenizer):
    unet = tiny_unet(linear=True, sdxl_like=True)
    residuals = prkit.add_residuals(unet, name="dog", token="sks", class_word="dog")
    randomize(residuals)
    before = _hooks(unet)
    assert before == {}
    with capture_attention(unet, store=AttentionStore()):
        run_unet(unet, unet_inputs())
    assert _hooks(unet) == before
    with lag_sampling(unet, residuals, [PROMPT] * 2, tokenizer=tokenizer, cfg=False):
        run_unet(unet, unet_inputs())
    assert _hooks(unet) == before


def test_generate_with_a_store_and_lag_leaves_no_hooks(pipe):
    residuals = prkit.add_residuals(pipe.unet, name="dog", token="sks", class_word="dog")
    randomize(residuals)
    for lag in (False, True):
        prkit.generate(pipe, PROMPT, residuals, lag=lag, steps=2, output_type="np", store=AttentionStore())
        assert _hooks(pipe.unet) == {}, lag


def _inputs(seed=0, batch=2, heads=4, n=16, tokens=8, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=gen) * 2  # peaked softmax: heads really differ
    k = torch.randn(batch, heads, tokens, dim, generator=gen) * 2
    return q, k


@pytest.mark.parametrize("path", ["explicit", "fused"])
def test_concept_map_is_the_head_and_layer_mean_of_the_tokens_probability_mass(path):
    tokens, dim = 8, 8
    weights = torch.zeros(2, tokens, 1)
    weights[:, [2, 3], 0] = 1  # the concept's two token positions, in both prompts
    state = CaptureState(weights, cfg=False)
    want = []
    for layer in range(2):  # two transformer layers in one block, as SDXL's
        q, k = _inputs(seed=layer)
        probs = (q @ k.transpose(-1, -2) * dim ** -0.5).softmax(-1)  # (B, h, N, T)
        want.append(probs[..., [2, 3]].sum(-1).mean(1))  # (B, N): token mass, averaged over heads
        if path == "explicit":
            state.record("blk", layer, probs, (4, 4))
        else:
            state.record_fused("blk", layer, q, k, dim ** -0.5)
    expected = torch.stack(want).mean(0)
    per_head = torch.stack(want).std(0)
    assert per_head.max() > 1e-3  # the two layers differ: a single layer would not pass
    torch.testing.assert_close(state.concept_map("blk")[..., 0], expected, rtol=1e-5, atol=1e-6)


def test_stored_maps_average_the_blocks_layers_and_aggregate_averages_blocks():
    store = AttentionStore(max_resolution=8)
    state = CaptureState(cfg=False, store=store)
    state.step = 0
    layers = [torch.rand(1, 2, 16, 8, generator=torch.Generator().manual_seed(s)).softmax(-1) for s in range(3)]
    for probs in layers:  # three layers of one block
        state._store("blk", probs, (4, 4))
    head_mean = torch.stack([p.mean(1) for p in layers]).mean(0)  # (1, N, T)
    expected = head_mean.transpose(1, 2).reshape(1, 8, 4, 4)
    torch.testing.assert_close(store.get("blk", 0), expected, rtol=1e-5, atol=1e-6)
    store.maps[("other", 0)] = torch.zeros(1, 8, 2, 2)
    agg = store.aggregate(size=4)
    torch.testing.assert_close(agg, expected / 2, rtol=1e-5, atol=1e-6)  # the mean of the block and a zero block
    store.maps[("blk", 1)] = 3 * expected
    torch.testing.assert_close(store.get("blk"), 2 * expected)  # averaged over the kept steps


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "16"])
def test_a_store_refuses_a_cap_that_would_pool_every_map_to_nothing(bad):
    with pytest.raises(ValueError, match=r"AttentionStore\.max_resolution must be a whole number >= 1"):
        AttentionStore(max_resolution=bad)


@pytest.mark.parametrize("field, bad", [("steps", 10), ("tokens", 5), ("tokens", [1.5]), ("steps", [True])])
def test_a_store_refuses_steps_or_tokens_that_are_no_list_of_whole_numbers(pipe, field, bad):
    """AttentionStore(steps=10) (meant: keep ten) failed at the first UNet forward, after the text was encoded, with a
    bare TypeError ("argument of type 'int' is not iterable") from inside the attention processor; tokens=[1.5] was
    silently cut to position 1. Both are refused when the store is made, naming the field; a range is a list."""
    with pytest.raises(ValueError, match=f"AttentionStore.{field} must be None or a list of whole numbers"):
        AttentionStore(**{field: bad})
    store = AttentionStore(tokens=range(1, 3), steps=(0, 1))
    assert store.tokens == [1, 2] and store.steps == [0, 1]
    prkit.generate(pipe, "a photo of a dog", None, steps=3, store=store, output_type="np")
    assert sorted({s for _, s in store.maps}) == [0, 1] and store.get(store.blocks()[0]).shape[1] == 2


@pytest.mark.parametrize("path", ["explicit", "fused"])
def test_several_images_per_prompt_take_their_own_prompts_concept_tokens(path):
    """diffusers orders a batch of 2 prompts x 2 images as [p0, p0, p1, p1]: each image's map must sum the
    token positions of its own prompt (a tiled [p0, p1, p0, p1] pairing gave images 1 and 2 the other prompt's)."""
    tokens, dim = 8, 8
    weights = torch.zeros(2, tokens, 1)
    weights[0, 2, 0] = 1  # prompt 0's concept at position 2
    weights[1, 5, 0] = 1  # prompt 1's at position 5
    state = CaptureState(weights, cfg=False)
    q, k = _inputs(seed=3, batch=4)
    probs = (q @ k.transpose(-1, -2) * dim ** -0.5).softmax(-1)  # (4, h, N, T)
    if path == "explicit":
        state.record("blk", 0, probs, (4, 4))
    else:
        state.record_fused("blk", 0, q, k, dim ** -0.5)
    position = torch.tensor([2, 2, 5, 5])
    expected = torch.stack([probs[i, :, :, position[i]].mean(0) for i in range(4)])  # (4, N)
    got = state.concept_map("blk")[..., 0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got[1] - probs[1, :, :, 5].mean(0)).abs().max() > 1e-3  # the other prompt's token reads differently
