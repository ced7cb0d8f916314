"""The personalization loop: only residuals train, 150 steps run, exact resume, interrupts, divergence."""

from __future__ import annotations

import math
import re
import threading

import pytest
import torch
from PIL import Image

import prkit
import prkit.train as train
import prkit.train_inputs as train_inputs
from conftest import interrupt_backward, load_lora_file, make_concept, make_pipe
from prkit.data import Concept
from prkit.fast import FastConfig, train_fast
from prkit.residuals import get_residuals
from prkit.train import TrainConfig, TrainingDiverged

FAST = dict(progress=False, batch_size=4)


def _snapshot(pipe) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Every parameter of the base model, with a copy of its value."""
    return [(p, p.detach().clone()) for module in (pipe.unet, pipe.text_encoder, pipe.vae) for p in module.parameters()]


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_only_residual_parameters_change(tmp_path, concept, linear):
    pipe = make_pipe(tmp_path, linear=linear)
    before = _snapshot(pipe)
    pipe.vae.requires_grad_(False)  # the caller's flags, whatever they are, come back after training
    flags = [p.requires_grad for p, _ in before]
    assert any(flags) and not all(flags)
    result = prkit.train_residuals(pipe, concept, steps=3, **FAST)
    assert result.steps_done == 3 and result.completed and len(result.losses) == 3
    for (param, value), flag in zip(before, flags):
        assert torch.equal(param, value)
        assert param.requires_grad == flag
    state = result.residuals.state_dict()
    init = prkit.add_residuals(make_pipe(tmp_path / "init", linear=linear).unet, seed=0).state_dict()
    for key, value in state.items():
        assert not torch.equal(value, init[key]), key  # every factor moved
        assert torch.isfinite(value).all()
    base_ids = {id(p) for p, _ in before}
    assert not any(id(p) in base_ids for p in result.residuals.parameters())
    assert result.residuals.token == "sks" and result.residuals.meta["config"]["steps"] == 3


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, concept_module):
    """The uninterrupted 150-step reference run (default recipe: batch 4, lr 1e-3), shared by two tests."""
    pipe = make_pipe(tmp_path_factory.mktemp("full"))
    result = prkit.train_residuals(pipe, concept_module, steps=150, seed=0, **FAST)
    return result, {k: v.clone() for k, v in result.residuals.state_dict().items()}


@pytest.fixture(scope="module")
def concept_module():
    return make_concept()


def test_150_step_run_finishes_with_finite_losses(full_run):
    result, state = full_run
    assert result.completed and result.steps_done == 150 and len(result.losses) == 150
    assert all(math.isfinite(v) for v in result.losses)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert result.checkpoint is None and result.seconds > 0
    assert len(state) == 2 * 7


def test_resume_after_stop_at_75_is_bit_identical(tmp_path, full_run, concept_module):
    reference, reference_state = full_run
    ckpt = tmp_path / "ckpt"
    first = prkit.train_residuals(make_pipe(tmp_path / "p1"), concept_module, steps=150, seed=0,
                                  checkpoint_dir=str(ckpt), stop_after=75, **FAST)
    assert not first.completed and first.steps_done == 75 and len(first.losses) == 75
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint.pt"]  # no .tmp left behind
    assert torch.load(ckpt / "checkpoint.pt", weights_only=False)["step"] == 75
    second = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept_module, steps=150, seed=0,
                                   checkpoint_dir=str(ckpt), **FAST)
    assert second.completed and second.steps_done == 150
    assert second.losses == reference.losses
    assert _equal_states(second.residuals.state_dict(), reference_state)
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint.pt"]


def test_keyboard_interrupt_leaves_a_checkpoint_that_resumes(tmp_path, concept, monkeypatch):
    steps = 12
    reference = prkit.train_residuals(make_pipe(tmp_path / "ref"), concept, steps=steps, **FAST)
    real_backward = interrupt_backward(monkeypatch, at=10)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=steps, checkpoint_dir=str(ckpt),
                              checkpoint_every=0, **FAST)
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint.pt"]
    assert torch.load(ckpt / "checkpoint.pt", weights_only=False)["step"] == 9  # step 10 never finished
    monkeypatch.setattr(train, "_backward", real_backward)
    resumed = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=steps, checkpoint_dir=str(ckpt),
                                    checkpoint_every=0, **FAST)
    assert resumed.completed and resumed.steps_done == steps
    assert resumed.losses == reference.losses
    assert _equal_states(resumed.residuals.state_dict(), reference.residuals.state_dict())


def test_nan_loss_raises_and_leaves_parameters_unchanged(tmp_path, concept, monkeypatch):
    pipe = make_pipe(tmp_path)
    before = _snapshot(pipe)
    real_step, real_backward, calls, states = train._step, train._backward, [], []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            return torch.tensor(float("nan"), requires_grad=True)
        return real_step(*args, **kwargs)

    def backward(*args, **kwargs):
        real_backward(*args, **kwargs)
        states.append({k: v.clone() for k, v in get_residuals(pipe.unet).state_dict().items()})

    monkeypatch.setattr(train, "_step", step)
    monkeypatch.setattr(train, "_backward", backward)
    with pytest.raises(TrainingDiverged) as err:
        prkit.train_residuals(pipe, concept, steps=5, learning_rate=1e-3, **FAST)
    message = str(err.value)
    assert "nan" in message and "step 3" in message
    assert "learning_rate" in message and "0.001" in message
    assert isinstance(err.value, RuntimeError)
    assert len(states) == 2
    assert _equal_states(get_residuals(pipe.unet).state_dict(), states[-1])  # the NaN step changed nothing
    for param, value in before:
        assert torch.equal(param, value)
    assert not any(p.requires_grad for p in get_residuals(pipe.unet).parameters())


def test_an_infinite_gradient_of_a_finite_loss_is_refused_before_the_update(tmp_path, concept, monkeypatch):
    """Without a grad scaler (CPU, bf16, fp32) an infinite gradient went into AdamW: the weights became NaN and the
    error came a step later, blaming a NaN loss, with the checkpoint of the step before kept as resumable."""
    pipe, ckpt = make_pipe(tmp_path / "p"), tmp_path / "ckpt"
    real_step, real_backward, calls, states = train._step, train._backward, [], []

    def step(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        calls.append(loss.item())
        if len(calls) == 3:  # a finite loss whose backward pass overflows
            loss.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return loss

    def backward(*args, **kwargs):
        refused = real_backward(*args, **kwargs)
        states.append({k: v.clone() for k, v in get_residuals(pipe.unet).state_dict().items()})
        return refused

    monkeypatch.setattr(train, "_step", step)
    monkeypatch.setattr(train, "_backward", backward)
    with pytest.raises(TrainingDiverged) as err:
        prkit.train_residuals(pipe, concept, steps=5, learning_rate=1e-3, checkpoint_dir=str(ckpt),
                              checkpoint_every=2, fast=False, **FAST)
    assert len(calls) == 3 and all(map(math.isfinite, calls))
    assert str(err.value).startswith(f"the gradient of a finite loss ({calls[2]:.4g}) became ")
    assert "at step 3; the residuals were not updated with it" in str(err.value)
    assert "Lower learning_rate (now 0.001)" in str(err.value)
    assert _equal_states(states[2], states[1])  # the refused update changed nothing ...
    assert _equal_states(get_residuals(pipe.unet).state_dict(), states[1])  # ... and the set keeps those weights
    assert all(torch.isfinite(v).all() for v in states[1].values())
    assert not (ckpt / "checkpoint.pt").exists()  # the run's checkpoint set aside, as for a NaN loss
    assert torch.load(ckpt / "checkpoint.diverged.pt", weights_only=True)["step"] == 2


def test_a_diverged_runs_checkpoint_is_set_aside_so_the_rerun_starts_over(tmp_path, concept, monkeypatch):
    """The error said to lower the learning rate; the rerun then resumed the checkpoint the diverging run had
    written on its way (its weights already blown up), warned only of the new rate, and saved a useless set."""
    ckpt = tmp_path / "ckpt"
    real_step, calls = train._step, []

    def step(*args, **kwargs):
        calls.append(1)
        return torch.tensor(float("nan"), requires_grad=True) if len(calls) == 4 else real_step(*args, **kwargs)

    monkeypatch.setattr(train, "_step", step)
    run = dict(steps=5, learning_rate=1e-3, checkpoint_dir=str(ckpt), checkpoint_every=2, **FAST)
    with pytest.raises(TrainingDiverged) as err:
        prkit.train_residuals(make_pipe(tmp_path / "a"), concept, **run)
    aside = ckpt / "checkpoint.diverged.pt"
    assert f"set aside as {aside}, so a rerun starts over; to continue from it anyway, rename it back to " \
           "checkpoint.pt" in str(err.value)
    assert aside.is_file() and not (ckpt / "checkpoint.pt").exists()
    assert torch.load(aside, weights_only=True)["step"] == 2  # kept, not lost
    monkeypatch.setattr(train, "_step", real_step)
    again = prkit.train_residuals(make_pipe(tmp_path / "b"), concept, **run)
    fresh = prkit.train_residuals(make_pipe(tmp_path / "c"), concept, **{**run, "checkpoint_dir": None})
    assert again.losses == fresh.losses and len(again.losses) == 5  # started over, not resumed at step 2


def test_checkpoint_write_is_atomic(tmp_path, concept, monkeypatch):
    ckpt = tmp_path / "ckpt"
    prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=6, checkpoint_dir=str(ckpt),
                          checkpoint_every=2, stop_after=2, **FAST)
    good = (ckpt / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def crash(obj, file, *args, **kwargs):  # the open temporary file (prkit.atomic.writing)
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(train.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=6, checkpoint_dir=str(ckpt),
                              checkpoint_every=2, **FAST)
    monkeypatch.setattr(train.torch, "save", real_save)
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint.pt"]  # no .tmp left behind
    assert (ckpt / "checkpoint.pt").read_bytes() == good  # the old checkpoint survived
    assert torch.load(ckpt / "checkpoint.pt", weights_only=False)["step"] == 2


@pytest.mark.parametrize("fast", [False, True])
def test_a_full_disk_at_a_checkpoint_names_it_and_the_space_left_and_keeps_the_previous_one(tmp_path, concept,
                                                                                             monkeypatch, fast):
    """torch.save reports a full disk as a RuntimeError ("unexpected pos 704 vs 598") that names neither the file
    nor the cause."""
    import errno
    import os

    from conftest import full_disk

    ckpt = tmp_path / "ckpt"
    prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=6, checkpoint_dir=str(ckpt),
                          checkpoint_every=2, stop_after=2, fast=fast, **FAST)
    good = (ckpt / "checkpoint.pt").read_bytes()
    full_disk(monkeypatch, free_mib=3, after=1000)
    with pytest.raises(OSError) as err:
        prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=6, checkpoint_dir=str(ckpt),
                              checkpoint_every=2, fast=fast, **FAST)
    assert err.value.errno == errno.ENOSPC
    assert str(err.value) == (f"[Errno 28] could not write {ckpt / 'checkpoint.pt'}: No space left on device (3 MiB "
                              "free there); free some space or write to another disk, then try again. The file "
                              "that was there is unchanged. The residual set 'default' stays on the model with the "
                              "weights it had trained: save it where there is room (prkit.save_residuals("
                              "prkit.get_residuals(pipe.unet, 'default'), path)) before calling train_residuals "
                              f"again, which replaces it, resuming from {ckpt / 'checkpoint.pt'}, the last checkpoint "
                              "written")
    assert isinstance(err.value.error.__cause__, RuntimeError)  # what torch.save itself raised
    assert os.listdir(ckpt) == ["checkpoint.pt"] and (ckpt / "checkpoint.pt").read_bytes() == good
    assert torch.load(ckpt / "checkpoint.pt", weights_only=True)["step"] == 2


def test_images_far_from_the_native_resolution_warn_with_the_fix(tmp_path):
    pipe = make_pipe(tmp_path)
    native = prkit.native_resolution(pipe)
    big = make_concept(resolution=native * 4)
    with pytest.warns(UserWarning, match=rf"native resolution is {native}px.*resolution={native}") as said:
        prkit.train_residuals(pipe, big, steps=1, **FAST)
    assert [w.filename for w in said] == [__file__]  # the caller's line, not prkit's
    with pytest.warns(UserWarning, match="native resolution"):  # the fast loop warns as well
        prkit.train_residuals(make_pipe(tmp_path / "f"), big, steps=1, fast=True, **FAST)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prkit.train_residuals(make_pipe(tmp_path / "b"), make_concept(resolution=native), steps=1, **FAST)
    assert not [w for w in caught if "native resolution" in str(w.message)]


@pytest.mark.parametrize("given,says", [
    (dict(validation_prompts=("a photo of a {token} {class_word}",)),
     "TrainConfig.validation_prompts are given but validate_every is 0, so no validation images are made: set "
     "validate_every (steps between them, e.g. validate_every=50), or leave validation_prompts empty"),
    (dict(validate_every=1),
     "TrainConfig.validate_every=1 but validation_prompts is empty, so no validation images are made: set "
     "validation_prompts (e.g. ('a photo of a {token} {class_word}',)), or validate_every=0"),
])
def test_validation_with_only_one_of_its_settings_warns_with_the_other(tmp_path, concept, given, says):
    """Prompts without validate_every (or validate_every without prompts) made no validation images, silently."""
    import warnings

    pipe = make_pipe(tmp_path / "a")
    with pytest.warns(UserWarning, match=re.escape(says)) as said:
        result = prkit.train_residuals(pipe, concept, steps=1, **given, **FAST)
    assert result.validation == {}
    assert [w.filename for w in said if "validation images" in str(w.message)] == [__file__]  # the caller's line
    prompts = dict(validation_prompts=("a {token}",), validation_steps=1)
    for case, config, overrides in (("both", TrainConfig(steps=1, validate_every=1, **prompts), {}),
                                    ("neither", TrainConfig(steps=1), {}),  # an override gives what it lacks:
                                    ("an override", TrainConfig(steps=1, **prompts), {"validate_every": 1})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = prkit.train_residuals(make_pipe(tmp_path / case), concept, config, **overrides, **FAST)
        assert not [w for w in caught if "validation images" in str(w.message)], case
        assert sorted(result.validation) == ([] if case == "neither" else [1]), case


def test_resume_at_another_learning_rate_says_so_and_uses_this_runs(tmp_path, concept, caplog, monkeypatch):
    ckpt = tmp_path / "ckpt"
    prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=4, learning_rate=1e-3, checkpoint_dir=str(ckpt),
                          checkpoint_every=2, stop_after=2, **FAST)
    seen = []
    real = train.load_optimizer

    def spy(optimizer, state, learning_rate, source, *rest):
        real(optimizer, state, learning_rate, source, *rest)
        seen.append({g["lr"] for g in optimizer.param_groups})

    monkeypatch.setattr(train, "load_optimizer", spy)
    with caplog.at_level("WARNING", logger="prkit.train"):
        done = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=4, learning_rate=1e-2,
                                     checkpoint_dir=str(ckpt), **FAST)
    assert done.completed and seen == [{1e-2}]
    assert "trained at learning rate 0.001; resuming at this run's 0.01" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="prkit.train"):  # the checkpoint's own rate (the finished run's): silent
        prkit.train_residuals(make_pipe(tmp_path / "p3"), concept, steps=6, learning_rate=1e-2,
                              checkpoint_dir=str(ckpt), **FAST)
    assert "resuming at" not in caplog.text and seen[-1] == {1e-2} and len(seen) == 2


def test_a_loaded_lora_is_off_while_the_residuals_train_and_back_on_after(tmp_path, concept):
    """Residuals train against the base model (their file says which): a LoRA loaded on the pipeline neither
    changes what they learn nor itself, and is active again afterwards."""
    pytest.importorskip("peft")
    from conftest import randomize, run_unet, unet_inputs
    from prkit.files import export_lora

    donor = make_pipe(tmp_path / "d")
    style = prkit.add_residuals(donor.unet, rank=2, name="style")
    randomize(style, seed=5)
    lora = export_lora(style, tmp_path / "style.safetensors", dtype=torch.float32)
    plain = prkit.train_residuals(make_pipe(tmp_path / "plain"), concept, steps=3, **FAST).residuals
    pipe = make_pipe(tmp_path / "p")
    load_lora_file(pipe, lora, adapter_name="style")
    inputs = unet_inputs()
    with_lora = run_unet(pipe.unet, inputs)
    adapter = {n: (p.detach().clone(), p.requires_grad) for n, p in pipe.unet.named_parameters() if "lora_" in n}
    trained = prkit.train_residuals(pipe, concept, steps=3, **FAST).residuals
    assert _equal_states(trained.state_dict(), plain.state_dict())  # the same set as without the LoRA
    for n, p in pipe.unet.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, adapter[n][0]) and p.requires_grad == adapter[n][1], n
    with prkit.residuals_disabled(pipe.unet):
        torch.testing.assert_close(run_unet(pipe.unet, inputs), with_lora, atol=0, rtol=0)  # the LoRA is on again


def test_a_peft_lora_target_trains_beside_a_loaded_lora(tmp_path, concept):
    """The LoRA baseline (a peft target on the attention layers) still trains while a LoRA is loaded: adapters are
    switched off for the other targets only, as peft's switch is per layer and would take the trained adapter off."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = make_pipe(tmp_path / "d")  # a style LoRA on the same attention layers the target trains
    donor.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in donor.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "style", unet_lora_layers=get_peft_model_state_dict(donor.unet))
    pipe = make_pipe(tmp_path / "p")
    load_lora_file(pipe, tmp_path / "style/pytorch_lora_weights.safetensors", adapter_name="style")
    result = prkit.train_residuals(pipe, concept, steps=3, target="lora", rank=2, learning_rate=1e-2, **FAST)
    assert result.completed and all(math.isfinite(v) for v in result.losses)
    state = result.residuals.state_dict()
    assert state and any(k.endswith("lora_B.default.weight") and v.abs().max() > 0 for k, v in state.items())


