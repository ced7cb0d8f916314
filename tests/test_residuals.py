"""Residual wrappers: parameter counts, identity at init / disabled / removed, merge, several sets, scales."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import prkit
from conftest import ARCHS, blocks_from_two_threads, randomize, run_unet, unet_inputs
from tiny import tiny_unet
from prkit.arch import build_unet
from prkit.files import layer_table
from prkit.residuals import ResidualProjection, find_projections, rank_for, residual_names, wrapped_layers


# --- full-size counts (meta device: no memory, no weights) --------------------------------------


@pytest.mark.parametrize("name, layers, count, ranks", [
    ("sd15", 16, 1_239_040, {320: 16, 640: 32, 1280: 64}),
    ("sd21", 16, 1_239_040, {320: 16, 640: 32, 1280: 64}),
    ("sdxl", 11, 1_187_840, {640: 32, 1280: 64}),  # SDXL's 320-channel stage has no transformer
])
def test_full_size_parameter_counts(name, layers, count, ranks):
    unet = build_unet(name, device="meta")
    residuals = prkit.add_residuals(unet)
    assert len(residuals.layers()) == layers
    assert residuals.num_parameters() == count
    channels = layer_table(unet)
    assert {channels[b]: r for b, r in residuals.ranks().items()} == ranks
    assert count == sum(2 * ranks[c] * c for c in channels.values())


def test_sd15_blocks_are_the_methods_sixteen():
    blocks = set(find_projections(build_unet("sd15", device="meta")))
    expected = {f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)}
    expected |= {"mid_block.attentions.0"}
    expected |= {f"up_blocks.{i}.attentions.{j}" for i in range(1, 4) for j in range(3)}
    assert blocks == expected


def test_rank_rule_fixed_int_and_fraction():
    unet = build_unet("sd15", device="meta")
    fixed = prkit.add_residuals(unet, rank=4, name="fixed")
    assert set(fixed.ranks().values()) == {4}
    assert fixed.num_parameters() == sum(2 * 4 * c for c in layer_table(unet).values())
    frac = prkit.add_residuals(unet, rank=0.1, name="frac")
    channels = layer_table(unet)
    assert {b: r for b, r in frac.ranks().items()} == {b: round(0.1 * c) for b, c in channels.items()}
    assert rank_for(320, 0.05) == 16 and rank_for(640, 0.05) == 32 and rank_for(1280, 0.05) == 64
    assert rank_for(32, 0.001) == 1  # a tiny fraction still gives rank 1
    assert rank_for(32, 1000) == 32  # a fixed rank is capped at the channels


@pytest.mark.parametrize("bad", [0, -1, 0.0, -0.5, True, "16", None, float("nan"), float("inf")])
def test_bad_rank_raises(bad):
    """NaN and infinity too (they raised 'cannot convert float NaN to integer' and an OverflowError), here and in
    TrainConfig, whose message names the field."""
    from tiny import tiny_unet

    with pytest.raises(ValueError, match="rank must be a positive"):
        prkit.add_residuals(tiny_unet(), rank=bad)
    with pytest.raises(ValueError, match=r"TrainConfig\.rank must be a positive"):
        prkit.TrainConfig(rank=bad)


def test_rank_dict_missing_block_raises():
    unet = build_unet("sd15", device="meta")
    with pytest.raises(ValueError, match="down_blocks"):
        prkit.add_residuals(unet, rank={"mid_block.attentions.0": 8})


def test_rank_dict_entries_follow_the_rank_rule():
    """A per-block rank is read like rank=: 0.05 a fraction of that block's channels (it gave rank 0, an empty set),
    a whole rank capped at the channels; 0, -1 and 2.5 are refused and the error names the block."""
    unet = tiny_unet()
    channels = layer_table(unet)
    frac = prkit.add_residuals(unet, rank={b: 0.25 for b in channels}, name="frac")
    assert frac.ranks() == {b: round(0.25 * c) for b, c in channels.items()} and frac.num_parameters() > 0
    with pytest.warns(UserWarning, match="exceeds the channels"):
        big = prkit.add_residuals(unet, rank={b: 1000 for b in channels}, name="big")
    assert big.ranks() == channels
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"rank .* for block 'down_blocks.0.attentions.0'"):
            prkit.add_residuals(unet, rank={b: bad for b in channels}, name="bad")
    assert residual_names(unet) == ["frac", "big"]


def test_a_per_block_rank_naming_no_block_is_refused_with_the_block_names():
    """A misspelt block in a rank dict was ignored: the set trained at ranks the caller had not asked for."""
    unet = tiny_unet()
    blocks = list(layer_table(unet))
    ranks = {**{b: 2 for b in blocks}, "down_blocks.0.attention.0": 8, "mid": 4}
    with pytest.raises(ValueError) as err:
        prkit.add_residuals(unet, rank=ranks, name="x")
    assert str(err.value) == ("add_residuals: rank names block(s) this UNet does not have: "
                              "'down_blocks.0.attention.0', 'mid'; give a rank for each of its blocks, by these "
                              f"names: {', '.join(map(repr, blocks))}")
    assert "'mid_block.attentions.0'" in str(err.value) and residual_names(unet) == []


def test_failed_add_leaves_the_unet_unchanged(unet):
    originals = find_projections(unet)
    ranks = {b: 2 for b in list(originals)[:-1]}  # the last block has no rank: fails late
    with pytest.raises(ValueError, match="no rank given"):
        prkit.add_residuals(unet, rank=ranks, name="x")
    assert residual_names(unet) == []
    assert all(unet.get_submodule(b).proj_out is m for b, m in originals.items())
    prkit.add_residuals(unet, rank=2, name="x")  # the name is free again
    kept = prkit.add_residuals(unet, rank=2, name="y")
    with pytest.raises(ValueError):
        prkit.add_residuals(unet, rank=ranks, name="z")
    assert residual_names(unet) == ["x", "y"] and kept.num_parameters() > 0


def test_same_name_twice_raises(unet):
    prkit.add_residuals(unet, name="a")
    with pytest.raises(ValueError, match="'a'"):
        prkit.add_residuals(unet, name="a")


@pytest.mark.parametrize("name", ["my.concept", "items", "", 3])
def test_a_name_no_module_dict_takes_is_refused_and_the_unet_left_alone(unet, name):
    """torch's own KeyError ("module name can't contain '.'", "attribute 'items' already exists") came part-way."""
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"residual set name .* cannot be used: give a non-empty string"):
        prkit.add_residuals(unet, name=name)
    assert prkit.residual_names(unet) == [] and unet.state_dict().keys() == before.keys()
    prkit.add_residuals(unet, name="my_concept")  # the suggestion works


