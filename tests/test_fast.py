"""The fast paths on the CPU: the windowed loop of prkit.fast against the eager loop, frozen convs, merged
low-rank, the fused LAG maps and masks against the explicit ones. CUDA graphs themselves need a GPU
(benchmarks/bench.py checks them there); everything around them is checked here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import prkit
import prkit.fast as fast
import prkit.train as train
import prkit.train_inputs as train_inputs
from conftest import interrupt_fast_step, make_concept, make_pipe, randomize, run_unet, unet_inputs
from tiny import tiny_unet
from prkit.attention import CaptureState
from prkit.fast import FastConfig, patch_frozen_convs, patch_merged_lowrank, train_fast
from prkit.graphs import graphed_unet
from prkit.lag import LAGConfig, _MaskSource
from prkit.residuals import ResidualProjection, get_residuals
from prkit.train import TrainConfig, TrainingDiverged

EAGER = dict(progress=False, batch_size=4)
LOOP = FastConfig(cuda_graph=False, check_every=3)  # windows of 3 steps: boundaries fall mid-run


def _fast(pipe, concept, loop=LOOP, **overrides):
    return train_fast(pipe, concept, TrainConfig(batch_size=4, **overrides), progress=False, fast=loop)


def _close_states(a: dict, b: dict) -> bool:
    # same math, other CPU kernels (the fast loop's frozen-conv backward): 5e-8 apart on a 2-core EPYC, 3.6e-7 on a
    # 16-core Xeon after 8 AdamW steps; a wrong batch or step moves weights by ~the learning rate (1e-2)
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=2e-6) for k in a)


@pytest.fixture(scope="module")
def concept_module():
    return make_concept()


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory, concept_module):
    result = prkit.train_residuals(make_pipe(tmp_path_factory.mktemp("eager")), concept_module, steps=8, **EAGER)
    return result, {k: v.clone() for k, v in result.residuals.state_dict().items()}


def test_fast_loop_matches_the_eager_loop(tmp_path, concept_module, eager_run):
    reference, state = eager_run
    result = _fast(make_pipe(tmp_path), concept_module, steps=8)
    assert result.completed and result.steps_done == 8 and len(result.losses) == 8
    assert result.losses == pytest.approx(reference.losses, rel=1e-5)
    assert _close_states(result.residuals.state_dict(), state)
    assert result.residuals.meta["config"]["steps"] == 8
    assert not any(p.requires_grad for p in result.residuals.parameters())


def test_train_residuals_routes_to_the_fast_loop(tmp_path, concept, monkeypatch):
    seen = []
    monkeypatch.setattr(fast, "train_fast", lambda *args, **kwargs: seen.append(kwargs) or "fast")
    pipe = make_pipe(tmp_path)
    assert prkit.train_residuals(pipe, concept, steps=2, fast=True, **EAGER) == "fast"
    assert seen and seen[0]["progress"] is False
    assert prkit.train_residuals(pipe, concept, steps=1, **EAGER) != "fast"  # CPU default: eager
    switches = FastConfig(sdpa_backends=None)
    assert prkit.train_residuals(pipe, concept, steps=2, fast=switches, **EAGER) == "fast"
    assert seen[-1]["fast"] is switches and seen[0]["fast"] is None


def test_fast_checkpoint_resumes_in_the_eager_loop(tmp_path, concept_module, eager_run):
    reference, state = eager_run
    ckpt = tmp_path / "ckpt"
    first = _fast(make_pipe(tmp_path / "p1"), concept_module, steps=8, checkpoint_dir=str(ckpt),
                  checkpoint_every=4, stop_after=5)
    assert not first.completed and first.steps_done == 5 and len(first.losses) == 5
    assert torch.load(ckpt / "checkpoint.pt", weights_only=False)["step"] == 5
    second = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept_module, steps=8, checkpoint_dir=str(ckpt),
                                   **EAGER)
    assert second.completed and second.losses == pytest.approx(reference.losses, rel=1e-5)
    assert _close_states(second.residuals.state_dict(), state)


def test_nan_rolls_back_and_raises_like_the_eager_loop(tmp_path, concept, monkeypatch):
    real_step, calls = train._step, []

    def eager_step(*args, **kwargs):
        calls.append(1)
        return torch.tensor(float("nan"), requires_grad=True) if len(calls) == 3 else real_step(*args, **kwargs)

    monkeypatch.setattr(train, "_step", eager_step)
    eager_pipe = make_pipe(tmp_path / "eager")
    with pytest.raises(TrainingDiverged) as eager_err:
        prkit.train_residuals(eager_pipe, concept, steps=5, **EAGER)
    monkeypatch.setattr(train, "_step", real_step)

    real_body, bodies = fast.TrainStep._body, []

    def poisoned(self):
        bodies.append(1)
        real_body(self)
        if len(bodies) == 3:  # the third step went bad after updating: the rollback must undo it
            self.loss.fill_(float("nan"))
            with torch.no_grad():
                for p in self.params:
                    p.add_(1.0)

    monkeypatch.setattr(fast.TrainStep, "_body", poisoned)
    pipe = make_pipe(tmp_path / "fast")
    with pytest.raises(TrainingDiverged) as err:
        _fast(pipe, concept, loop=FastConfig(cuda_graph=False, check_every=4), steps=5)
    assert str(err.value) == str(eager_err.value)
    assert _close_states(get_residuals(pipe.unet).state_dict(), get_residuals(eager_pipe.unet).state_dict())
    assert not any(p.requires_grad for p in get_residuals(pipe.unet).parameters())


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clipping", "clipping"])
def test_an_infinite_gradient_of_a_finite_loss_is_refused_like_the_eager_loop(tmp_path, concept, monkeypatch, clip):
    """Without a grad scaler the fast loop fed an infinite gradient to AdamW: at the last step the run finished with
    NaN weights and no error; earlier, the next step's NaN loss rolled back and the redo replayed the bad step."""
    hooks = []

    def overflow_at(step):
        def forward_hook(module, args, output):
            hooks.append(1)
            if len(hooks) == step:  # a finite loss whose backward pass overflows
                output.sample.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return forward_hook

    eager_pipe, pipe = make_pipe(tmp_path / "eager"), make_pipe(tmp_path / "fast")
    handle = eager_pipe.unet.register_forward_hook(overflow_at(4))
    with pytest.raises(TrainingDiverged) as eager_err:
        prkit.train_residuals(eager_pipe, concept, steps=4, max_grad_norm=clip, **EAGER)
    handle.remove()
    hooks.clear()
    pipe.unet.register_forward_hook(overflow_at(4))
    with pytest.raises(TrainingDiverged) as err:  # the last step, in the second window of 3
        _fast(pipe, concept, steps=4, max_grad_norm=clip)
    assert len(hooks) == 4  # settled without replaying the bad step
    assert str(err.value) == str(eager_err.value)
    assert str(err.value).startswith("the gradient of a finite loss (") and "at step 4;" in str(err.value)
    state = get_residuals(pipe.unet).state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert _close_states(state, get_residuals(eager_pipe.unet).state_dict())  # the weights of step 3


