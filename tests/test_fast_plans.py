"""Planning ahead (prkit.fast_plans): the shapes it predicts are the ones a forward gives, and running it changes
nothing of training."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import prkit.fast as fast
import prkit.fast_warmup as warmup
import prkit.train_inputs as train_inputs
from conftest import make_concept, make_pipe
from tiny import tiny_unet
from prkit.fast import FastConfig, train_fast
from prkit.fast_plans import _distinct, plan_ahead, step_calls
from prkit.train import TrainConfig


def _three_levels(linear: bool = False, **config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 48),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, use_linear_projection=linear, **config).eval()


def _recorded(unet, size, batch=2):
    """(kind, module, input shape without the batch) of every Conv2d and attention call of one real forward."""
    from diffusers.models.attention_processor import Attention

    seen, hooks = set(), []
    for module in unet.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args: seen.add(("conv", m, tuple(args[0].shape[1:])))))
        elif isinstance(module, Attention):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, kwargs: seen.add(("cross" if kwargs.get("encoder_hidden_states") is not None
                                                  else "self", m, tuple(args[0].shape[1:]))), with_kwargs=True))
    try:
        with torch.no_grad():
            unet(torch.randn(batch, 4, *size), torch.tensor([10] * batch), encoder_hidden_states=torch.randn(batch, 5, 32))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("make, size", [
    (lambda: tiny_unet(), (8, 8)), (lambda: tiny_unet(linear=True), (8, 8)),
    (lambda: tiny_unet(sdxl_like=True), (8, 8)), (lambda: tiny_unet(), (5, 7)),
    (lambda: _three_levels(), (8, 8)), (lambda: _three_levels(), (6, 10)), (lambda: _three_levels(True), (7, 9)),
    (lambda: _three_levels(downsample_padding=0), (8, 8)), (lambda: _three_levels(downsample_padding=0), (7, 9))])
def test_step_calls_are_the_convolutions_and_attention_calls_of_a_forward(make, size):
    unet = make()
    predicted = step_calls(unet, size)
    assert len(predicted) == len({(k, id(m), s) for k, m, s in predicted})  # each module once per shape here
    assert {(k, m, s) for k, m, s in predicted} == _recorded(unet, size)
    distinct = _distinct(predicted)
    assert 0 < len(distinct) < len(predicted)  # repeated signatures (the resnets of a level) are planned once
    assert {(k, s) for k, _, s in distinct} == {(k, s) for k, _, s in predicted}


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"],  # prkit's "lora" target
                                     ["conv_in", "conv1", "conv2", "conv", "proj_in", "proj_out", "conv_out"]])
def test_step_calls_follow_the_layers_peft_wraps(targets):
    from peft import LoraConfig

    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))  # pipe.load_lora_weights's layers
    names = {m: n for n, m in unet.named_modules()}
    recorded = {(k, m, s) for k, m, s in _recorded(unet, (8, 8)) if ".lora_" not in names[m]}  # the adapter's own
    assert {(k, m, s) for k, m, s in step_calls(unet, (8, 8))} == recorded  # each wrapped layer's own call
    done = plan_ahead(unet, [_Slot(2, (8, 8), torch.randn(2, 5, 32))], None)
    assert done == len(_distinct(step_calls(unet, (8, 8)))) and all(p.grad is None for p in unet.parameters())


def test_step_calls_stop_where_the_unet_is_not_followed():
    unet = tiny_unet()
    unet.down_blocks[0].downsamplers[0].conv = nn.Identity()  # a downsampler of another kind
    calls = step_calls(unet, (8, 8))
    assert calls and calls[-1][1] is unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert step_calls(nn.Linear(2, 2), (8, 8)) == []


class _Slot:
    def __init__(self, batch, size, context):
        self.noisy = torch.zeros(batch, 4, *size)
        self.cond = {"encoder_hidden_states": context}


def test_plan_ahead_runs_each_signature_once_and_leaves_no_gradient():
    from prkit.residuals import add_residuals

    unet = tiny_unet().requires_grad_(False)
    res = add_residuals(unet, name="r")
    for p in res.parameters():
        p.requires_grad_(True)
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 20]), torch.randn(2, 5, 32))
    with torch.no_grad():
        before = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.append(m)) for m in unet.modules()
             if isinstance(m, nn.Conv2d)]
    done = plan_ahead(unet, [_Slot(2, (8, 8), inputs[2])], None)
    for hook in hooks:
        hook.remove()
    assert done == len(_distinct(step_calls(unet, (8, 8)))) and 0 < len(calls) < done
    assert all(p.grad is None for p in unet.parameters())
    with torch.no_grad():
        assert torch.equal(unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample, before)
    # a prior-preservation slot of the same shapes adds nothing; another batch size is planned too
    assert plan_ahead(unet, [_Slot(2, (8, 8), inputs[2])] * 2, None) == done
    assert plan_ahead(unet, [_Slot(2, (8, 8), inputs[2]), _Slot(3, (8, 8), inputs[2][:1].expand(3, -1, -1))],
                      None) == 2 * done


def test_plan_ahead_stops_quietly_where_a_call_fails(caplog):
    unet = tiny_unet()
    broken = unet.up_blocks[0].resnets[0].conv1

    def fail(*args):
        raise RuntimeError("no plan")
    broken.forward = fail
    slot = _Slot(2, (8, 8), torch.randn(2, 5, 32))
    with caplog.at_level("DEBUG", logger="prkit.fast_plans"):
        done = plan_ahead(unet, [slot], None, budget_bytes=1)
    calls = _distinct(step_calls(unet, (8, 8)))
    assert done == [m for _, m, _ in calls].index(broken)
    assert "no plan" in caplog.text and all(p.grad is None for p in unet.parameters())


def test_the_fast_loop_plans_ahead_in_its_thread_before_a_capture_only(tmp_path, monkeypatch):
    seen = []
    real = warmup.plan_ahead

    def plan(unet, slots, autocast):
        seen.append((threading.current_thread(), unet, [tuple(s.noisy.shape) for s in slots]))
        return real(unet, slots, autocast)

    real_init = fast.TrainStep.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.capture_first = capture_first  # as on CUDA: a capture is tried first (it cannot on a CPU)

    monkeypatch.setattr(warmup, "plan_ahead", plan)
    monkeypatch.setattr(fast.TrainStep, "__init__", init)
    monkeypatch.setattr(fast.TrainStep, "capture", lambda self: setattr(self, "capture_first", False) or False)
    concept = make_concept()
    runs = {}
    for capture_first, planned in ((True, True), (True, False), (False, True)):
        pipe = make_pipe(tmp_path / f"{capture_first}{planned}")
        loop = FastConfig(cuda_graph=False, check_every=3, warm_up=True, plan_ahead=planned)
        result = train_fast(pipe, concept, TrainConfig(batch_size=4, steps=4), progress=False, fast=loop)
        runs[capture_first, planned] = result.losses
        expected = [(threading.main_thread(), pipe.unet, [(4, 4, 8, 8)])] if capture_first and planned else []
        assert seen == expected
        seen.clear()
    assert runs[True, True] == runs[True, False] == runs[False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_plan_ahead_under_the_fast_modules_changes_no_number(tmp_path):
    from prkit.fast import fast_modules

    pipe = make_pipe(tmp_path).to("cuda", torch.bfloat16)
    unet = pipe.unet.requires_grad_(False)
    context = torch.randn(4, 5, 32, device="cuda", dtype=torch.bfloat16)
    slot = _Slot(4, (8, 8), context)
    slot.noisy = slot.noisy.to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x = torch.randn_like(slot.noisy)
    with fast_modules(unet, FastConfig()), torch.no_grad():
        before = unet(x, torch.tensor([10] * 4, device="cuda"), encoder_hidden_states=context).sample
    with fast_modules(unet, FastConfig()):
        done = plan_ahead(unet, [slot], None)
        with torch.no_grad():
            after = unet(x, torch.tensor([10] * 4, device="cuda"), encoder_hidden_states=context).sample
        # counted as patched: the folded resnet biases make conv1/conv2 signatures of their own
        assert done == len(_distinct(step_calls(unet, (8, 8))))
    assert torch.equal(before, after) and all(p.grad is None for p in unet.parameters())


def test_plan_ahead_runs_the_backwards_in_another_thread_beside_the_next_forwards(monkeypatch):
    import prkit.fast_plans as plans

    unet = tiny_unet()
    threads, order = set(), []
    real = plans._backward

    def backward(inputs, outputs):
        threads.add(threading.current_thread())
        order.append(("backward", len(inputs)))
        real(inputs, outputs)

    monkeypatch.setattr(plans, "_backward", backward)
    done = plan_ahead(unet, [_Slot(2, (8, 8), torch.randn(2, 5, 32))], None, budget_bytes=1)
    assert done == len(order) and threads and threading.main_thread() not in threads
    assert not any(t.is_alive() for t in threads)  # every backward ended before it returned


def test_an_interrupt_leaves_the_queued_backwards_unrun_and_no_thread(monkeypatch):
    import time

    import prkit.fast_plans as plans

    unet = tiny_unet()
    ran, threads = [], set()

    def backward(inputs, outputs):  # a backward slower than the forwards: they queue up
        threads.add(threading.current_thread())
        time.sleep(1.0)  # long beside the forwards up to the interrupt, also on a loaded machine
        ran.append(len(inputs))

    monkeypatch.setattr(plans, "_backward", backward)
    calls = _distinct(step_calls(unet, (8, 8)))
    last = calls[len(calls) // 2][1]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    last.forward = interrupt
    began = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        plan_ahead(unet, [_Slot(2, (8, 8), torch.randn(2, 5, 32))], None, budget_bytes=1)
    assert len(ran) <= 1 and time.perf_counter() - began < 1.0 * (len(calls) // 2)  # the queue was not waited out
    assert threads and not any(t.is_alive() for t in threads)


def test_plan_ahead_draws_no_random_number_of_the_step_where_the_unet_has_dropout():
    unet = tiny_unet().train()
    for module in unet.modules():
        if isinstance(module, nn.Dropout):  # diffusers' dropout= (attention outputs, feed-forwards, resnets)
            module.p = 0.1
    slot = _Slot(2, (8, 8), torch.randn(2, 5, 32))
    state = torch.get_rng_state()
    assert plan_ahead(unet, [slot], None) > 0
    assert torch.equal(torch.get_rng_state(), state)  # the step's dropout masks are those of a run without it