def test_seeded_init_is_reproducible(arch):
    from tiny import tiny_unet
    from conftest import ARCHS

    a = prkit.add_residuals(tiny_unet(**ARCHS[arch]), seed=3).state_dict()
    b = prkit.add_residuals(tiny_unet(**ARCHS[arch]), seed=3).state_dict()
    c = prkit.add_residuals(tiny_unet(**ARCHS[arch]), seed=4).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith(".down"))
    assert all(not a[k].any() for k in a if k.endswith(".up"))  # one factor zero: identity at start
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith(".down"))


# --- identity invariants on tiny conv / linear / SDXL-like UNets ------------------------------------


def test_wraps_every_block_with_the_right_layer_type(unet, arch):
    blocks = find_projections(unet)
    originals = dict(blocks)
    prkit.add_residuals(unet)
    layers = wrapped_layers(unet)
    assert set(layers) == set(blocks) and len(layers) == 7
    for block, layer in layers.items():
        assert layer.original is originals[block]
        assert isinstance(layer.original, nn.Conv2d if arch == "conv" else nn.Linear)


def test_output_identical_at_init(unet):
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    prkit.add_residuals(unet)
    assert torch.equal(run_unet(unet, inputs), base)


def test_output_identical_when_disabled(unet):
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    residuals = prkit.add_residuals(unet)
    randomize(residuals)
    personal = run_unet(unet, inputs)
    assert (personal - base).abs().max() > 1e-3  # the set does change the output
    with prkit.residuals_disabled(unet):
        assert torch.equal(run_unet(unet, inputs), base)
    assert residuals.enabled and torch.equal(run_unet(unet, inputs), personal)
    residuals.disable()
    assert not residuals.enabled
    assert torch.equal(run_unet(unet, inputs), base)
    residuals.enable()
    assert torch.equal(run_unet(unet, inputs), personal)


def test_disabled_context_takes_a_handle_and_refuses_an_unknown_name(unet):
    """residuals_disabled(unet, handle) or a misspelled name disabled nothing: the set kept painting inside;
    remove_residuals(unet, handle) raised a KeyError saying no such set."""
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    dog = prkit.add_residuals(unet, name="dog")
    randomize(dog)
    personal = run_unet(unet, inputs)
    with prkit.residuals_disabled(unet, dog):
        assert torch.equal(run_unet(unet, inputs), base)
    assert dog.enabled and torch.equal(run_unet(unet, inputs), personal)
    with pytest.raises(KeyError, match=r"no residual set named 'dgo' on this UNet; present: \['dog'\]"):
        with prkit.residuals_disabled(unet, "dgo"):
            pass
    other = prkit.add_residuals(tiny_unet(), name="dog")
    with pytest.raises(ValueError, match="lives on another UNet"):
        with prkit.residuals_disabled(unet, other):
            pass
    assert dog.enabled
    prkit.remove_residuals(unet, dog)  # a handle there too (it said "no residual set named Residuals(...)")
    assert residual_names(unet) == [] and torch.equal(run_unet(unet, inputs), base)