def test_interrupt_checkpoints_the_finished_steps(tmp_path, concept_module, eager_run, monkeypatch):
    reference, state = eager_run
    real_body = interrupt_fast_step(monkeypatch, at=7)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _fast(make_pipe(tmp_path / "p1"), concept_module, steps=8, checkpoint_dir=str(ckpt), checkpoint_every=0)
    assert torch.load(ckpt / "checkpoint.pt", weights_only=False)["step"] == 6
    monkeypatch.setattr(fast.TrainStep, "_body", real_body)
    resumed = _fast(make_pipe(tmp_path / "p2"), concept_module, steps=8, checkpoint_dir=str(ckpt), checkpoint_every=0)
    assert resumed.completed and resumed.losses == pytest.approx(reference.losses, rel=1e-5)
    assert _close_states(resumed.residuals.state_dict(), state)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (cuDNN picks the gradient's layout from the input)"))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_convs_keep_no_input_and_give_the_same_gradients(channels_last, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 on both paths
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.Conv2d(8, 4, 1)).requires_grad_(False).to(device)
    x = torch.randn(2, 4, 9, 9, device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ref_x = x.clone().requires_grad_(True)
    model(ref_x).square().sum().backward()
    undo = patch_frozen_convs(model)
    fast_x = x.clone().requires_grad_(True)
    out = model(fast_x)
    assert type(out.grad_fn).__name__ == "_FrozenConv2dBackward"
    assert [t.shape for t in out.grad_fn.saved_tensors] == [model[3].weight.shape]  # the weight only
    out.square().sum().backward()
    assert torch.allclose(fast_x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    assert fast_x.grad.is_contiguous(memory_format=torch.channels_last) == channels_last  # the input's layout
    undo()
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_merged_lowrank_matches_the_side_branch(tmp_path, linear):
    from conftest import run_unet, unet_inputs
    from tiny import tiny_unet

    unet = tiny_unet(linear=linear)
    randomize(prkit.add_residuals(unet, rank=4, seed=0))
    inputs = unet_inputs()
    reference = run_unet(unet, inputs)
    undo = patch_merged_lowrank(unet)
    assert torch.allclose(run_unet(unet, inputs), reference, rtol=1e-4, atol=1e-5)
    undo()
    assert torch.equal(run_unet(unet, inputs), reference)


@pytest.mark.parametrize("cfg", [True, False])
def test_fused_concept_maps_and_masks_match_the_explicit_ones(cfg):
    gen = torch.Generator().manual_seed(0)
    batch, heads, n, tokens, dim = 4, 2, 16, 16, 8
    weights = (torch.rand(2, tokens, 2, generator=gen) > 0.7).float()  # 2 prompts, 2 concepts
    rows = 2 if cfg else 4
    weights = weights[:rows] if rows <= 2 else weights.repeat(2, 1, 1)
    explicit, fused = CaptureState(weights, cfg=cfg), CaptureState(weights, cfg=cfg)
    for layer in range(2):  # two transformer layers in one block (SDXL)
        q = torch.randn(batch, heads, n, dim, generator=gen)
        k = torch.randn(batch, heads, tokens, dim, generator=gen)
        probs = (q @ k.transpose(-1, -2) * dim ** -0.5).softmax(-1)
        explicit.record("blk", layer, probs, (4, 4))
        fused.record_fused("blk", layer, q, k, dim ** -0.5)
    assert torch.allclose(fused.concept_map("blk"), explicit.concept_map("blk"), rtol=1e-5, atol=1e-6)
    layer = ResidualProjection(nn.Conv2d(8, 8, 1), "blk")
    layer.add_set("a", 3)
    layer.add_set("b", 2)
    for threshold in ("median", "mean"):
        index = {"a": 0, "b": 1}
        want = _MaskSource(explicit, "blk", index, LAGConfig(threshold=threshold))
        got = _MaskSource(fused, "blk", index, LAGConfig(threshold=threshold))
        laid_out = _MaskSource(fused, "blk", index, LAGConfig(threshold=threshold), layer)
        for name in index:
            mask, reference = got(name), want(name)
            assert mask.dtype == torch.bool and mask.shape == (rows, n)  # the conditional rows serve both halves
            assert torch.equal(mask.float(), reference[batch - rows:])
            if cfg:
                assert torch.equal(reference[:rows], reference[rows:])
            # laid out like the set's (B, r, N) middle: every row of the batch, each of the r channels
            dense = laid_out(name)
            assert dense.shape == (batch, layer.sets[name].rank, n)
            assert all(torch.equal(dense[:, c], reference) for c in range(dense.shape[1]))


@pytest.mark.parametrize("rows", [4, 2, 1], ids=["every-row", "cfg-two-rows", "cfg-shared"])
@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_bool_masks_apply_like_float_masks(linear, rows):
    torch.manual_seed(0)
    base = nn.Linear(8, 8) if linear else nn.Conv2d(8, 8, 1)
    layer = ResidualProjection(base, "blk")
    layer.add_set("a", 2)
    with torch.no_grad():
        layer.sets["a"].up.normal_()
    layer.scales["a"] = 0.7
    x = torch.randn(4, 16, 8) if linear else torch.randn(4, 8, 4, 4)
    mask = torch.rand(rows, 16) > 0.5
    layer.mask_source = lambda name: mask.float().repeat(4 // rows, 1)  # rows repeat per group, as CFG's halves
    want = layer(x)
    layer.mask_source = lambda name: mask
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-6)
    laid_out = layer.layout_mask(mask, 4, "a")  # what LAG's CUDA path hands: the middle's own layout
    assert laid_out.shape == ((4, 16, 2) if linear else (4, 2, 16)) and laid_out.is_contiguous()
    layer.mask_source = lambda name: laid_out
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-6)
    layer.mask_source = None
    full = layer(x)
    assert (want - layer.original(x)).abs().max() > 1e-3  # the mask lets part of the residual through ...
    assert (want - full).abs().max() > 1e-3  # ... and holds part back


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_masks_and_the_merged_path_under_a_hooked_or_float8_stored_projection(linear):
    """A proj_out with a hook of its own, or stored in float8 by diffusers' layerwise casting: LAG's laid-out masks
    stay in a dtype the middle can take, and the merged training path still runs the layer's own call."""
    from prkit.fast_patches import patch_merged_lowrank

    torch.manual_seed(0)
    base = nn.Linear(8, 8) if linear else nn.Conv2d(8, 8, 1)
    base.register_forward_hook(lambda module, args, out: out * 1.5)
    unet = nn.Module()  # a stand-in block with one transformer-like child, as find_projections looks for them
    unet.blk = nn.Module()
    unet.blk.proj_out, unet.blk.proj_in, unet.blk.transformer_blocks = base, nn.Identity(), nn.ModuleList()
    prkit.add_residuals(unet, rank=2, name="a")
    layer = unet.blk.proj_out
    with torch.no_grad():
        layer.sets["a"].up.normal_()
    x = torch.randn(4, 16, 8) if linear else torch.randn(4, 8, 4, 4)
    want = layer(x)
    undo = patch_merged_lowrank(unet)
    try:
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)  # the hook's x1.5 is kept
    finally:
        undo()
    mask = torch.rand(4, 16) > 0.5
    layer.mask_source = lambda name: mask.float()
    masked = layer(x)
    weight = layer.weight.data
    layer.weight.data = weight.to(torch.float8_e4m3fn)  # as layerwise casting stores it between calls
    laid_out = layer.layout_mask(mask, 4, "a")
    assert laid_out.dtype == torch.float32
    layer.weight.data = weight
    layer.mask_source = lambda name: laid_out
    torch.testing.assert_close(layer(x), masked, rtol=1e-5, atol=1e-6)


def test_graphs_are_a_no_op_off_cuda(pipe, concept):
    with graphed_unet(pipe.unet) as runner:
        assert runner is None and "forward" not in pipe.unet.__dict__
    residuals = prkit.add_residuals(pipe.unet, token=concept.token, class_word=concept.class_word, seed=0)
    images = prkit.generate(pipe, "a photo of a sks dog", residuals, steps=2, fast=True, output_type="pt")
    assert torch.isfinite(images).all()


def test_long_self_attention_prefers_cudnn_attention_and_undo(monkeypatch):
    from conftest import run_unet, unet_inputs
    from tiny import tiny_unet

    from prkit import fast_patches

    unet = tiny_unet()
    inputs = unet_inputs()  # 8x8 latents: 64 query tokens in the first blocks, 16 in the second
    reference = run_unet(unet, inputs)
    original = unet.attn_processors
    orders = []
    real = fast_patches._sdpa_order
    monkeypatch.setattr(fast_patches, "_sdpa_order", lambda names: orders.append(names) or real(names))
    undo = fast_patches.patch_long_query_attention(unet, min_tokens=64)
    assert torch.allclose(run_unet(unet, inputs), reference, rtol=1e-5, atol=1e-6)
    calls = sum(1 for p in unet.attn_processors.values() if p.min_tokens == 64)
    assert calls == len(original) and orders and all(o[0] == "cudnn" for o in orders)
    assert len(orders) == 3  # the self-attention of the 3 transformer blocks at 8x8 (1 down, 2 up); not cross
    seen = []  # the context each wrapped call handed on, however it was passed
    proc = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor
    monkeypatch.setattr(proc, "inner", lambda attn, hidden, *a, **k: seen.append((a, k)) or hidden)
    hidden, text = torch.zeros(1, 64, 4), torch.zeros(1, 77, 4)
    orders.clear()
    proc(None, hidden, text)
    proc(None, hidden, encoder_hidden_states=text)
    assert orders == [] and seen == [((text,), {}), ((), {"encoder_hidden_states": text})]
    proc(None, hidden)
    proc(None, hidden, None, None)
    proc(None, hidden, encoder_hidden_states=None)
    assert len(orders) == 3 and len(seen) == 5
    undo()
    assert all(unet.attn_processors[k] is v for k, v in original.items())