def test_recipe_settings_are_checked_when_made_and_the_concepts_template_is_used(pipe, concept):
    """Settings that failed deep in a run (KeyError, IndexError, a raw dtype error), trained something else
    (a template without the identifier, a negative clipping norm flipping the gradients, a prompt string read
    letter by letter) or were ignored (the concept's own prompt template) are refused or honoured up front."""
    from dataclasses import replace

    from prkit.train import TrainConfig

    for bad, match in [(dict(prompt_template="a {token} {klass}"), "must contain {token}"),
                       (dict(prompt_template="a photo of a {class_word}"), "must contain {token}"),
                       (dict(mixed_precision="fp32"), "one of auto, no, bf16, fp16"),
                       (dict(max_grad_norm=-1.0), "max_grad_norm must be a finite number >= 0"),
                       (dict(prior_weight=-1), "prior_weight must be"),
                       (dict(validation_prompts="a sks dog"), "must be a list of prompts"),
                       (dict(validation_prompts=("a {sks} dog",)), "may use only {token} and {class_word}"),
                       (dict(prior_images=[concept.images[0]]), "must be a prkit Concept"),
                       (dict(stop_after=0), "stop_after must be a whole number >= 1"),
                       (dict(seed="10"), "seed must be a whole number"), (dict(seed=1.5), "seed must be a whole"),
                       (dict(seed=2 ** 70), "seed must be a whole number"),
                       (dict(target="bogus"), "target 'bogus' is not a training target; use one of residuals"),
                       # the rank failed only once training started
                       (dict(rank=1.0), "TrainConfig.rank 1.0 is neither a fraction of the channels below 1"),
                       (dict(rank=0), r"TrainConfig.rank must be a positive fraction \(e.g. 0.05\) or an int, got 0"),
                       (dict(rank="0.05"), "TrainConfig.rank must be a positive fraction")]:
        with pytest.raises(ValueError, match=re.escape(match) if "{" in match else match):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match=r"rank 2.5 is neither a fraction"):
        prkit.add_residuals(pipe.unet, rank=2.5)
    with pytest.warns(UserWarning, match=r"rank 10000 exceeds the channels of \d+ block"):
        prkit.remove_residuals(pipe.unet, prkit.add_residuals(pipe.unet, rank=10000).name)
    pipe.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"mixed_precision='fp16' on a UNet stored in bf16.*dtype='fp16'"):
        prkit.train_residuals(pipe, concept, steps=1, mixed_precision="fp16", progress=False)
    assert prkit.residual_names(pipe.unet) == []
    pipe.to(torch.float32)
    own = replace(concept, prompt_template="a picture of {token} with grass")
    runs = {name: prkit.train_residuals(pipe, c, steps=2, batch_size=2, name=name, progress=False, **kw).losses
            for name, c, kw in [("own", own, {}), ("default", concept, {}),
                                ("given", concept, dict(prompt_template="a picture of {token} with grass"))]}
    assert runs["own"] == runs["given"] != runs["default"]