def test_disabled_context_restores_state_on_error(unet):
    residuals = prkit.add_residuals(unet)
    with pytest.raises(KeyError):
        with prkit.residuals_disabled(unet):
            assert not residuals.enabled
            raise KeyError("boom")
    assert residuals.enabled


@pytest.mark.parametrize("other", ["residuals_disabled", "only_residuals"])
def test_disabled_blocks_from_two_threads_on_one_unet_run_one_after_the_other(unet, other):
    """residuals_disabled took no lock (only_residuals, lag_sampling and generate took the UNet's): a second
    thread's block switched the sets under the first one's. Now it waits for the first block to end."""
    prkit.add_residuals(unet, name="dog")
    prkit.add_residuals(unet, name="cat")

    def enter(name):
        if other == "only_residuals" and name == "cat":
            return prkit.only_residuals(unet, ["cat"])
        return prkit.residuals_disabled(unet, name)

    def active() -> set:
        return {n for layer in wrapped_layers(unet).values() for n, on in layer.active.items() if on}

    waited, seen = blocks_from_two_threads(enter, "dog", "cat", active)
    second_sees = {"dog"} if other == "residuals_disabled" else {"cat"}
    assert not waited and seen == {"first": {"cat"}, "second": second_sees}
    assert active() == {"dog", "cat"}


def test_remove_puts_back_the_same_modules(unet):
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    originals = find_projections(unet)
    residuals = prkit.add_residuals(unet)
    randomize(residuals)
    prkit.remove_residuals(unet)
    for block, original in originals.items():
        assert unet.get_submodule(block).proj_out is original
    assert not any(isinstance(m, ResidualProjection) for m in unet.modules())
    assert residual_names(unet) == []
    assert torch.equal(run_unet(unet, inputs), base)
    with pytest.raises(RuntimeError, match="removed"):
        residuals.num_parameters()


def test_remove_one_of_two_sets_keeps_the_other(unet):
    inputs = unet_inputs()
    originals = find_projections(unet)
    a = prkit.add_residuals(unet, name="a", seed=0)
    b = prkit.add_residuals(unet, name="b", seed=1)
    randomize(a, seed=1)
    randomize(b, seed=2)
    with prkit.only_residuals(unet, ["b"]):
        only_b = run_unet(unet, inputs)
    both = run_unet(unet, inputs)
    assert (both - only_b).abs().max() > 1e-3
    prkit.remove_residuals(unet, "a")
    assert residual_names(unet) == ["b"]
    assert torch.equal(run_unet(unet, inputs), only_b)
    assert b.num_parameters() > 0
    with pytest.raises(KeyError, match="'a'"):
        prkit.remove_residuals(unet, "a")
    prkit.remove_residuals(unet, "b")
    assert all(unet.get_submodule(k).proj_out is v for k, v in originals.items())


@pytest.mark.parametrize("conv", [True, False])
def test_layer_output_is_base_plus_scaled_deltas(conv):
    torch.manual_seed(0)
    base = nn.Conv2d(8, 8, 1) if conv else nn.Linear(8, 8)
    layer = ResidualProjection(base, "block")
    a, b = layer.add_set("a", 2), layer.add_set("b", 3)
    with torch.no_grad():
        for p in (a.up, b.up):
            p.normal_()
    x = torch.randn(2, 8, 3, 3) if conv else torch.randn(2, 9, 8)
    layer.scales.update(a=0.7, b=-1.5)
    d_a, d_b = a.delta_weight().detach(), b.delta_weight().detach()

    def dense(weight):  # apply a (C, C) matrix over channels
        return torch.einsum("oc,bchw->bohw", weight, x) if conv else x @ weight.T

    expected = base(x) + 0.7 * dense(d_a) + (-1.5) * dense(d_b)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_scale_is_linear_in_the_residual_and_zero_is_base(unet):
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    a = prkit.add_residuals(unet, name="a")
    b = prkit.add_residuals(unet, name="b")
    randomize(a, seed=1, std=0.05)
    randomize(b, seed=2, std=0.05)
    seen = {}  # block -> the input its proj_out got in a real forward pass
    layers = wrapped_layers(unet)
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, i[0]))
             for k, layer in layers.items()]
    run_unet(unet, inputs)
    for h in hooks:
        h.remove()
    with torch.no_grad(), prkit.only_residuals(unet, ["a"]):
        for block, layer in layers.items():
            x = seen[block]
            a.scale = 1.0
            delta1 = layer(x) - layer.original(x)
            a.scale = 2.0
            delta2 = layer(x) - layer.original(x)
            assert delta1.abs().max() > 1e-4
            torch.testing.assert_close(delta2, 2 * delta1, atol=1e-5, rtol=0)
    a.scale = 0.0
    b.scale = 0.0
    assert a.scale == 0.0
    assert torch.equal(run_unet(unet, inputs), base)
    b.scale = 1.0
    with prkit.only_residuals(unet, ["b"]):
        only_b = run_unet(unet, inputs)
    assert torch.equal(run_unet(unet, inputs), only_b)  # a at scale 0 contributes nothing
    assert (only_b - base).abs().max() > 1e-4