class _GainProcessor:
    """AttnProcessor2_0 with an extra keyword argument, ``gain`` (a custom processor's own cross_attention_kwargs)."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.standard, self.gains = AttnProcessor2_0(), []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        self.gains.append(gain)
        return self.standard(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * gain


def test_long_self_attention_hands_the_inner_processors_own_kwargs_on(monkeypatch):
    """diffusers' Attention hands a processor only the cross_attention_kwargs its ``__call__``'s signature names: the
    wrapper shows the inner processor's, so a custom processor's own argument reaches it, long self-attention
    (torch's order switched) and cross-attention alike, and the UNet computes what it does unwrapped. diffusers'
    AttnProcessor2_0 is shown as itself."""
    import inspect

    from diffusers.models.attention_processor import AttnProcessor2_0

    from prkit import fast_patches

    unet = tiny_unet()
    sample, t, text = unet_inputs()
    with torch.no_grad():
        plain = unet(sample, t, encoder_hidden_states=text).sample
    undo = fast_patches.patch_long_query_attention(unet, min_tokens=64)
    proc = next(iter(unet.attn_processors.values()))
    assert inspect.signature(proc.__call__) == inspect.signature(AttnProcessor2_0().__call__)
    undo()
    gain = _GainProcessor()
    unet.set_attn_processor(gain)
    with torch.no_grad():
        reference = unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs={"gain": 0.5}).sample
    assert gain.gains and set(gain.gains) == {0.5} and (reference - plain).abs().max() > 1e-3  # the kwarg matters
    calls = len(gain.gains)
    gain.gains.clear()
    orders = []
    real = fast_patches._sdpa_order
    monkeypatch.setattr(fast_patches, "_sdpa_order", lambda names: orders.append(names) or real(names))
    undo = fast_patches.patch_long_query_attention(unet, min_tokens=64)
    try:
        with torch.no_grad():
            out = unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs={"gain": 0.5}).sample
    finally:
        undo()
    assert gain.gains == [0.5] * calls and len(orders) == 3  # every layer got it, the 3 long self-attentions too
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert all(p is gain for p in unet.attn_processors.values())


def test_a_long_query_wrapper_copies_and_pickles_as_its_inner_processor_does():
    """The instance __call__ that shows diffusers the inner's signature was copied as is: a copy's __call__ ran the
    original wrapper, and the signature's default values had to deep-copy and pickle (a processor holding a lock as
    a default did not, though it copied and pickled alone)."""
    import copy
    import inspect
    import pickle
    import threading

    from prkit import fast_patches

    wrapper = fast_patches._LongQueryAttention(_LockedProcessor(), 64)
    for made in (copy.copy(wrapper), copy.deepcopy(wrapper), pickle.loads(pickle.dumps(wrapper))):
        assert made.__call__.args[0] is made and made.min_tokens == 64
        assert list(inspect.signature(made.__call__).parameters) == ["attn", "hidden_states", "lock"]
    assert isinstance(inspect.signature(wrapper.__call__).parameters["lock"].default, type(threading.Lock()))


class _LockedProcessor:
    def __call__(self, attn, hidden_states, lock=None):
        return hidden_states


_LockedProcessor.__call__.__defaults__ = (__import__("threading").Lock(),)


@pytest.mark.parametrize("residual_connection", [False, True])
def test_direct_cudnn_self_attention_computes_what_the_processor_does(monkeypatch, residual_connection):
    """The long self-attention calls cuDNN's kernel itself (torch's process-wide order is never switched): on the
    CPU the kernel is stood in for by the math one, and the layer must give what AttnProcessor2_0 gives, rescale and
    residual included; where cuDNN cannot take a call, torch's own choice runs."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from prkit import fast_patches

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, residual_connection=residual_connection,
                     rescale_output_factor=2.0 if residual_connection else 1.0)
    attn.set_processor(AttnProcessor2_0())
    hidden = torch.randn(2, 64, 16, requires_grad=True)
    reference = attn(hidden)
    calls, orders = [], []

    def kernel(q, k, v, bias, lse, dropout, causal, debug):
        calls.append((lse, bias, dropout, causal))
        return (F.scaled_dot_product_attention(q, k, v), None)

    monkeypatch.setattr(fast_patches, "_cudnn_device", lambda t: True)
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", lambda params: True)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", kernel)
    real = fast_patches._sdpa_order
    monkeypatch.setattr(fast_patches, "_sdpa_order", lambda names: orders.append(names) or real(names))
    undo = fast_patches.patch_long_query_attention(_Holder(attn), 64)
    try:
        out = attn(hidden)
        torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
        assert calls == [(True, None, 0.0, False)] and orders == []  # the kernel, asked for backward's logsumexp
        with torch.no_grad():
            attn(hidden)
        assert calls[-1][0] is False
        monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", lambda params: False)
        torch.testing.assert_close(attn(hidden), reference, rtol=1e-6, atol=1e-6)
        assert len(calls) == 2 and orders == []
        short = torch.randn(2, 63, 16)  # below min_tokens: the processor itself
        torch.testing.assert_close(attn(short), AttnProcessor2_0()(attn, short))
        assert len(calls) == 2
    finally:
        undo()
    assert type(attn.processor) is AttnProcessor2_0


class _Holder(nn.Module):
    """One attention layer as a model with diffusers' attn_processors / set_attn_processor."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    @property
    def attn_processors(self):
        return {"attn.processor": self.attn.processor}

    def set_attn_processor(self, procs):
        self.attn.set_processor(procs["attn.processor"])


def test_long_self_attention_leaves_torchs_order_alone_for_other_threads(monkeypatch):
    """A UNet forward on the direct path never switches the process-wide SDPA order (a background thread encodes
    the prompt meanwhile and must see one order throughout)."""
    from prkit import fast_patches

    unet = tiny_unet()
    inputs = unet_inputs()
    reference = run_unet(unet, inputs)
    switched = []
    monkeypatch.setattr(fast_patches, "_cudnn_device", lambda t: True)
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", lambda params: False)
    monkeypatch.setattr(fast_patches, "_sdpa_order", lambda names: switched.append(names))
    undo = fast_patches.patch_long_query_attention(unet, min_tokens=64)
    try:
        torch.testing.assert_close(run_unet(unet, inputs), reference, rtol=1e-5, atol=1e-6)
    finally:
        undo()
    assert switched == []


def test_the_long_self_attention_keeps_cudnn_enabled_and_older_torch_switches(monkeypatch):
    """A backend list without cuDNN still lets the long self-attention reach it (cuDNN enabled, last); a torch
    without the direct call's signatures takes the old way, the order switched around the call."""
    from prkit import fast_patches

    assert fast_patches.backend_order(FastConfig(sdpa_backends=("flash", "math"))) == ("flash", "math", "cudnn")
    assert fast_patches.backend_order(FastConfig(sdpa_backends=("flash", "math"), cudnn_attention_from=None)) == \
        ("flash", "math")
    assert fast_patches.backend_order(FastConfig()) == ("flash", "efficient", "cudnn", "math")
    unet = tiny_unet()
    inputs = unet_inputs()
    reference = run_unet(unet, inputs)
    switched = []
    monkeypatch.setattr(fast_patches, "_DIRECT_CUDNN", False)
    monkeypatch.setattr(fast_patches, "_cudnn_device", lambda t: True)
    real = fast_patches._sdpa_order
    monkeypatch.setattr(fast_patches, "_sdpa_order", lambda names: switched.append(names) or real(names))
    undo = fast_patches.patch_long_query_attention(unet, min_tokens=64)
    try:
        torch.testing.assert_close(run_unet(unet, inputs), reference, rtol=1e-5, atol=1e-6)
    finally:
        undo()
    assert len(switched) == 3 and all(names[0] == "cudnn" for names in switched)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN's attention)")