def test_freeu_is_off_while_training_and_back_after(tmp_path, concept):
    """FreeU reweights the decoder at sampling time; left on, the residuals learned against a model their file
    does not name (losses and factors moved by up to 0.056 on the tiny UNet)."""
    plain = prkit.train_residuals(make_pipe(tmp_path / "a"), concept, steps=2, batch_size=2, progress=False)
    pipe = make_pipe(tmp_path / "b")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    freeu = prkit.train_residuals(pipe, concept, steps=2, batch_size=2, progress=False)
    assert freeu.losses == plain.losses
    assert all(torch.equal(a, b) for a, b in zip(freeu.residuals.state_dict().values(),
                                                 plain.residuals.state_dict().values()))
    assert [(b.s1, b.s2, b.b1, b.b2) for b in pipe.unet.up_blocks] == [(0.9, 0.2, 1.2, 1.4)] * len(pipe.unet.up_blocks)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_loss_target_follows_the_schedulers_prediction_type(pipe, concept, kind):
    """An x0-predicting model ("sample") was trained toward the velocity: every type but epsilon took v's target."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, prediction_type=kind)
    scheduler = train.training_scheduler(pipe)
    cache = train._Cache(pipe, concept, "a photo of a sks dog", flip=False)
    noisy, steps, target = cache.batch(3, torch.Generator().manual_seed(0), scheduler, "cpu")
    gen = torch.Generator().manual_seed(0)  # the same draws, in the same order
    idx = torch.randint(len(cache.mean), (3,), generator=gen)
    latents = cache.mean[idx] + cache.std[idx] * torch.randn(cache.mean[idx].shape, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    want = {"epsilon": noise, "v_prediction": scheduler.get_velocity(latents, noise, steps), "sample": latents}[kind]
    assert torch.equal(target, want) and not torch.equal(target, noise if kind != "epsilon" else latents)
    pipe.scheduler = DDIMScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="scheduler predicts 'flow'; training supports epsilon, v_prediction, sample"):
        train.training_scheduler(pipe)


def test_the_training_schedule_is_the_pipeline_schedulers_even_where_it_took_its_defaults(pipe):
    """diffusers' from_config drops the settings a scheduler took from its own defaults, so an LCMScheduler()
    (SD's scaled_linear 0.00085-0.012 by default) trained on DDPM's linear 0.0001-0.02 (alphas up to 0.23 off)."""
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler()
    scheduler = train.training_scheduler(pipe)
    assert (scheduler.config.beta_schedule, scheduler.config.beta_start) == ("scaled_linear", 0.00085)
    assert torch.equal(scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)


@pytest.mark.parametrize("sampler", ["LCMScheduler", "TCDScheduler", "SASolverScheduler"])
def test_a_samplers_own_settings_do_not_warn_that_the_models_scheduler_config_is_wrong(pipe, sampler):
    """The DDPM schedule made of an LCM or TCD sampler's config made diffusers warn "The config attributes
    {'original_inference_steps': 50, 'timestep_scaling': 10.0} were passed to DDPMScheduler, but are not expected
    and will be ignored. Please verify your scheduler_config.json configuration file." at every training run, twice
    with a checkpoint: nothing is wrong with the model's file, those settings are the sampler's own."""
    import logging

    import diffusers

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    library = logging.getLogger("diffusers")  # which propagates nothing to the root logger (caplog's)
    pipe.scheduler = getattr(diffusers, sampler)(beta_schedule="scaled_linear", prediction_type="v_prediction")
    library.addHandler(handler)
    try:
        scheduler = train.training_scheduler(pipe)
    finally:
        library.removeHandler(handler)
    assert said == []
    assert torch.equal(scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    assert scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("sampler", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
                                     "FlowMatchEulerDiscreteScheduler"])
def test_a_sampler_without_a_ddpm_noise_schedule_is_refused_for_training(pipe, sampler):
    """An EDM sampler (Playground v2.5's, CosXL's) or a flow-matching one describes no beta schedule: training took
    DDPM's defaults (linear 0.0001-0.02, epsilon) and trained a model on noise levels and timesteps it never saw."""
    import diffusers

    pipe.scheduler = getattr(diffusers, sampler)()
    with pytest.raises(ValueError, match=f"scheduler, {sampler}, describes no DDPM noise schedule"):
        train.training_scheduler(pipe)


def test_a_sampler_feeding_the_unet_continuous_timesteps_is_refused_for_training(pipe, concept):
    """An Euler scheduler with timestep_type="continuous" and v-prediction feeds the UNet 0.25 * log(sigma) (-1.2 to
    0.9), not DDPM's 0-999: its model was trained on those (EDM-style). Training drew integer timesteps 0-999 and
    trained the residuals at timesteps that sampling never gives the UNet, without a word."""
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                            timestep_type="continuous")
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler, feeds the UNet continuous timesteps "
                                         r"\(timestep_type='continuous'"):
        prkit.train_residuals(pipe, concept, steps=1, **FAST)
    assert prkit.residual_names(pipe.unet) == []  # refused before anything is added
    pipe.scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type="epsilon",
                                            timestep_type="continuous")  # discrete timesteps all the same
    assert train.training_scheduler(pipe).config.prediction_type == "epsilon"