# --- merge / unmerge --------------------------------------------------------------------------------


def test_merge_then_unmerge_restores_weights(unet):
    inputs = unet_inputs()
    residuals = prkit.add_residuals(unet)
    randomize(residuals)
    residuals.scale = 0.8
    personal = run_unet(unet, inputs)
    weights = {k: v.weight.detach().clone() for k, v in wrapped_layers(unet).items()}
    residuals.merge()
    assert residuals.merged
    changed = max((v.weight - weights[k]).abs().max() for k, v in wrapped_layers(unet).items())
    assert changed > 1e-3  # merging really moved the weights
    torch.testing.assert_close(run_unet(unet, inputs), personal, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        residuals.scale = 1.0
    residuals.unmerge()
    assert not residuals.merged
    for block, layer in wrapped_layers(unet).items():
        torch.testing.assert_close(layer.weight, weights[block], atol=1e-6, rtol=0)
        assert torch.equal(layer.weight, weights[block])  # in fact bit-exact
    assert torch.equal(run_unet(unet, inputs), personal)


def test_merging_a_float64_model_keeps_float64_precision():
    """The merged weight was summed in fp32 whatever the weight's dtype: a float64 model's base weight came back
    rounded to fp32 (merged outputs ~5e-8 off the unmerged ones); the sum is at least in the weight's dtype."""
    unet = tiny_unet().double()
    inputs = tuple(v.double() if v.is_floating_point() else v for v in unet_inputs())
    residuals = prkit.add_residuals(unet, rank=4)
    randomize(residuals)
    residuals.scale = 0.7
    unmerged = run_unet(unet, inputs)
    weights = {k: v.weight.detach().clone() for k, v in wrapped_layers(unet).items()}
    residuals.merge()
    for block, layer in wrapped_layers(unet).items():
        expected = weights[block] + 0.7 * layer.sets["default"].delta_weight().detach().view(layer.weight.shape)
        torch.testing.assert_close(layer.weight, expected, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(run_unet(unet, inputs), unmerged, atol=1e-12, rtol=1e-12)
    residuals.unmerge()
    assert all(torch.equal(v.weight, weights[k]) for k, v in wrapped_layers(unet).items())


def test_a_disabled_merged_set_is_out_of_the_weights(unet):
    """disable() or residuals_disabled on a merged set kept it painting (its weights stayed merged) while enabled
    said False; as in peft, a disabled set leaves the weights (at once, with disable() as inside
    residuals_disabled) and is back once enabled, and a set merged while disabled waits until it is enabled."""
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    weights = {k: v.weight.detach().clone() for k, v in find_projections(unet).items()}
    a, b = prkit.add_residuals(unet, name="a"), prkit.add_residuals(unet, name="b")
    randomize(a, seed=1)
    randomize(b, seed=2)
    both = run_unet(unet, inputs)
    with prkit.only_residuals(unet, ["b"]):
        only_b = run_unet(unet, inputs)
    a.merge()
    b.merge()
    a.disable()
    assert not a.enabled and a.merged
    for block, layer in wrapped_layers(unet).items():  # at once, before a forward (pipe.save_pretrained writes them)
        expected = weights[block] + layer.sets["b"].delta_weight().detach().view(layer.weight.shape)
        torch.testing.assert_close(layer.weight, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(run_unet(unet, inputs), only_b, atol=1e-5, rtol=1e-5)
    with prkit.residuals_disabled(unet):
        assert torch.equal(run_unet(unet, inputs), base)
        assert all(torch.equal(v.weight, weights[k]) for k, v in wrapped_layers(unet).items())
    torch.testing.assert_close(run_unet(unet, inputs), only_b, atol=1e-5, rtol=1e-5)
    a.enable()
    torch.testing.assert_close(run_unet(unet, inputs), both, atol=1e-5, rtol=1e-5)
    a.unmerge()
    b.unmerge()
    a.disable()
    a.merge()  # merged while disabled: not in the weights until enabled
    torch.testing.assert_close(run_unet(unet, inputs), only_b, atol=1e-5, rtol=1e-5)
    a.enable()
    torch.testing.assert_close(run_unet(unet, inputs), both, atol=1e-5, rtol=1e-5)
    prkit.remove_residuals(unet)
    assert torch.equal(run_unet(unet, inputs), base)
    assert all(torch.equal(unet.get_submodule(k).proj_out.weight, w) for k, w in weights.items())


def test_a_merged_set_whose_factors_change_is_merged_again(unet):
    inputs = unet_inputs()
    residuals = prkit.add_residuals(unet)
    weights = {k: v.weight.detach().clone() for k, v in wrapped_layers(unet).items()}
    randomize(residuals)
    residuals.merge()
    before = run_unet(unet, inputs)
    with torch.no_grad():  # as load_state_dict or a user's edit would: in place
        for lowrank in residuals.factors().values():
            lowrank.up.mul_(2)
    after = run_unet(unet, inputs)
    assert (after - before).abs().max() > 1e-3  # the new factors count, not the ones merged before
    with torch.no_grad():  # and a factor replaced outright
        for lowrank in residuals.factors().values():
            lowrank.down.data = lowrank.down.data * 0.5
    halved = run_unet(unet, inputs)
    torch.testing.assert_close(halved, before, atol=1e-5, rtol=1e-5)  # 2 x 0.5: the first factors' delta
    residuals.unmerge()
    torch.testing.assert_close(run_unet(unet, inputs), halved, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v.weight, weights[k]) for k, v in wrapped_layers(unet).items())


def test_the_merged_check_stays_out_of_a_compiled_forward(unet, monkeypatch):
    from prkit.residual_layer import ResidualProjection

    residuals = prkit.add_residuals(unet)
    randomize(residuals)
    residuals.merge()
    calls = []
    real = ResidualProjection._factor_versions
    monkeypatch.setattr(ResidualProjection, "_factor_versions", lambda self: calls.append(1) or real(self))
    run_unet(unet, unet_inputs())
    assert calls  # eager: checked
    calls.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # data_ptr() would break dynamo's graph
    run_unet(unet, unet_inputs())
    assert calls == []


def test_switching_merged_sets_in_a_block_reaches_a_compiled_unet():
    """residuals_disabled and only_residuals flipped the sets' flags only, leaving a merged set's weights to the next
    eager forward; a compiled forward never rewrites them (no data_ptr() in a trace), so a compiled UNet kept
    painting a merged set inside residuals_disabled, and left out a merged, disabled set that only_residuals (as
    generate) asked for. They switch sets as disable()/enable() do: the weights change at once."""
    unet = tiny_unet()
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    weights = {k: v.weight.detach().clone() for k, v in find_projections(unet).items()}
    dog = prkit.add_residuals(unet, name="dog")
    randomize(dog)
    personal = run_unet(unet, inputs)
    dog.merge()
    merged = {k: v.weight.detach().clone() for k, v in wrapped_layers(unet).items()}
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="eager")
    try:
        with prkit.residuals_disabled(compiled, "dog"):
            assert all(torch.equal(v.weight, weights[k]) for k, v in wrapped_layers(unet).items())  # before a forward
            torch.testing.assert_close(run_unet(compiled, inputs), base, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(v.weight, merged[k]) for k, v in wrapped_layers(unet).items())
        torch.testing.assert_close(run_unet(compiled, inputs), personal, atol=1e-5, rtol=1e-5)
        dog.disable()
        with prkit.only_residuals(compiled, [dog]):
            torch.testing.assert_close(run_unet(compiled, inputs), personal, atol=1e-5, rtol=1e-5)
        assert not dog.enabled
        torch.testing.assert_close(run_unet(compiled, inputs), base, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


def test_remove_while_merged_restores_base(unet):
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    residuals = prkit.add_residuals(unet)
    randomize(residuals)
    residuals.merge()
    prkit.remove_residuals(unet)
    assert torch.equal(run_unet(unet, inputs), base)


@pytest.mark.parametrize("order", ["fifo", "lifo", "remove_all"])
def test_two_merged_sets_leave_the_base_exact_in_any_order(unet, order):
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    weights = {k: p.detach().clone() for k, p in unet.named_parameters()}
    a, b = prkit.add_residuals(unet, name="a"), prkit.add_residuals(unet, name="b")
    randomize(a)
    randomize(b)
    both = run_unet(unet, inputs)
    with prkit.only_residuals(unet, ["b"]):
        only_b = run_unet(unet, inputs)
    a.merge()
    b.merge()
    torch.testing.assert_close(run_unet(unet, inputs), both, atol=1e-5, rtol=1e-5)
    if order == "remove_all":
        prkit.remove_residuals(unet)
    else:
        first, second = (a, b) if order == "fifo" else (b, a)
        first.unmerge()
        if first is a:  # b alone is still in the weights
            with prkit.residuals_disabled(unet, "a"):
                torch.testing.assert_close(run_unet(unet, inputs), only_b, atol=1e-5, rtol=1e-5)
        second.unmerge()
        prkit.remove_residuals(unet)
    assert torch.equal(run_unet(unet, inputs), base)
    for k, p in unet.named_parameters():
        assert torch.equal(p, weights[k]), k


def test_state_dict_shape_mismatch_raises(unet):
    residuals = prkit.add_residuals(unet, rank=2)
    state = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in residuals.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit"):
        residuals.load_state_dict(state)


def test_a_state_that_does_not_fit_leaves_the_set_as_it_was(unet):
    """A state whose later block has another rank, or lacks a factor, was copied block by block up to there: the
    ValueError or KeyError came with the first blocks overwritten (a set half of one state, half of the other)."""
    residuals = prkit.add_residuals(unet, rank=2)
    randomize(residuals, seed=1)
    before = {k: v.clone() for k, v in residuals.state_dict().items()}
    other = dict(prkit.add_residuals(tiny_unet(), rank=2).state_dict())
    last = list(other)[-1]
    other[last] = torch.zeros(3, *other[last].shape[1:])
    with pytest.raises(ValueError, match="does not fit"):
        residuals.load_state_dict(other)
    for key, value in residuals.state_dict().items():
        assert torch.equal(value, before[key]), key
    del other[last]
    with pytest.raises(KeyError, match=rf"{last}.*no factor of block"):
        residuals.load_state_dict(other)
    for key, value in residuals.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_every_handle_on_a_set_knows_its_words(unet):
    dog = prkit.add_residuals(unet, name="dog", token="sks", class_word="dog")
    other = prkit.get_residuals(unet, "dog")
    assert (other.token, other.class_word) == ("sks", "dog")
    other.token = "zwx"  # one set, one pair of words, whichever handle sets them
    assert dog.token == "zwx"
    prkit.remove_residuals(unet, "dog")
    again = prkit.add_residuals(unet, name="dog")
    assert again.token is None and again.class_word is None  # a new set under the old name starts without them


@pytest.mark.parametrize("word", ["token", "class_word"])
def test_a_word_that_is_no_text_is_refused_before_anything_changes(word, tmp_path):
    """token=123 or token=['sks'] was taken without a word and refused only when the trained set was saved, by
    safetensors ("argument 'metadata': 'int' object is not an instance of 'str'"), after all the work."""
    unet = tiny_unet()
    for bad in (123, ["sks"]):
        with pytest.raises(TypeError, match=rf"^add_residuals: {word} must be a word \(a str, e\.g\. 'sks' or "
                                            rf"'dog'\) or None, got {re.escape(repr(bad))}$"):
            prkit.add_residuals(unet, rank=2, **{word: bad})
        assert not residual_names(unet) and not wrapped_layers(unet)
    handle = prkit.add_residuals(unet, rank=2, token="sks", class_word="dog")
    with pytest.raises(TypeError, match=rf"^residual set 'default': {word} must be a word"):
        setattr(handle, word, 123)
    assert (handle.token, handle.class_word) == ("sks", "dog")
    assert prkit.load_residuals(tiny_unet(), handle.save(tmp_path / "r.safetensors")).token == "sks"


def test_only_residuals_refuses_a_merged_set_it_cannot_switch_off(unet):
    a, b = prkit.add_residuals(unet, name="a"), prkit.add_residuals(unet, name="b")
    a.merge()
    with pytest.raises(ValueError, match=r"\['a'\] are merged into the base weights"):
        with prkit.only_residuals(unet, ["b"]):
            pass
    with prkit.only_residuals(unet, ["a", "b"]):  # asked for: on either way
        assert b.enabled


def test_a_compiled_unet_has_the_plain_block_names(unet):
    compiled = torch.compile(unet)  # lazy: the wrapper alone, no compiled forward runs here
    assert [n for n, _ in compiled.named_modules() if n.endswith("attentions.0")][0].startswith("_orig_mod.")
    originals = find_projections(unet)
    assert find_projections(compiled) == originals and layer_table(compiled) == layer_table(unet)
    residuals = prkit.add_residuals(compiled, rank=2, name="dog", token="sks", class_word="dog")
    assert set(wrapped_layers(unet)) == set(originals) and residual_names(unet) == ["dog"]
    assert prkit.get_residuals(unet, "dog").token == "sks" and residuals.ranks() == {b: 2 for b in originals}
    prkit.remove_residuals(compiled, "dog")
    assert all(find_projections(unet)[b] is m for b, m in originals.items())  # the same modules are back


def test_a_layer_that_only_looks_like_conv2d_is_named_in_full():
    Conv2d = type("Conv2d", (nn.Module,), {"__module__": "peft.tuners.lora.layer"})
    with pytest.raises(TypeError, match=r"block\.proj_out is a peft\.tuners\.lora\.layer\.Conv2d; expected a "
                                        r"torch\.nn\.Conv2d or torch\.nn\.Linear"):
        ResidualProjection(Conv2d(), "block")


def test_the_wrapped_layer_still_runs_its_own_forward_and_hooks(unet):
    """The residual layer is a Conv2d/Linear to the outside (peft stacks on it), but the projection itself is the
    wrapped module's own call: its hooks and its own forward (a quantized Linear has one) still run."""
    inputs = unet_inputs()
    calls = []
    block, first = next(iter(find_projections(unet).items()))

    class Doubled(type(first)):  # stands for a layer with its own forward (bitsandbytes, GGUF, quanto)
        def forward(self, x):
            return super().forward(x) * 2

    own = Doubled.__new__(Doubled)
    own.__dict__.update(first.__dict__)
    unet.get_submodule(block).proj_out = own
    for proj in find_projections(unet).values():
        proj.register_forward_hook(lambda module, args, out: calls.append(1) or out * 1.5)
    hooked = run_unet(unet, inputs)
    assert len(calls) == 7
    residuals = prkit.add_residuals(unet, rank=2)
    torch.testing.assert_close(run_unet(unet, inputs), hooked, atol=0, rtol=0)  # zero-init set: the hooked output
    assert len(calls) == 14
    randomize(residuals)
    assert (run_unet(unet, inputs) - hooked).abs().max() > 1e-3
    prkit.remove_residuals(unet)
    assert find_projections(unet)[block] is own
    torch.testing.assert_close(run_unet(unet, inputs), hooked, atol=0, rtol=0)


def test_merging_into_an_integer_quantized_weight_is_refused_and_nothing_merged():
    """A proj_out storing its weight as integers with its own dequantizing forward (bitsandbytes' Linear8bitLt)
    took merge(): the fp32 delta was rounded into the int8 weight, unscaled, and the merged UNet sampled far off the
    unmerged one without a word. merge() now refuses before any layer is written; sampling unmerged still works."""
    unet = tiny_unet(linear=True)

    class Int8Linear(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, self.weight.to(x.dtype) * self.qscale, self.bias)

    blocks = list(find_projections(unet).items())
    for block, proj in blocks[1:]:  # the first stays a float layer: nothing may be merged there either
        quant = Int8Linear.__new__(Int8Linear)
        quant.__dict__.update(proj.__dict__)
        quant._parameters = dict(proj._parameters)
        quant.qscale = proj.weight.detach().abs().max() / 127
        quant.weight = nn.Parameter(torch.round(proj.weight.detach() / quant.qscale).to(torch.int8),
                                    requires_grad=False)
        unet.get_submodule(block).proj_out = quant
    inputs = unet_inputs()
    residuals = prkit.add_residuals(unet, rank=2)
    randomize(residuals)
    with torch.no_grad():
        personal = run_unet(unet, inputs)
    weights = {k: v.weight.detach().clone() for k, v in wrapped_layers(unet).items()}
    with pytest.raises(RuntimeError, match=r"cannot merge residual set 'default' into down_blocks.1.attentions.0.*stored as torch.int8.*"
                                           r"unmerged"):
        residuals.merge()
    assert not residuals.merged
    assert all(torch.equal(v.weight, weights[k]) for k, v in wrapped_layers(unet).items())
    with torch.no_grad():
        assert torch.equal(run_unet(unet, inputs), personal)


def test_diffusers_layerwise_casting_before_the_residuals_and_after(unet):
    inputs = unet_inputs()
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    cast = run_unet(unet, inputs)
    residuals = prkit.add_residuals(unet, rank=2)  # under the casting: the sets are not cast
    assert {p.dtype for p in residuals.parameters()} == {torch.float32}
    torch.testing.assert_close(run_unet(unet, inputs), cast, atol=0, rtol=0)
    randomize(residuals)
    assert (run_unet(unet, inputs) - cast).abs().max() > 1e-3
    assert {p.dtype for p in residuals.parameters()} == {torch.float32}
    fresh = tiny_unet(**ARCHS["conv" if next(iter(find_projections(unet).values())).is_conv else "linear"])
    randomize(prkit.add_residuals(fresh, rank=2))
    fresh.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="stored in float8 by diffusers' enable_layerwise_casting.*"
                                           "skip_modules_classes=\\(prkit.residual_layer.ResidualProjection,\\)"):
        run_unet(fresh, inputs)  # the casting took the sets too, and rounded them: never silently


def test_a_parametrized_proj_out_is_refused_with_what_to_do(unet):
    block, proj = next(iter(find_projections(unet).items()))
    torch.nn.utils.parametrizations.weight_norm(proj)
    with pytest.raises(TypeError, match=f"{block}.proj_out has parametrizations.*remove_parametrizations"):
        prkit.add_residuals(unet, rank=2)
    assert residual_names(unet) == [] and not any(isinstance(m, ResidualProjection) for m in unet.modules())


def test_removal_puts_back_the_layer_in_the_model_s_mode(unet):
    originals = {block: proj for block, proj in find_projections(unet).items()}
    prkit.add_residuals(unet, rank=2)
    unet.eval()
    prkit.remove_residuals(unet)
    assert all(find_projections(unet)[block] is proj and not proj.training for block, proj in originals.items())


@pytest.mark.parametrize("bad", [1.0, 2.5, 16.0])
def test_a_float_rank_of_one_or_more_is_refused_not_guessed(bad):
    """rank=1.0 could mean all the channels or rank 1 (it gave rank 1); a whole rank is an int."""
    from tiny import tiny_unet

    with pytest.raises(ValueError, match=rf"rank {bad!r} is neither a fraction .* nor a whole rank, which is an int"):
        prkit.add_residuals(tiny_unet(), rank=bad)


def test_a_residual_config_is_not_silently_overridden_or_ignored():
    """ResidualConfig.init accepted any name and was never read, and rank/seed passed beside a config were dropped
    (add_residuals(unet, rank=8, config=ResidualConfig()) gave the config's 5%); both are now refused by name."""
    from prkit.residuals import ResidualConfig
    from tiny import tiny_unet

    with pytest.raises(ValueError, match="ResidualConfig.init: 'normal'"):
        ResidualConfig(init="normal")
    unet = tiny_unet()
    with pytest.raises(ValueError, match="rank=8, seed=3 and config=.* disagree"):
        prkit.add_residuals(unet, rank=8, seed=3, config=ResidualConfig())
    with pytest.raises(ValueError, match="disagree"):
        prkit.add_residuals(unet, seed=3, config=ResidualConfig(seed=4))
    agreed = prkit.add_residuals(unet, rank=2, seed=3, config=ResidualConfig(rank=2, seed=3))
    assert set(agreed.ranks().values()) == {2}


def test_a_rank_given_as_a_numpy_or_torch_number_is_that_rank(tmp_path):
    """np.int64(16) (a rank read from an array or a sweep's grid) was refused as 'got np.int64(16)', and a torch
    scalar too; they are the rank they hold, recorded as plain JSON numbers."""
    import json

    import numpy as np

    from prkit.train import TrainConfig

    for given, expected in ((np.int64(2), 2), (torch.tensor(3), 3), (np.float32(0.25), 0.25)):
        assert TrainConfig(rank=given).rank == expected and type(TrainConfig(rank=given).rank) is type(expected)
        plain = prkit.add_residuals(tiny_unet(), expected, "plain")
        res = prkit.add_residuals(tiny_unet(), given, "given")
        assert res.ranks() == plain.ranks() and all(type(r) is int for r in res.ranks().values())
        path = res.save(tmp_path / f"{expected}.safetensors")
        assert json.loads(json.dumps(prkit.load_residuals(tiny_unet(), path).ranks())) == plain.ranks()
    assert TrainConfig(rank={"down_blocks.0.attentions.0": np.int64(4)}).rank == {"down_blocks.0.attentions.0": 4}
    with pytest.raises(ValueError, match="rank must be a positive fraction"):
        TrainConfig(rank=np.array([2, 3]))