def test_cuda_long_self_attention_calls_cudnn_itself_with_the_same_numbers():
    """SD1.5's 64x64 self-attention shape: the direct call gives what AttnProcessor2_0 gives with cuDNN first in
    torch's order (forward and gradients), and torch's order is the same before, during and after."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from prkit import fast_patches

    torch.manual_seed(0)
    attn = Attention(320, heads=8, dim_head=40).cuda().to(torch.bfloat16)
    attn.set_processor(AttnProcessor2_0())
    hidden = torch.randn(2, 4096, 320, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(hidden)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        reference = attn(hidden)
        (ref_grad,) = torch.autograd.grad(reference, hidden, grad_out)
    order = torch._C._get_sdp_priority_order()
    seen = []
    real = torch.ops.aten._scaled_dot_product_cudnn_attention

    def kernel(*args):
        seen.append(torch._C._get_sdp_priority_order())
        return real(*args)

    undo = fast_patches.patch_long_query_attention(_Holder(attn), 4096)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", kernel)
            out = attn(hidden)
            (grad,) = torch.autograd.grad(out, hidden, grad_out)
    finally:
        undo()
    assert seen == [order] and torch._C._get_sdp_priority_order() == order
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    # cuDNN's backward is not bitwise reproducible (its dQ sums in any order: 57-697 of 2.6M elements 1 ulp apart,
    # up to 1.2e-4, in two H200 runs); the forward, equal bit for bit, shows the call went to cuDNN
    torch.testing.assert_close(grad, ref_grad, rtol=1.6e-2, atol=2e-4)


def test_lean_blocks_keep_attention_masks_and_4d_inputs():
    """lean_blocks' attention read neither attention_mask nor encoder_attention_mask (it attended to every token)
    and took no 4-D input: such calls go to diffusers' AttnProcessor2_0 and compute what the unpatched UNet does."""
    from prkit.fast_patches import _LeanAttnProcessor, patch_lean_blocks

    unet = tiny_unet()
    inputs = unet_inputs()
    sample, t, text = inputs
    keep = torch.ones(2, text.shape[1], dtype=torch.bool)
    keep[0, 5:], keep[1, 9:] = False, False  # each prompt's padding
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 16, attn.query_dim, generator=gen)
    self_mask = torch.rand(2, 16, 16, generator=gen) > 0.3
    image = torch.randn(2, attn.query_dim, 4, 4, generator=gen)  # (B, C, H, W): attention over the H*W positions
    with torch.no_grad():
        masked = unet(sample, t, encoder_hidden_states=text, encoder_attention_mask=keep).sample
        plain = run_unet(unet, inputs)
        ref_self, ref_image = attn(tokens, attention_mask=self_mask), attn(image)
    assert (masked - plain).abs().max() > 1e-3 and (ref_self - attn(tokens)).abs().max() > 1e-3  # masks matter
    undo = patch_lean_blocks(unet)
    try:
        assert type(attn.processor) is _LeanAttnProcessor
        with torch.no_grad():
            torch.testing.assert_close(unet(sample, t, encoder_hidden_states=text, encoder_attention_mask=keep).sample,
                                       masked, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(run_unet(unet, inputs), plain, rtol=1e-5, atol=1e-6)  # the lean path itself
            assert torch.equal(attn(tokens, attention_mask=self_mask), ref_self)
            assert torch.equal(attn(image), ref_image) and ref_image.shape == image.shape
    finally:
        undo()


def test_warm_up_overlaps_the_latents_and_changes_nothing(tmp_path, concept_module, eager_run, monkeypatch):
    import threading

    reference, state = eager_run
    where = {}
    real_warm, real_encode = fast.TrainStep.warm_up, train.encode_images

    def warm_up(self):
        where["warm_up"] = threading.current_thread()
        where["grads_before"] = [p.grad for p in self.params]
        real_warm(self)
        where["grads_after"] = [p.grad for p in self.params]
        where["optimizer_state"] = dict(self.optimizer.state)

    def encode_images(*args, **kwargs):
        where.setdefault("encode", threading.current_thread())
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(fast.TrainStep, "warm_up", warm_up)
    monkeypatch.setattr(train_inputs, "encode_images", encode_images)
    loop = FastConfig(cuda_graph=False, check_every=3, warm_up=True)
    result = _fast(make_pipe(tmp_path), concept_module, loop=loop, steps=8)
    assert where["warm_up"] is threading.main_thread() and where["encode"] is not threading.main_thread()
    assert all(g is None for g in where["grads_before"] + where["grads_after"])
    assert where["optimizer_state"] == {}  # the warm-up took no optimizer step
    assert result.completed and result.losses == pytest.approx(reference.losses, rel=1e-5)
    assert _close_states(result.residuals.state_dict(), state)


def test_the_optimizer_state_made_before_a_capture_is_what_a_first_step_makes():
    """A step captured before any eager step needs AdamW's state made first (made inside the capture, every replay
    would zero the moments again): made by AdamW itself, then put back to its start; the parameters, their gradients
    and a resumed state are kept."""
    from prkit.fast_step import init_optimizer_state, make_optimizer

    torch.manual_seed(0)
    first = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))]
    second = [nn.Parameter(p.detach().clone()) for p in first]
    values = [p.detach().clone() for p in first]
    grads = [[torch.randn_like(p) for p in first] for _ in range(2)]
    lazy, made = (make_optimizer(ps, 1e-2, 1e-2, torch.device("cpu")) for ps in (first, second))
    kept_grad = second[0].grad = torch.ones_like(second[0])
    init_optimizer_state(made, second)
    assert second[0].grad is kept_grad and second[1].grad is None
    assert all(torch.equal(p, v) for p, v in zip(second, values))
    assert all(float(made.state[p]["step"]) == 0 and not made.state[p]["exp_avg"].any()
               and not made.state[p]["exp_avg_sq"].any() for p in second)
    for step in range(2):
        for ps, opt in ((first, lazy), (second, made)):
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone()
            opt.step()
            if step == 0 and opt is made:  # a state that exists (a resumed run's) is left alone
                before = {k: v.clone() for k, v in made.state[second[0]].items()}
                init_optimizer_state(made, second)
                assert all(torch.equal(before[k], v) for k, v in made.state[second[0]].items())
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(p, v) for p, v in zip(first, values))
    for a, b in zip(first, second):
        assert all(torch.equal(lazy.state[a][k], made.state[b][k]) for k in lazy.state[a])


def test_the_optimizer_state_is_made_whole_or_not_at_all_when_interrupted():
    """AdamW's state is made by one step at learning rate 0 (no copy of the parameters) and zeroed: a Ctrl-C in
    between waits for both, so the checkpoint the interrupt writes keeps no stepped state (step 1, decayed weights)."""
    import os
    import signal

    from prkit.fast_step import init_optimizer_state, make_optimizer

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))]
    values = [p.detach().clone() for p in params]
    opt = make_optimizer(params, 1e-2, 1e-1, torch.device("cpu"))
    opt.register_step_post_hook(lambda *args: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        init_optimizer_state(opt, params)
    assert opt.param_groups[0]["lr"] == 1e-2 and all(p.grad is None for p in params)
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert all(float(opt.state[p]["step"]) == 0 and not opt.state[p]["exp_avg"].any() for p in params)


def test_the_optimizer_state_is_not_made_ahead_on_a_path_that_would_not_keep_the_parameters():
    """AdamW's capturable for-loop path divides 0 by 0 at learning rate 0 (NaN parameters), and a differentiable one
    refuses the step after counting it: the state is not made ahead there (the step then runs eagerly first)."""
    from prkit.fast_step import init_optimizer_state

    for kwargs in (dict(capturable=True, foreach=False), dict(capturable=True), dict(differentiable=True)):
        params = [nn.Parameter(torch.ones(3))]
        opt = torch.optim.AdamW(params, lr=1e-2, **kwargs)
        assert init_optimizer_state(opt, params) is False and not opt.state, kwargs
        assert torch.equal(params[0].detach(), torch.ones(3))
    params = [nn.Parameter(torch.ones(3))]
    opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    assert init_optimizer_state(opt, params) and float(opt.state[params[0]]["step"]) == 0
    assert init_optimizer_state(opt, params)  # made already: nothing to do


def test_no_capture_first_under_cudnns_benchmark_mode_or_after_it_failed(monkeypatch):
    """cuDNN's benchmark mode times kernels, which a capture cannot: set by the caller (prkit.world.train does) as
    well as by FastConfig.cudnn_benchmark, every run paid a failed capture (and its reserved pool) first. A key
    whose capture failed is not tried again."""
    from prkit import fast_warmup

    key = ("thread", "unet", 4)
    assert fast_warmup.capture_first(FastConfig(), key)
    assert not fast_warmup.capture_first(FastConfig(capture_first=False), key)
    assert not fast_warmup.capture_first(FastConfig(cudnn_benchmark=True), key)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert not fast_warmup.capture_first(FastConfig(), key)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(fast_warmup, "_CAPTURE_FIRST_FAILED", set())
    fast_warmup.capture_first_failed(key)
    assert not fast_warmup.capture_first(FastConfig(), key) and fast_warmup.capture_first(FastConfig(), key + (1,))


def test_a_failed_capture_is_told_by_its_cause():
    """CUDA reports a failed operation inside a capture again when the capture ends, and that multi-line error
    replaced the cause in the log."""
    from prkit.fast_step import _capture_cause

    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nCUDA kernel "
                               "errors might be asynchronously reported")
    except RuntimeError as err:
        assert _capture_cause(err) == "RuntimeError: operation not permitted when stream is capturing"
    assert _capture_cause(ValueError("one\ntwo")) == "ValueError: one"