@pytest.mark.parametrize("force_upcast", [True, False])
def test_a_float16_vae_that_asks_for_upcasting_encodes_in_float32(force_upcast):
    """SDXL's VAE says force_upcast (it overflows in float16), and diffusers' pipelines encode and decode with it in
    float32; training encoded its images in float16 (NaN latents on SDXL's own VAE, refused as an error)."""
    from types import SimpleNamespace

    from tiny import tiny_vae

    full = tiny_vae()
    vae = tiny_vae().half()
    vae.register_to_config(force_upcast=force_upcast)
    full.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})  # the same weights, in float32
    seen = []
    vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = train_inputs.encode_images(SimpleNamespace(vae=vae), images)
    assert seen == [torch.float32 if force_upcast else torch.float16] and vae.dtype == torch.float16
    want = train_inputs.encode_images(SimpleNamespace(vae=full), images)
    if force_upcast:
        assert torch.equal(mean, want[0]) and torch.equal(std, want[1])
    else:
        assert not torch.equal(mean, want[0])


def _asymmetric_concept():
    images = []
    for i in range(3):
        img = Image.new("RGB", (16, 16), (40 * i, 100, 200))
        img.paste((250, 30, 10), (1, 2, 6, 9))  # off-centre in both axes
        images.append(img)
    return Concept(images=images, token="sks", class_word="dog", paths=[])