def test_a_failed_run_does_not_wait_for_queued_encodings():
    import threading

    from prkit.fast_warmup import Encoder

    gate, ran = threading.Event(), []
    threading.Timer(0.3, gate.set).start()  # the running encoding ends after the run has failed
    with pytest.raises(RuntimeError, match="text failed"):
        with Encoder() as encoder:
            running = encoder.executor().submit(gate.wait, 10)
            queued = encoder.executor().submit(ran.append, 1)
            raise RuntimeError("text failed")
    assert running.done() and queued.cancelled() and ran == []  # the running one was waited for, not the next


def _record_steppers(monkeypatch) -> list:
    steppers = []
    real_close = fast.TrainStep.close
    monkeypatch.setattr(fast.TrainStep, "close", lambda self: steppers.append(
        (self.graph is not None, self.capture_error, self.first_capture_error, self.calls)) or real_close(self))
    return steppers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a CUDA graph)")
@pytest.mark.parametrize("warm_up, precision, checkpointing", [(False, "auto", False), (True, "auto", False),
                                                                (True, "fp16", False), (True, "auto", True)])
def test_cuda_a_step_captured_before_any_eager_step_trains_as_one_captured_after(tmp_path, concept_module,
                                                                                 monkeypatch, warm_up, precision,
                                                                                 checkpointing):
    """The default captures the step before it ever ran (in the warm-up, beside the latents' encoding, where one
    runs): AdamW's state is made first, and the run gives the losses and weights of one eager step then capture
    (fp16's grad scaler and gradient checkpointing included)."""
    steppers = _record_steppers(monkeypatch)
    kw = dict(steps=6, batch_size=2, progress=False, mixed_precision=precision, gradient_checkpointing=checkpointing)
    runs = []
    for first in (False, True):
        pipe = make_pipe(tmp_path / f"p{first}").to("cuda")
        loop = FastConfig(check_every=3, capture_first=first, warm_up=warm_up)
        result = prkit.train_residuals(pipe, concept_module, fast=loop, **kw)
        runs.append((result.losses, {k: v.cpu() for k, v in result.residuals.state_dict().items()}))
    assert steppers == [(True, None, None, 6)] * 2
    (losses0, state0), (losses1, state1) = runs
    assert len(set(losses0)) == 6 and losses1 == pytest.approx(losses0, rel=1e-5)
    assert all(torch.allclose(state1[k], state0[k], rtol=1e-5, atol=1e-7) for k in state0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a CUDA graph)")
def test_cuda_a_capture_that_fails_midway_falls_back_to_one_eager_step(tmp_path, concept_module, monkeypatch):
    """A UNet that reads a value to the host on its first call only: the capture before any eager step fails mid-way
    (CUDA invalidates it), the loop logs the cause, runs one eager step, captures (in a pool of its own: the failed
    capture's pool refused another capture) and trains as a run without the failure."""
    steppers = _record_steppers(monkeypatch)
    kw = dict(steps=6, batch_size=2, progress=False)
    reference = prkit.train_residuals(make_pipe(tmp_path / "r").to("cuda"), concept_module,
                                      fast=FastConfig(check_every=3, capture_first=False), **kw)
    pipe = make_pipe(tmp_path / "f").to("cuda")
    calls = []

    def first_call_reads(module, args):
        if not calls:
            calls.append(float(args[0].float().sum()))  # a host read: not allowed while capturing

    hook = pipe.unet.register_forward_pre_hook(first_call_reads)
    try:
        result = prkit.train_residuals(pipe, concept_module, fast=FastConfig(check_every=3), **kw)
    finally:
        hook.remove()
    (graph, error, first_error, count), = steppers[1:]
    assert graph and error is None and count == 6 and first_error and "\n" not in first_error
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the failed capture gave the stream back
    assert "previous error during capture" not in first_error
    assert result.losses == pytest.approx(reference.losses, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a CUDA graph)")
def test_cuda_a_failed_capture_before_any_eager_step_falls_back_to_one_eager_step(tmp_path, concept_module,
                                                                                 monkeypatch):
    steppers = _record_steppers(monkeypatch)
    real_graph = torch.cuda.graph

    def graph(*args, capture_error_mode="global", **kwargs):
        if capture_error_mode == "relaxed":
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_graph(*args, capture_error_mode=capture_error_mode, **kwargs)

    kw = dict(steps=6, batch_size=2, progress=False)
    reference = prkit.train_residuals(make_pipe(tmp_path / "r").to("cuda"), concept_module,
                                      fast=FastConfig(check_every=3, capture_first=False), **kw)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    result = prkit.train_residuals(make_pipe(tmp_path / "f").to("cuda"), concept_module,
                                   fast=FastConfig(check_every=3, warm_up=True), **kw)
    assert steppers[1:] == [(True, None, "RuntimeError: operation not permitted when stream is capturing", 6)]
    assert result.losses == pytest.approx(reference.losses, rel=1e-5)


def test_the_latents_encode_beside_the_prompt_and_a_capture_waits_for_them(tmp_path, concept_module, eager_run,
                                                                          monkeypatch):
    """On a process's first run the images go to the background encoder before the prompt is encoded (both at
    once); a step that will be captured is prepared only once the latents are done (a capture beside the encoder
    kept both memories reserved, and an out-of-memory retry there would empty the allocator's cache mid-capture)."""
    import threading

    reference, state = eager_run
    latents_started, seen = threading.Event(), {}
    real_images, real_text = train_inputs.encode_images, train_inputs.encode_text
    real_init, real_prepare = fast.TrainStep.__init__, fast.TrainStep.prepare

    def encode_images(*args, **kwargs):
        latents_started.set()
        out = real_images(*args, **kwargs)
        seen["latents_done"] = True
        return out

    def encode_text(*args, **kwargs):
        seen.setdefault("latents_began_first", latents_started.wait(10))
        return real_text(*args, **kwargs)

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.capture_first = True  # as on CUDA: a capture is tried first (it cannot on a CPU: eager warm-up then)

    def prepare(self):
        seen["latents_done_at_prepare"] = seen.get("latents_done", False)
        real_prepare(self)

    monkeypatch.setattr(train_inputs, "encode_images", encode_images)
    monkeypatch.setattr(train_inputs, "encode_text", encode_text)
    monkeypatch.setattr(fast.TrainStep, "__init__", init)
    monkeypatch.setattr(fast.TrainStep, "prepare", prepare)
    monkeypatch.setattr(fast.TrainStep, "capture", lambda self: setattr(self, "capture_first", False) or False)
    result = _fast(make_pipe(tmp_path), concept_module, loop=FastConfig(cuda_graph=False, check_every=3,
                                                                        warm_up=True), steps=8)
    assert seen == {"latents_began_first": True, "latents_done": True, "latents_done_at_prepare": True}
    assert result.losses == pytest.approx(reference.losses, rel=1e-5)
    assert _close_states(result.residuals.state_dict(), state)


def test_the_background_encoders_error_reaches_the_caller(tmp_path, concept, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the VAE failed")

    monkeypatch.setattr(train_inputs, "encode_images", broken)
    pipe = make_pipe(tmp_path)
    with pytest.raises(RuntimeError, match="the VAE failed"):
        _fast(pipe, concept, loop=FastConfig(cuda_graph=False, warm_up=True), steps=2)
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_latent_shape_matches_the_encoder(pipe, concept):
    mean, _ = train.encode_images(pipe, concept.tensors()[:1])
    assert fast.warmup.latent_shape(pipe, concept.tensors().shape[-1]) == tuple(mean.shape[1:])


def test_triton_prepare_is_a_harmless_thread():
    from prkit import kernels

    thread = kernels.prepare()
    if kernels.triton is None:
        assert thread is None
        return
    thread.join(timeout=60)
    assert not thread.is_alive() and thread.daemon


def test_warm_up_runs_once_per_unet_and_shapes(tmp_path, concept, monkeypatch):
    calls = []
    real = fast.TrainStep.warm_up
    monkeypatch.setattr(fast.TrainStep, "warm_up", lambda self: calls.append(1) or real(self))
    pipe, loop = make_pipe(tmp_path), FastConfig(cuda_graph=False, warm_up=True)
    for _ in range(2):
        _fast(pipe, concept, loop=loop, steps=1)
        prkit.remove_residuals(pipe.unet, "default")
    assert len(calls) == 1  # the second run found its kernels loaded
    train_fast(pipe, concept, TrainConfig(batch_size=2, steps=1), progress=False, fast=loop)
    assert len(calls) == 2  # other shapes: warmed again


def test_side_streams_are_created_once_per_device_and_role(monkeypatch):
    from prkit import streams

    made = []

    class Stream:  # stand-in: streams need CUDA, the caching does not
        def __init__(self, device):
            made.append(device)

    monkeypatch.setattr(streams, "_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    first = streams.side_stream(torch.device("cuda", 0))
    assert streams.side_stream("cuda") is first and streams.side_stream(0) is first
    assert streams.side_stream("cuda:0", "lag") is not first and streams.side_stream("cuda:1") is not first
    assert made == [torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 1)]


def test_class_images_of_another_size_train_as_in_the_eager_loop(tmp_path, concept_module):
    """Each source gets a step slot of its own latent shape: prior images at another resolution than the concept's
    (load_concept's default 512 beside an SDXL concept at 1024) stopped the fast loop with a size mismatch."""
    prior = make_concept(token="zwx", resolution=32)  # the concept's images are 16 px
    kw = dict(steps=3, batch_size=2, prior_images=prior, seed=1)
    eager = prkit.train_residuals(make_pipe(tmp_path / "e"), concept_module, progress=False, fast=False, **kw)
    for loop in (LOOP, FastConfig(cuda_graph=False, warm_up=True)):
        got = train_fast(make_pipe(tmp_path / f"f{loop.warm_up}"), concept_module, TrainConfig(**kw),
                         progress=False, fast=loop)
        assert got.losses == pytest.approx(eager.losses, rel=1e-5)
        assert _close_states(got.residuals.state_dict(), eager.residuals.state_dict())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_fast_loop_trains_on_a_gpu_that_is_not_the_current_one(tmp_path, concept_module):
    """The capture, its streams and the Triton kernels follow the UNet's device: on cuda:1 with cuda:0 current the
    step was captured into an empty graph, whose replays trained nothing (the loss stayed at its first value)."""
    runs = {}
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        pipe = make_pipe(tmp_path / device.replace(":", "")).to(device)
        result = train_fast(pipe, concept_module, TrainConfig(batch_size=4, steps=6), progress=False,
                            fast=FastConfig(check_every=3))
        runs[device] = result.losses, {k: v.cpu() for k, v in result.residuals.state_dict().items()}
    (losses0, state0), (losses1, state1) = runs["cuda:0"], runs["cuda:1"]
    assert len(set(losses0)) == 6 and losses1 == pytest.approx(losses0, rel=1e-4)
    assert all(torch.allclose(state1[k], state0[k], rtol=1e-4, atol=1e-6) for k in state0)


@pytest.mark.parametrize("field, value", [("check_every", 0), ("check_every", -3), ("encode_batch", 0),
                                          ("cudnn_attention_from", 0), ("sdpa_backends", ("flash", "Efficient")),
                                          ("sdpa_backends", ())])
def test_bad_fast_switches_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"FastConfig.{field}"):
        FastConfig(**{field: value})
    assert FastConfig(sdpa_backends="cudnn,flash").sdpa_backends == ("cudnn", "flash")


FLAGS = ("cuda_graph", "capture_first", "frozen_conv", "channels_last", "fused_geglu", "merged_lowrank",
         "cudnn_benchmark", "lean_blocks", "warm_up")


@pytest.mark.parametrize("value", ["false", 1, 0.0])
@pytest.mark.parametrize("field", FLAGS)
def test_fast_switches_that_are_no_bool_are_refused(field, value):
    """FastConfig(channels_last="false") is truthy: it switched on what it was told to switch off."""
    with pytest.raises(ValueError) as err:
        FastConfig(**{field: value})
    assert str(err.value).startswith(f"FastConfig.{field} must be True or False")
    assert f"got {value!r}" in str(err.value)
    assert getattr(FastConfig(**{field: False}), field) is False
    assert FastConfig(warm_up=None).warm_up is None


@pytest.mark.parametrize("value", ["false", "True", 1, 0])
def test_train_config_fast_that_is_no_bool_is_refused(value):
    """TrainConfig(fast="false") chose the fast loop (train_residuals reads it as truthy)."""
    with pytest.raises(ValueError) as err:
        TrainConfig(fast=value)
    assert str(err.value).startswith(f"TrainConfig.fast must be True or False or None (or a prkit.fast.FastConfig), "
                                     f"got {value!r}")
    switches = FastConfig(cuda_graph=False)
    assert [TrainConfig(fast=v).fast for v in (True, False, None, switches)] == [True, False, None, switches]


def test_fp16_with_the_fast_loop_off_cuda_trains_as_the_eager_loop(tmp_path, concept_module):
    """GradScaler("cuda") turns itself off on a CPU; the fast loop touched its internals and stopped."""
    kw = dict(steps=3, batch_size=2, mixed_precision="fp16")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = prkit.train_residuals(make_pipe(tmp_path / "e"), concept_module, progress=False, fast=False, **kw)
    assert not [w for w in caught if "GradScaler" in str(w.message)]  # torch's warning about a scaler off CUDA
    got = train_fast(make_pipe(tmp_path / "f"), concept_module, TrainConfig(**kw), progress=False, fast=LOOP)
    # fp16 rounding over other CPU kernels (the frozen-conv backward): 1.2e-4 apart on a 16-core Xeon; a wrong batch
    # or update moves the loss by ~10%
    assert got.losses == pytest.approx(eager.losses, rel=2e-3)


def test_channels_last_comes_off_as_the_caller_had_it():
    from prkit.fast_nhwc import patch_channels_last
    from tiny import tiny_unet

    for layout in (torch.channels_last, torch.contiguous_format):
        unet = tiny_unet().to(memory_format=layout)
        weight = unet.conv_in.weight
        patch_channels_last(unet)()
        assert weight.is_contiguous(memory_format=layout) and weight.is_contiguous() == (
            layout == torch.contiguous_format)


def test_switches_that_cannot_act_are_said(tmp_path, concept_module, caplog):
    with caplog.at_level("WARNING", logger="prkit.train"):
        prkit.train_residuals(make_pipe(tmp_path / "ti"), concept_module, target="textual_inversion", steps=1,
                              fast=LOOP, progress=False, batch_size=2)
        prkit.train_residuals(make_pipe(tmp_path / "s"), concept_module, steps=2, stop_after=1, progress=False,
                              batch_size=2)
    assert "is ignored for target='textual_inversion'" in caplog.text
    assert "stop_after=1 without checkpoint_dir" in caplog.text


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_merged_lowrank_honours_scales_and_disabled_sets(linear):
    unet = tiny_unet(linear=linear)
    a = prkit.add_residuals(unet, rank=4, name="a", seed=0)
    b = prkit.add_residuals(unet, rank=4, name="b", seed=1)
    randomize(a, seed=1)
    randomize(b, seed=2)
    a.scale = 0.5
    inputs = unet_inputs()
    full_a = run_unet(unet, inputs)  # both on, a at 0.5
    b.disable()
    reference = run_unet(unet, inputs)  # a alone at 0.5
    a.scale = 1.0
    unit_a = run_unet(unet, inputs)
    a.scale = 0.5
    assert (reference - unit_a).abs().max() > 1e-3 and (reference - full_a).abs().max() > 1e-3
    undo = patch_merged_lowrank(unet)
    try:
        torch.testing.assert_close(run_unet(unet, inputs), reference, rtol=1e-4, atol=1e-5)
    finally:
        undo()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_a_large_trainable_state_is_snapshotted_in_host_memory(device, monkeypatch):
    """Rollback copies of a whole UNet's weights and moments (~10 GB on SD1.5) stay off the GPU; a rollback still
    restores the exact state, and state made after the snapshot starts fresh."""
    params = [nn.Parameter(torch.randn(64, 64, device=device)) for _ in range(3)]
    optimizer = torch.optim.AdamW(params, lr=1e-1)
    monkeypatch.setattr(fast._Snapshot, "HOST_FROM", 1)
    snap = fast._Snapshot(params, optimizer, None)
    before = [p.detach().clone() for p in params]
    snap.take()
    assert all(copy.device.type == "cpu" for _, copy in snap.saved)
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
    assert not torch.equal(params[0], before[0])
    snap.restore()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.count_nonzero(v) == 0 for p in params for v in optimizer.state[p].values() if v.dim())
    # the next window: the parameters keep their buffers, AdamW's new state gets its own, and a rollback is exact
    first = [copy for _, copy in snap.saved]
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    snap.take()
    middle = [p.detach().clone() for p in params] + [v.clone() for p in params for v in optimizer.state[p].values()]
    assert [copy for _, copy in snap.saved][:3] == first and len(snap.saved) == 3 + 3 * 3
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    snap.restore()
    now = [p.detach() for p in params] + [v for p in params for v in optimizer.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(now, middle))