def test_the_cache_encodes_each_image_and_its_horizontal_mirror(pipe, monkeypatch):
    concept = _asymmetric_concept()
    seen = []
    real = train_inputs.encode_images
    monkeypatch.setattr(train_inputs, "encode_images", lambda p, images, **kw: seen.append(images) or real(p, images, **kw))
    cache = train_inputs._Cache(pipe, concept, "a photo of a sks dog", flip=True)
    originals = concept.tensors()
    assert not torch.equal(originals, originals.flip(-1)) and not torch.equal(originals, originals.flip(-2))
    assert torch.equal(seen[-1], torch.cat([originals, originals.flip(-1)]))
    assert len(cache.mean) == 6
    plain = train_inputs._Cache(pipe, concept, "a photo of a sks dog", flip=False)
    assert torch.equal(seen[-1], originals) and len(plain.mean) == 3
    torch.testing.assert_close(cache.mean[:3], plain.mean)


def test_encoding_reads_the_vaes_device_and_dtype_once_not_per_image(pipe, monkeypatch):
    """diffusers walks every module of the VAE for each read of ``vae.device`` / ``vae.dtype`` (~2 ms on SD's VAE on
    a CPU): the encoding reads them once for all its chunks."""
    reads = []
    cls = type(pipe.vae)
    for name in ("device", "dtype"):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, property(lambda self, real=real, name=name: reads.append(name) or
                                                real.fget(self)))
    images = torch.zeros(5, 3, 64, 64)
    mean, _ = train_inputs.encode_images(pipe, images, batch=1)
    assert len(mean) == 5
    assert reads.count("device") == 1 and reads.count("dtype") <= 2  # (and once for the float16 upcast check)