def test_match_state_layouts_lays_each_moment_out_like_its_parameter():
    """An eager checkpoint's contiguous moments beside the fast loop's channels-last weights (and the reverse, and a
    flattened moment): each moment takes its parameter's shape and strides with its values kept, so fused AdamW,
    which reads them as laid out like the parameter, takes the step the plain AdamW takes."""
    from prkit.fast_step import match_state_layouts

    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 3, 3, 3, generator=gen)
    shapes = {"channels-last weight": (conv, torch.channels_last, torch.contiguous_format),
              "contiguous weight": (conv, torch.contiguous_format, torch.channels_last),
              "flattened moment": (torch.randn(6, 5, generator=gen), torch.contiguous_format, None)}
    params, moments, states = [], [], {}
    for weight, fmt, moment_fmt in shapes.values():
        p = nn.Parameter(weight.clone().contiguous(memory_format=fmt))
        avg, avg_sq = torch.randn(weight.shape, generator=gen), torch.rand(weight.shape, generator=gen)
        laid = [m.contiguous(memory_format=moment_fmt) if moment_fmt else m.flatten() for m in (avg, avg_sq)]
        states[p] = {"step": torch.tensor(3.0), "exp_avg": laid[0], "exp_avg_sq": laid[1]}
        params.append(p)
        moments.append((avg, avg_sq))
    assert all(states[p]["exp_avg"].stride() != p.stride() for p in params)
    steps = [states[p]["step"] for p in params]
    match_state_layouts(states, params)
    for p, (avg, avg_sq), step in zip(params, moments, steps):
        assert states[p]["step"] is step  # the step counter is no moment
        for key, want in (("exp_avg", avg), ("exp_avg_sq", avg_sq)):
            got = states[p][key]
            assert got.shape == p.shape and got.stride() == p.stride() and torch.equal(got, want)
    grads = [torch.randn(p.shape, generator=gen) for p in params]

    def step(fused: bool, state: dict) -> list[torch.Tensor]:
        copies = [nn.Parameter(p.detach().clone()) for p in params]
        optimizer = torch.optim.AdamW(copies, lr=0.1, weight_decay=1e-2, fused=fused)
        for copy, p, grad in zip(copies, params, grads):
            copy.grad = torch.empty_like(copy).copy_(grad)  # laid out like its parameter, as autograd makes it
            optimizer.state[copy] = {k: v.clone() for k, v in state[p].items()}
        optimizer.step()
        return [c.detach() for c in copies]

    plain = step(False, {p: {"step": torch.tensor(3.0), "exp_avg": a, "exp_avg_sq": s} for p, (a, s) in
                         zip(params, moments)})
    fused = step(True, states)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(fused, plain))
    assert all((a - p).abs().max() > 1e-2 for a, p in zip(plain, params))  # the step did move the weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (channels-last UNet, fused AdamW)")
@pytest.mark.parametrize("fast_first", [False, True], ids=["eager-then-fast", "fast-then-eager"])
def test_cuda_a_whole_unet_target_resumes_the_other_loops_checkpoint(tmp_path, concept_module, fast_first, monkeypatch):
    """DreamBooth's whole UNet, stopped at step 3 by one loop and resumed by the other: the eager loop's AdamW moments
    are contiguous, the fast loop's channels-last (its UNet runs so), and fused AdamW refused the mix. The resumed run
    ends where an uninterrupted eager run does."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 in both loops
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    kw = dict(target="dreambooth", steps=6, batch_size=2, learning_rate=1e-4, mixed_precision="no", progress=False)
    start = {k: v.clone() for k, v in make_pipe(tmp_path / "start").unet.state_dict().items()}
    reference = prkit.train_residuals(make_pipe(tmp_path / "ref").to("cuda"), concept_module, fast=False, **kw)
    want = {k: v.float().cpu() for k, v in reference.residuals.state_dict().items()}
    loops = [False, FastConfig(check_every=3)]
    ckpt = tmp_path / "ckpt"
    first = prkit.train_residuals(make_pipe(tmp_path / "p1").to("cuda"), concept_module, fast=loops[fast_first],
                                  checkpoint_dir=str(ckpt), checkpoint_every=3, stop_after=3, **kw)
    assert not first.completed and first.steps_done == 3
    saved = torch.load(ckpt / "checkpoint.pt", weights_only=False)["optimizer"]["state"].values()
    laid = [s["exp_avg"].is_contiguous() for s in saved if s["exp_avg"].dim() == 4 and s["exp_avg"].shape[-1] > 1]
    assert laid and all(c != fast_first for c in laid)  # the fast loop's moments are channels-last, the eager one's not
    second = prkit.train_residuals(make_pipe(tmp_path / "p2").to("cuda"), concept_module, fast=loops[not fast_first],
                                   checkpoint_dir=str(ckpt), checkpoint_every=3, **kw)
    assert second.completed and second.steps_done == 6 and second.losses[:3] == first.losses
    assert second.losses == pytest.approx(reference.losses, rel=1e-3)
    got = {k: v.float().cpu() for k, v in second.residuals.state_dict().items()}
    moved = sum((want[k] - start[k].float()).square().sum() for k in want).sqrt()
    apart = sum((got[k] - want[k]).square().sum() for k in want).sqrt()
    assert moved > 0 and apart <= 0.05 * moved, (apart, moved)  # rounding apart, not a wrong step (~moved)


def _checkpointing(unet) -> dict:
    return {name: (m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"))
            for name, m in unet.named_modules() if hasattr(m, "gradient_checkpointing")}


def test_a_unet_checkpointed_by_its_owner_trains_with_the_loops_checkpointing_and_gets_its_own_back(
        tmp_path, concept_module, eager_run, monkeypatch):
    """unet.enable_gradient_checkpointing(fn) before training: the fast loop checkpoints with its RNG-free function
    (the owner's, diffusers' by default, saves RNG states, which a CUDA graph capture refuses), trains as the eager
    loop does, and leaves every block with the owner's setting and function (diffusers' disable dropped both)."""
    from prkit import fast_patches

    reference, state = eager_run
    owner_calls, loop_calls = [], []

    def owner_fn(module, *args):
        owner_calls.append(1)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    real = fast_patches._checkpoint
    monkeypatch.setattr(fast_patches, "_checkpoint", lambda module, *args: loop_calls.append(1) or real(module, *args))
    pipe = make_pipe(tmp_path)
    pipe.unet.enable_gradient_checkpointing(owner_fn)
    pipe.unet.up_blocks[0].gradient_checkpointing = False  # the owner's own choice per block is kept too
    before = _checkpointing(pipe.unet)
    result = _fast(pipe, concept_module, steps=8)
    assert loop_calls and not owner_calls
    assert result.losses == pytest.approx(reference.losses, rel=1e-5)
    assert _close_states(result.residuals.state_dict(), state)
    assert _checkpointing(pipe.unet) == before and pipe.unet.is_gradient_checkpointing


def test_the_eager_loop_keeps_the_owners_checkpointing_function_and_checkpoints_only_while_asked(
        tmp_path, concept_module, eager_run):
    """gradient_checkpointing=True on a UNet its owner checkpoints with fn: the eager loop swapped in diffusers'
    default function, switched checkpointing off at the end, and train_residuals switched it back on with the
    default: the owner's fn was gone (and a block the owner left off came back on)."""
    reference, state = eager_run
    owner_calls = []

    def owner_fn(module, *args):
        owner_calls.append(1)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    pipe = make_pipe(tmp_path / "owned")
    pipe.unet.enable_gradient_checkpointing(owner_fn)
    pipe.unet.up_blocks[0].gradient_checkpointing = False
    before = _checkpointing(pipe.unet)
    result = prkit.train_residuals(pipe, concept_module, steps=8, gradient_checkpointing=True, fast=False, **EAGER)
    assert owner_calls  # trained through the owner's function
    assert result.losses == pytest.approx(reference.losses, rel=1e-5)
    assert _checkpointing(pipe.unet) == before
    plain = make_pipe(tmp_path / "plain")
    before = _checkpointing(plain.unet)
    prkit.train_residuals(plain, concept_module, steps=2, gradient_checkpointing=True, fast=False, **EAGER)
    assert _checkpointing(plain.unet) == before and not plain.unet.is_gradient_checkpointing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a CUDA graph)")
def test_cuda_a_unet_checkpointed_by_its_owner_still_trains_in_one_graph(tmp_path, concept_module, monkeypatch):
    """A UNet on which the user called enable_gradient_checkpointing(): diffusers' checkpointing function saves RNG
    states, which a graph capture refuses (the loop fell back to eager steps). The fast loop captures its step with
    its own, trains as the eager loop does, and leaves the owner's checkpointing as it was."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 in both loops
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    kw = dict(steps=6, batch_size=2, mixed_precision="no", progress=False)
    eager = prkit.train_residuals(make_pipe(tmp_path / "e").to("cuda"), concept_module, fast=False, **kw)
    pipe = make_pipe(tmp_path / "f").to("cuda")
    pipe.unet.enable_gradient_checkpointing()
    before = _checkpointing(pipe.unet)
    steppers = []
    real_close = fast.TrainStep.close
    monkeypatch.setattr(fast.TrainStep, "close", lambda self: steppers.append(
        (self.graph is not None, self.capture_error, self.calls)) or real_close(self))
    result = prkit.train_residuals(pipe, concept_module, fast=FastConfig(check_every=3), **kw)
    assert steppers == [(True, None, 6)]  # captured at the first step, replayed for the other five
    assert all(math.isfinite(v) for v in result.losses) and len(set(result.losses)) == 6
    assert result.losses == pytest.approx(eager.losses, rel=1e-3)
    assert _checkpointing(pipe.unet) == before and pipe.unet.is_gradient_checkpointing


def test_the_warm_up_key_follows_the_checkpointing_that_will_run(pipe, concept):
    """The loop checkpoints a UNet whose owner enabled it even with gradient_checkpointing=False; a warm-up done
    without checkpointing used to count for it (same key), and its first step paid the plans it had skipped."""
    from prkit import fast_warmup
    from prkit.fast import FastConfig
    from prkit.train import TrainConfig

    fast = FastConfig()
    plain = fast_warmup.key(pipe, concept, TrainConfig(), [], fast, None)
    asked = fast_warmup.key(pipe, concept, TrainConfig(gradient_checkpointing=True), [], fast, None)
    pipe.unet.enable_gradient_checkpointing()
    try:
        owner = fast_warmup.key(pipe, concept, TrainConfig(), [], fast, None)
    finally:
        pipe.unet.disable_gradient_checkpointing()
    assert plain != asked and owner == asked


def test_a_new_unet_at_a_collected_ones_address_inherits_no_warm_up(concept, monkeypatch):
    """The warm-up's memories keyed the UNet by id(): a new UNet given the address of one collected after its warm-up
    (or failed capture) was taken as warmed (its first step paid the one-time costs) or as failing to capture."""
    import gc
    from types import SimpleNamespace

    from prkit import fast_warmup

    class UNet:  # what key() reads of a UNet; a plain object, whose address CPython hands out again at once
        dtype = torch.float32

    monkeypatch.setattr(fast_warmup, "_WARMED", set())
    monkeypatch.setattr(fast_warmup, "_CAPTURE_FIRST_FAILED", set())
    loop, cpu, stepper = FastConfig(warm_up=True), torch.device("cpu"), SimpleNamespace(capture_first=False,
                                                                                          prepare=lambda: None)

    def key(unet) -> tuple:
        return fast_warmup.key(SimpleNamespace(unet=unet), concept, TrainConfig(), [], loop, None)

    def warm(unet) -> None:  # as the loop does: warmed up, after a capture before any eager step failed
        fast_warmup.capture_first_failed(key(unet))
        fast_warmup.warm_up_while_encoding(stepper, [], None, key(unet))

    old = UNet()
    warm(old)
    assert not fast_warmup.needed(key(old), loop, cpu) and not fast_warmup.capture_first(loop, key(old))
    address = id(old)
    del old
    gc.collect()
    kept, new = [], UNet()
    while id(new) != address and len(kept) < 10_000:
        kept.append(new)
        new = UNet()
    if id(new) != address:
        pytest.skip("no new object was given the collected one's address")
    assert fast_warmup.needed(key(new), loop, cpu) and fast_warmup.capture_first(loop, key(new))
    warm(new)  # its own warm-up still counts for it
    assert not fast_warmup.needed(key(new), loop, cpu) and not fast_warmup.capture_first(loop, key(new))


def test_a_new_thread_given_an_ended_ones_id_inherits_no_warm_up(concept, monkeypatch):
    """The warm-up's memories keyed the thread by threading.get_ident(), which a new thread is given once an old one
    has ended: the new thread (none of the old one's cuDNN plans) was taken as warmed, or as failing to capture."""
    import threading
    from types import SimpleNamespace

    from prkit import fast_warmup

    monkeypatch.setattr(fast_warmup, "_WARMED", set())
    monkeypatch.setattr(fast_warmup, "_CAPTURE_FIRST_FAILED", set())
    loop, cpu = FastConfig(warm_up=True), torch.device("cpu")

    class UNet:  # what key() reads of a UNet
        dtype = torch.float32

    unet = UNet()
    stepper = SimpleNamespace(capture_first=False, prepare=lambda: None)

    def key() -> tuple:
        return fast_warmup.key(SimpleNamespace(unet=unet), concept, TrainConfig(), [], loop, None)

    def in_thread(fn):
        out = {}
        thread = threading.Thread(target=lambda: out.update(ident=threading.get_ident(), value=fn()))
        thread.start()
        thread.join()
        return out["ident"], out["value"]

    def warm():  # as the loop does: warmed up, after a capture before any eager step failed
        fast_warmup.capture_first_failed(key())
        fast_warmup.warm_up_while_encoding(stepper, [], None, key())
        return fast_warmup.needed(key(), loop, cpu), fast_warmup.capture_first(loop, key())

    ident, state = in_thread(warm)
    assert state == (False, False)  # its own warm-up counts for the thread that did it
    for _ in range(200):  # CPython's threads usually get an ended thread's id at once
        again, state = in_thread(lambda: (fast_warmup.needed(key(), loop, cpu), fast_warmup.capture_first(loop, key())))
        if again == ident:
            break
    else:
        pytest.skip("no new thread was given the ended one's id")
    assert state == (True, True)


def test_a_collected_unets_keys_leave_the_warm_up_memories(concept, monkeypatch):
    import gc
    from types import SimpleNamespace

    from prkit import fast_warmup

    monkeypatch.setattr(fast_warmup, "_WARMED", set())
    monkeypatch.setattr(fast_warmup, "_CAPTURE_FIRST_FAILED", set())
    loop = FastConfig(warm_up=True)

    class UNet:
        dtype = torch.float32

    kept, gone = UNet(), UNet()
    for unet in (kept, gone):
        key = fast_warmup.key(SimpleNamespace(unet=unet), concept, TrainConfig(), [], loop, None)
        fast_warmup.capture_first_failed(key)
        fast_warmup._WARMED.add(key)
    assert len(fast_warmup._WARMED) == len(fast_warmup._CAPTURE_FIRST_FAILED) == 2
    del gone, unet
    gc.collect()
    assert [k[1]() for k in fast_warmup._WARMED] == [kept] == [k[1]() for k in fast_warmup._CAPTURE_FIRST_FAILED]