def test_the_cache_reads_the_pixels_in_the_thread_that_encodes_them(pipe, monkeypatch):
    """With an executor (the fast loop's background thread) the images are turned into pixels there, beside the
    prompt's encoding, not in the caller's thread before it; the latents are the same."""
    from concurrent.futures import ThreadPoolExecutor

    concept = _asymmetric_concept()
    threads = []
    real = Concept.tensors
    monkeypatch.setattr(Concept, "tensors", lambda self, *a, **k: threads.append(threading.current_thread().name)
                        or real(self, *a, **k))
    with ThreadPoolExecutor(1, thread_name_prefix="encoder") as pool:
        cache = train_inputs._Cache(pipe, concept, "a photo of a sks dog", flip=True, latents_in=pool)
        assert cache.size == (concept.images[0].size[1], concept.images[0].size[0])
        cache.encode_latents()
    assert len(threads) == 1 and threads[0].startswith("encoder")
    here = train_inputs._Cache(pipe, concept, "a photo of a sks dog", flip=True)
    torch.testing.assert_close(cache.mean, here.mean, rtol=0, atol=0)
    torch.testing.assert_close(cache.std, here.std, rtol=0, atol=0)


def test_the_cache_decodes_lazily_opened_images_in_the_callers_thread(pipe, tmp_path, monkeypatch):
    """A Concept built from Image.open(...) (decoded on first use) is decoded before the executor reads its pixels,
    so that no two threads decode one image at once (Pillow's load is not thread-safe); an empty one is refused."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import ImageFile

    for i, image in enumerate(_asymmetric_concept().images):
        image.save(tmp_path / f"{i}.png")
    lazy = Concept(images=[Image.open(tmp_path / f"{i}.png") for i in range(3)], token="sks", class_word="dog",
                   paths=[])
    decoded = []  # (image, thread) of each image's first, decoding load
    real = ImageFile.ImageFile.load

    def load(self):
        if not any(image is self for image, _ in decoded):
            decoded.append((self, threading.current_thread().name))
        return real(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with ThreadPoolExecutor(1, thread_name_prefix="encoder") as pool:
        train_inputs._Cache(pipe, lazy, "a photo of a sks dog", flip=False, latents_in=pool).encode_latents()
    assert len(decoded) == 3 and {thread for _, thread in decoded} == {threading.current_thread().name}
    with pytest.raises(ValueError, match="the concept has no images"):  # (an IndexError from Concept.size before)
        train_inputs._Cache(pipe, Concept(images=[], token="sks", class_word="dog", paths=[]), "a sks dog", False)
    with pytest.raises(ValueError, match="the concept has no images"):
        train_inputs._Cache(pipe, Concept(images=[], token="sks", class_word="dog", paths=[]), "a sks dog", False)


def test_a_concept_of_mixed_sizes_is_refused_before_anything_is_encoded(pipe, monkeypatch):
    concept = _asymmetric_concept()
    concept.images[0] = concept.images[0].resize((concept.images[0].size[0] * 2, concept.images[0].size[1]))
    called = []
    monkeypatch.setattr(train_inputs, "encode_text", lambda *a, **k: called.append(a))
    with pytest.raises(ValueError, match="2 sizes .*crop or resize them to one size"):
        train_inputs._Cache(pipe, concept, "a photo of a sks dog", flip=False)
    assert called == []


LOOP = FastConfig(cuda_graph=False, check_every=3)


def _first_loss(tmp_path, concept, prior, weight, loop):
    kw = dict(steps=1, batch_size=2, prior_images=prior, prior_weight=weight, seed=1, learning_rate=1e-3)
    pipe = make_pipe(tmp_path / f"{loop}{weight}")
    if loop == "eager":
        return prkit.train_residuals(pipe, concept, progress=False, fast=False, **kw).losses[0]
    return train_fast(pipe, concept, TrainConfig(**kw), progress=False, fast=LOOP).losses[0]


@pytest.mark.parametrize("loop", ["eager", "fast"])
def test_the_prior_term_is_weighted_by_prior_weight(tmp_path, concept, loop):
    prior = make_concept(token="zwx", class_word="dog")
    # the first step's loss is L_concept + w * L_prior (same draws, same initial weights for every w)
    half, one, two = (_first_loss(tmp_path, concept, prior, w, loop) for w in (0.5, 1.0, 2.0))
    assert two - one == pytest.approx(2 * (one - half), rel=1e-4)
    assert abs(two - one) > 1e-4


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_the_fast_loop_uses_the_configured_weight_decay(tmp_path, concept, decay):
    kw = dict(steps=3, batch_size=2, weight_decay=decay, learning_rate=1e-2, seed=0)
    eager = prkit.train_residuals(make_pipe(tmp_path / "e"), concept, progress=False, fast=False, **kw)
    fast = train_fast(make_pipe(tmp_path / "f"), concept, TrainConfig(**kw), progress=False, fast=LOOP)
    a, b = eager.residuals.state_dict(), fast.residuals.state_dict()
    # atol 5e-5: the two loops round differently, and Adam magnifies that where a gradient is near its eps (1e-8):
    # at 0.5, one element of 1920 gets a step-2 gradient of 4.6e-8 whose rounding moves it 1.6e-5 (diffusers 0.35,
    # transformers 4.45). A decay off by 10% moves the factors by 2.6e-4 or more, a missing one by 2.6e-3
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=5e-5) for k in a)


def test_timesteps_are_drawn_over_the_whole_schedule(pipe, concept):
    scheduler = train.training_scheduler(pipe)
    cache = train._Cache(pipe, concept, "a photo of a sks dog", flip=False)
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([cache.batch(8, gen, scheduler, "cpu")[1] for _ in range(100)])
    total = scheduler.config.num_train_timesteps
    assert drawn.min() < total * 0.05 and drawn.max() >= total * 0.95
    assert abs(drawn.float().mean().item() - (total - 1) / 2) < total * 0.05  # uniform: no end favoured


@pytest.mark.parametrize("token,class_word,said", [
    (None, "dog", "token is required"), ("", "dog", "token must be a non-empty string"),
    ("sks", None, "class_word is required"), ("dog", "dog", "token and class_word are both 'dog'"),
    ("my dog", "dog", "contains whitespace")])
def test_a_concept_built_by_hand_is_checked_for_its_words_before_training(tmp_path, token, class_word, said):
    """A Concept made directly (not by load_concept) with no identifier trained on 'a photo of a None dog' or
    'a photo of a  dog': residuals without the concept's token, which LAG cannot find. Refused as load_concept
    refuses it, before anything is added to the model."""
    pipe = make_pipe(tmp_path)
    concept = make_concept()
    concept.token, concept.class_word = token, class_word
    with pytest.raises(ValueError, match=said):
        prkit.train_residuals(pipe, concept, steps=1, **FAST)
    assert prkit.residual_names(pipe.unet) == []


@pytest.mark.parametrize("bad", [0, 2.5, "25"])
def test_bad_validation_steps_are_refused_before_training_not_at_the_first_validation(tmp_path, concept, bad):
    """validation_steps=0 was accepted and failed in generate() at the first validation, validate_every steps into
    the run (minutes on SD), in generate's words ('steps must be ...') that did not name the setting."""
    pipe = make_pipe(tmp_path)
    calls = []
    real = train._backward
    train_steps = dict(steps=3, validate_every=2, validation_prompts=("a photo of a {token} {class_word}",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
        with pytest.raises(ValueError, match=rf"TrainConfig\.validation_steps must be a whole number >= 1 .*, got {bad!r}"):
            prkit.train_residuals(pipe, concept, validation_steps=bad, **train_steps, **FAST)
    assert calls == [] and prkit.residual_names(pipe.unet) == []


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_a_pipeline_part_built_empty_on_the_meta_device_is_refused_naming_it(tmp_path, concept, part):
    """A UNet (or VAE, text encoder) on the meta device, built empty and never loaded: refused before anything is
    added, naming the part and the way out; training failed in the text encoder with torch's "Cannot copy out of
    meta tensor; no data!". A checkpoint of the folder is not set aside by the refused call."""
    pipe = make_pipe(tmp_path / "p")
    ckpt = tmp_path / "ckpt"
    prkit.train_residuals(make_pipe(tmp_path / "p0"), concept, steps=1, checkpoint_dir=str(ckpt), **FAST)
    setattr(pipe, part, getattr(pipe, part).to("meta"))
    with pytest.raises(ValueError, match=rf"the pipeline's {part} has no weights: '.+' is on the meta device.*Load"):
        prkit.train_residuals(pipe, concept, steps=1, checkpoint_dir=str(ckpt), resume=False, **FAST)
    assert prkit.residual_names(pipe.unet) == [] and [p.name for p in ckpt.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("fast", [True, False])
def test_validation_images_that_come_out_non_finite_warn_and_training_goes_on(tmp_path, concept, monkeypatch, fast):
    """generate refuses NaN images (sample_checks.NonFiniteImages); called by validation, that refusal ended the
    run, its steps since the last checkpoint lost. Now validation warns, records no images for that step, and the
    run trains to its end."""
    from prkit import sample as sample_module
    from prkit.sample_checks import NonFiniteImages

    calls = []

    def refuse(pipe, prompts, *args, **kwargs):
        calls.append(list(prompts))
        raise NonFiniteImages("generate: 1 denoising steps of X gave non-finite latents")

    monkeypatch.setattr(sample_module, "generate", refuse)
    with pytest.warns(UserWarning, match=r"^validation images not made: generate: 1 denoising steps of X gave "
                                         r"non-finite latents; training goes on$"):
        result = prkit.train_residuals(make_pipe(tmp_path), concept, steps=2, validate_every=1,
                                       validation_prompts=("a {token}",), validation_steps=1, fast=fast,
                                       **FAST)
    assert result.completed and result.steps_done == 2 and len(result.losses) == 2
    assert result.validation == {1: [], 2: []}
    assert calls == [["a sks"], ["a sks"]]


@pytest.mark.parametrize("variant,said", [
    (dict(in_channels=9), r"takes 9 input channels, but its VAE's latents have 4 \(an inpainting UNet"),
    (dict(in_channels=8), r"takes 8 input channels, but its VAE's latents have 4 \(an InstructPix2Pix UNet"),
    (dict(class_embed_type="timestep"), r"is class-conditioned \(class_embed_type='timestep'\)"),
    (dict(num_class_embeds=10), r"is class-conditioned \(num_class_embeds=10\)"),
    (dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
     r"takes SDXL's added conditions \(addition_embed_type='text_time'\), which a StableDiffusionPipeline")])
def test_a_unet_that_is_not_text_to_image_is_refused_before_anything_is_added(tmp_path, concept, variant, said):
    """An inpainting or InstructPix2Pix UNet (more input channels than the latents), a class-conditioned one, or an
    SDXL UNet in an SD pipeline: training failed at its first step, the set already added, with torch's "expected
    input[4, 4, 8, 8] to have 9 channels", diffusers' "class_labels should be provided" or "argument of type
    'NoneType' is not iterable", naming neither the part nor the way out."""
    from diffusers import UNet2DConditionModel

    pipe = make_pipe(tmp_path)
    pipe.unet = UNet2DConditionModel(**{**dict(pipe.unet.config), **variant})
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    with pytest.raises(ValueError, match=rf"^train_residuals: the pipeline's UNet {said}"):
        prkit.train_residuals(pipe, concept, steps=1, **FAST)
    assert prkit.residual_names(pipe.unet) == [] and [p.requires_grad for p in pipe.unet.parameters()] == flags


@pytest.mark.parametrize("kind,part", [("sd", "text_encoder"), ("sd", "tokenizer"), ("sd", "vae"),
                                       ("sdxl", "text_encoder"), ("sdxl", "text_encoder_2"), ("sdxl", "tokenizer_2")])
def test_a_pipeline_without_a_part_that_training_uses_is_refused_naming_it(tmp_path, concept, kind, part):
    """A pipeline loaded with text_encoder=None (or without its VAE or a tokenizer) failed inside diffusers, the set
    already added, with "'NoneType' object has no attribute 'config'" (or 'tokenize', 'dtype'), or, an SDXL base
    without its first text encoder, with torch's "Expected size for first two dimensions of batch2 tensor"."""
    from test_pipeline import _tiny_sdxl

    pipe = _tiny_sdxl(tmp_path) if kind == "sdxl" else make_pipe(tmp_path)
    setattr(pipe, part, None)
    with pytest.raises(ValueError, match=rf"^train_residuals: the pipeline's {part} is None: .* Load the pipeline "
                                         rf"with its {part} \(prkit.load_pipeline\(...\), or pipe.{part} = ... from "
                                         rf"the model's {part}/ folder\) and train again$"):
        prkit.train_residuals(pipe, concept, steps=1, **FAST)
    assert prkit.residual_names(pipe.unet) == []


def test_an_sdxl_refiner_without_a_first_text_encoder_still_trains(tmp_path, concept):
    from test_pipeline import _tiny_sdxl

    pipe = _tiny_sdxl(tmp_path, refiner=True)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert prkit.train_residuals(pipe, concept, steps=1, **FAST).completed


def _ip_adapter_file(unet, folder) -> None:
    """A random IP-Adapter (4 image tokens, 16-d image embeddings) for ``unet``, as folder/ip.safetensors."""
    from safetensors.torch import save_file

    width, gen = unet.config.cross_attention_dim, torch.Generator().manual_seed(1)
    state = {"image_proj.proj.weight": torch.randn(4 * width, 16, generator=gen) * 0.1,
             "image_proj.proj.bias": torch.zeros(4 * width), "image_proj.norm.weight": torch.ones(width),
             "image_proj.norm.bias": torch.zeros(width)}
    for i, name in enumerate(n for n in unet.attn_processors if n.endswith("attn2.processor")):
        channels = unet.get_submodule(name.rsplit(".", 1)[0]).to_q.out_features
        for part in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * i + 1}.{part}.weight"] = torch.randn(channels, width, generator=gen) * 0.1
    folder.mkdir(parents=True)
    save_file(state, str(folder / "ip.safetensors"))


def test_a_loaded_ip_adapter_is_refused_with_the_way_out_and_training_goes_after_unloading_it(tmp_path, concept):
    """With an IP-Adapter loaded (pipe.load_ip_adapter) the UNet wants an image prompt at every call: training failed
    at its first step, the set already added, with diffusers' "argument of type 'NoneType' is not iterable"."""
    pipe = make_pipe(tmp_path / "p")
    _ip_adapter_file(pipe.unet, tmp_path / "ip")
    pipe.load_ip_adapter(str(tmp_path / "ip"), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    with pytest.raises(ValueError, match=r"^train_residuals: the pipeline's UNet has an IP-Adapter loaded "
                                         r"\(encoder_hid_dim_type='ip_image_proj'\).*pipe\.unload_ip_adapter\(\)"):
        prkit.train_residuals(pipe, concept, steps=1, **FAST)
    assert prkit.residual_names(pipe.unet) == []
    pipe.unload_ip_adapter()
    assert prkit.train_residuals(pipe, concept, steps=1, **FAST).completed


def test_a_merged_set_is_refused_with_the_way_out_that_training_has(tmp_path, concept):
    """A set merged into the base weights was refused by generate's words, "unmerge() them first, or pass them in
    residuals=": train_residuals has no residuals=. The refusal says how to train beside it, before anything is
    added."""
    pipe = make_pipe(tmp_path)
    first = prkit.train_residuals(pipe, concept, steps=1, name="first", **FAST).residuals
    first.merge()
    with pytest.raises(ValueError) as err:
        prkit.train_residuals(pipe, make_concept("zwx", "cat"), steps=1, name="second", **FAST)
    assert str(err.value) == (
        "train_residuals: residual set(s) ['first'] are merged into the base weights, so the new set would train on "
        "top of them: unmerge() them first (prkit.get_residuals(pipe.unet, 'first').unmerge()), train, and merge "
        "again after")
    assert prkit.residual_names(pipe.unet) == ["first"] and first.merged
