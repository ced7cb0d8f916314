"""Resuming safely: a checkpoint only continues its own run, a failed call can be repeated in the same process,
an interrupt during an update still resumes exactly, and training is independent of what else is on the model."""

from __future__ import annotations

import re
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

import prkit
import prkit.train as train
import prkit.train_inputs as train_inputs
from conftest import child_env, interrupt_backward, interrupt_fast_step, make_pipe
from prkit.checkpoints import CheckpointError
from prkit.data import Concept
from prkit.residuals import get_residuals, residual_names

FAST = dict(progress=False, batch_size=4)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _other_concept():
    images = [Image.new("RGB", (16, 16), (10, 20 * i, 240)) for i in range(3)]
    return Concept(images=images, token="zwx", class_word="cat", paths=[])


def _stopped(tmp_path, concept, ckpt, **kw):
    return prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=6, checkpoint_dir=str(ckpt),
                                 checkpoint_every=2, stop_after=2, **FAST, **kw)


def test_a_checkpoint_of_another_concept_is_refused_with_the_way_out(tmp_path, concept):
    ckpt = tmp_path / "ckpt"
    _stopped(tmp_path, concept, ckpt)
    pipe = make_pipe(tmp_path / "p2")
    with pytest.raises(CheckpointError) as err:
        prkit.train_residuals(pipe, _other_concept(), steps=6, checkpoint_dir=str(ckpt), **FAST)
    message = str(err.value)
    assert str(ckpt / "checkpoint.pt") in message and "another run (at step 2)" in message
    assert "images (another one)" in message and "token ('sks' there, 'zwx' here)" in message
    assert "resume=False" in message and "--no-resume" in message
    assert isinstance(err.value, ValueError)
    with pytest.raises(CheckpointError, match=r"seed \(0 there, 7 here\)"):
        prkit.train_residuals(pipe, concept, steps=6, seed=7, checkpoint_dir=str(ckpt), **FAST)
    fresh = prkit.train_residuals(pipe, _other_concept(), steps=2, checkpoint_dir=str(ckpt), resume=False, **FAST)
    assert fresh.completed and fresh.steps_done == 2  # resume=False starts over (and replaces the checkpoint)


def test_a_checkpoint_past_the_last_step_or_damaged_is_refused(tmp_path, concept):
    ckpt = tmp_path / "ckpt"
    _stopped(tmp_path, concept, ckpt)
    with pytest.raises(CheckpointError, match=r"is at step 2, past this run's steps=1: ask for at least 2"):
        prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=1, checkpoint_dir=str(ckpt), **FAST)
    (ckpt / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint\.pt'.*damaged or not a prkit training checkpoint.*start over"):
        prkit.train_residuals(make_pipe(tmp_path / "p3"), concept, steps=6, checkpoint_dir=str(ckpt), **FAST)


def test_a_finished_checkpoint_is_not_passed_off_as_a_run_at_another_learning_rate(tmp_path, concept):
    ckpt = tmp_path / "ckpt"
    done = prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=2, learning_rate=1e-3,
                                 checkpoint_dir=str(ckpt), checkpoint_every=2, **FAST)
    with pytest.raises(CheckpointError, match=r"already holds all 2 steps, trained at learning rate 0\.001: this "
                                              r"run's 0\.5 would train nothing.*--no-resume.*ask for more steps"):
        prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=2, learning_rate=0.5,
                              checkpoint_dir=str(ckpt), **FAST)
    same = prkit.train_residuals(make_pipe(tmp_path / "p3"), concept, steps=2, learning_rate=1e-3,
                                 checkpoint_dir=str(ckpt), **FAST)  # the same run again: its result, as before
    assert _equal_states(same.residuals.state_dict(), done.residuals.state_dict())
    more = prkit.train_residuals(make_pipe(tmp_path / "p4"), concept, steps=3, learning_rate=0.5,
                                 checkpoint_dir=str(ckpt), **FAST)  # continuing at the new rate is allowed
    assert more.completed and more.steps_done == 3


def test_a_failed_call_can_be_repeated_on_the_same_pipe_and_resumes_exactly(tmp_path, concept, monkeypatch):
    steps = 8
    reference = prkit.train_residuals(make_pipe(tmp_path / "ref"), concept, steps=steps, **FAST)
    real_backward = interrupt_backward(monkeypatch, at=5)
    pipe, ckpt = make_pipe(tmp_path / "p"), tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        prkit.train_residuals(pipe, concept, steps=steps, checkpoint_dir=str(ckpt), checkpoint_every=0, **FAST)
    assert residual_names(pipe.unet) == ["default"]  # the partial set stays (nothing lost) ...
    assert get_residuals(pipe.unet).token == "sks"  # with its words: LAG can use it
    monkeypatch.setattr(train, "_backward", real_backward)
    again = prkit.train_residuals(pipe, concept, steps=steps, checkpoint_dir=str(ckpt), checkpoint_every=0, **FAST)
    assert again.completed and again.losses == reference.losses  # ... and the repeated call replaces it
    assert _equal_states(again.residuals.state_dict(), reference.residuals.state_dict())
    with pytest.raises(ValueError, match="already on this UNet"):  # a finished set is never replaced silently
        prkit.train_residuals(pipe, concept, steps=2, **FAST)


@pytest.mark.parametrize("fast", [False, True])
def test_a_repeated_stop_after_trains_nothing_more(tmp_path, concept, fast, caplog):
    """Each call with the same stop_after trained one step more (the stop was checked only after a step): a notebook
    rerun crept past the step it was told to stop at. Now it stops where it is; a larger stop_after continues."""
    where = dict(steps=6, stop_after=2, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=0, fast=fast, **FAST)
    first = prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, **where)
    with caplog.at_level("WARNING", logger="prkit"):
        again = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, **where)
    assert "checkpoint.pt is at step 2, already at stop_after=2: this call trains nothing" in caplog.text
    assert (again.steps_done, again.completed, again.losses) == (2, False, first.losses)
    assert _equal_states(again.residuals.state_dict(), first.residuals.state_dict())
    saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and again.seconds == saved["seconds"]  # the run's own, not this call's set-up added
    more = prkit.train_residuals(make_pipe(tmp_path / "p3"), concept, **{**where, "stop_after": 4})
    assert (more.steps_done, more.completed, more.losses[:2]) == (4, False, first.losses)


@pytest.mark.parametrize("fast", [False, True])
def test_the_result_names_a_checkpoint_only_where_it_holds_the_final_state(tmp_path, concept, fast):
    """result.checkpoint named checkpoint_dir's file whatever it held: with checkpoint_every=0 a resumed run's final
    steps are written nowhere (it named the step-2 file the run had begun from), a fresh one's not at all (a file
    that did not exist)."""
    ckpt = tmp_path / "ckpt"
    where = dict(steps=4, checkpoint_dir=str(ckpt), checkpoint_every=0, fast=fast, **FAST)
    fresh = prkit.train_residuals(make_pipe(tmp_path / "p0"), concept, **{**where, "checkpoint_dir": str(tmp_path / "c")})
    assert fresh.steps_done == 4 and fresh.checkpoint is None and not (tmp_path / "c" / "checkpoint.pt").exists()
    stopped = prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, stop_after=2, **where)
    assert stopped.checkpoint == ckpt / "checkpoint.pt"  # written where it stopped: its state
    resumed = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, **where)
    assert resumed.steps_done == 4 and resumed.checkpoint is None
    assert torch.load(ckpt / "checkpoint.pt", weights_only=True)["step"] == 2
    written = prkit.train_residuals(make_pipe(tmp_path / "p3"), concept, **{**where, "checkpoint_every": 4})
    assert written.checkpoint == ckpt / "checkpoint.pt"  # resumed at 2, written at its last step
    rerun = prkit.train_residuals(make_pipe(tmp_path / "p4"), concept, **where)  # nothing left: the file holds it
    assert rerun.steps_done == 4 and rerun.checkpoint == ckpt / "checkpoint.pt"


def test_ctrl_c_during_an_update_still_resumes_exactly(tmp_path, concept, monkeypatch):
    steps = 8
    reference = prkit.train_residuals(make_pipe(tmp_path / "ref"), concept, steps=steps, **FAST)
    real_backward, calls = train._backward, []

    def signalled(*args, **kwargs):  # SIGINT arrives after the optimizer updated, before the step is counted
        real_backward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train, "_backward", signalled)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=steps, checkpoint_dir=str(ckpt),
                              checkpoint_every=0, **FAST)
    assert torch.load(ckpt / "checkpoint.pt", weights_only=True)["step"] == 4  # the update and its count
    monkeypatch.setattr(train, "_backward", real_backward)
    resumed = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=steps, checkpoint_dir=str(ckpt),
                                    checkpoint_every=0, **FAST)
    assert resumed.losses == reference.losses
    assert _equal_states(resumed.residuals.state_dict(), reference.residuals.state_dict())


def test_a_second_concept_trains_as_if_alone_and_merged_sets_are_refused(tmp_path, concept):
    alone = prkit.train_residuals(make_pipe(tmp_path / "alone"), _other_concept(), name="b", steps=3, **FAST)
    pipe = make_pipe(tmp_path / "both")
    first = prkit.train_residuals(pipe, concept, name="a", steps=3, **FAST)
    second = prkit.train_residuals(pipe, _other_concept(), name="b", steps=3, **FAST)
    assert _equal_states(second.residuals.state_dict(), alone.residuals.state_dict())
    assert first.residuals.enabled and second.residuals.enabled  # both still on afterwards
    first.residuals.merge()
    with pytest.raises(ValueError, match=r"\['a'\] are merged.*unmerge\(\) them first"):
        prkit.train_residuals(pipe, concept, name="c", steps=1, **FAST)
    assert residual_names(pipe.unet) == ["a", "b"]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_training_inside_no_grad_or_inference_mode_works(tmp_path, concept, context):
    reference = prkit.train_residuals(make_pipe(tmp_path / "ref"), concept, steps=2, **FAST)
    pipe = make_pipe(tmp_path / "p")
    with context():
        result = prkit.train_residuals(pipe, concept, steps=2, **FAST)
    assert result.losses == reference.losses


def test_gradient_checkpointing_the_caller_had_on_stays_on(tmp_path, concept):
    pipe = make_pipe(tmp_path)
    pipe.unet.enable_gradient_checkpointing()
    prkit.train_residuals(pipe, concept, steps=1, gradient_checkpointing=True, **FAST)
    assert pipe.unet.is_gradient_checkpointing


def test_non_finite_latents_are_refused_before_training(tmp_path, concept, monkeypatch):
    pipe = make_pipe(tmp_path)
    real_encode = pipe.vae.encode

    def poisoned(x, *args, **kwargs):
        out = real_encode(x, *args, **kwargs)
        out.latent_dist.mean[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(pipe.vae, "encode", poisoned)
    with pytest.raises(ValueError, match=r"encoded 1 of 6 training images \(numbers \[0\].*NaN or infinite"):
        prkit.train_residuals(pipe, concept, steps=2, **FAST)


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("learning_rate", float("nan")),
                                         ("checkpoint_every", -5), ("weight_decay", float("inf")),
                                         ("weight_decay", float("nan")), ("weight_decay", -0.01),
                                         ("weight_decay", "0.01")])
def test_bad_recipe_numbers_name_the_field(field, value):
    """At creation, naming the field: weight_decay=inf trained to NaN and was reported as a divergence to fix by
    lowering the learning rate; NaN, negative and text ones failed in AdamW after the set-up, in its words."""
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        train.TrainConfig(**{field: value})


def test_recipe_numbers_from_numpy_or_torch_are_taken_as_pythons(tmp_path, concept):
    """A sweep's numbers (np.arange, np.linspace, a tensor's item-less scalar) train as Python's, as rank does: they
    were refused as "must be a whole number >= 1, got np.int64(3)"; the residual file records them as plain numbers.
    A numpy float for a whole-number field is still refused."""
    import json

    import numpy as np

    given = dict(steps=np.int64(3), batch_size=np.int32(2), seed=np.uint64(7), learning_rate=np.float32(2e-3),
                 weight_decay=torch.tensor(0.02), checkpoint_every=np.int64(2), validate_every=np.int64(0),
                 validation_steps=np.int64(4), prior_weight=np.float64(0.5), max_grad_norm=np.float32(1.0),
                 stop_after=np.int16(2))
    config = train.TrainConfig(**given)
    for field, value in given.items():
        assert type(getattr(config, field)) is type(value.item()) and getattr(config, field) == value.item(), field
    result = prkit.train_residuals(make_pipe(tmp_path / "p"), concept, config, progress=False,
                                   checkpoint_dir=str(tmp_path / "ckpt"))
    assert result.steps_done == 2 and not result.completed
    json.dumps(result.residuals.meta["config"])  # as the residual file's header writes it
    with pytest.raises(ValueError, match=r"TrainConfig\.steps must be a whole number"):
        train.TrainConfig(steps=np.float64(3.0))


def test_a_checkpoint_is_readable_with_weights_only(tmp_path, concept):
    ckpt = tmp_path / "ckpt"
    _stopped(tmp_path, concept, ckpt)
    state = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["fingerprint"]["token"] == "sks"


def test_only_the_set_a_failed_call_left_is_replaced(tmp_path, concept, monkeypatch):
    real_backward = interrupt_backward(monkeypatch, at=1)
    pipe = make_pipe(tmp_path / "p")
    with pytest.raises(KeyboardInterrupt):
        prkit.train_residuals(pipe, concept, steps=2, **FAST)
    monkeypatch.setattr(train, "_backward", real_backward)
    saved = prkit.train_residuals(make_pipe(tmp_path / "q"), concept, steps=1, **FAST).residuals
    path = saved.save(tmp_path / "r.safetensors")
    prkit.remove_residuals(pipe.unet, "default")
    loaded = prkit.load_residuals(pipe, path)  # a different set under the unfinished one's name
    assert loaded.name == "default"
    with pytest.raises(ValueError, match="already on this UNet"):
        prkit.train_residuals(pipe, concept, steps=2, **FAST)


def test_held_signals_leave_handlers_set_outside_python_alone(monkeypatch):
    real = signal.getsignal
    monkeypatch.setattr(signal, "getsignal", lambda n: None if n == signal.SIGTERM else real(n))
    before = real(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with train.deferred_interrupt():
            signal.raise_signal(signal.SIGINT)
            held = True  # reached: the SIGINT was held until the block ended
    assert held and real(signal.SIGTERM) is before and real(signal.SIGINT) is signal.default_int_handler


def test_a_run_stopped_by_stop_after_resumes_on_the_same_pipeline(tmp_path, concept):
    """stop_after is 'as if interrupted': the same call again, on the same pipeline, continues the set (it was
    refused as a name already taken) and ends where an uninterrupted run ends."""
    full = prkit.train_residuals(make_pipe(tmp_path / "full"), concept, steps=4, **FAST).residuals.state_dict()
    for ckpt in (tmp_path / "ckpt", None):
        pipe = make_pipe(tmp_path / f"p{ckpt is None}")
        where = dict(checkpoint_dir=str(ckpt)) if ckpt else {}
        first = prkit.train_residuals(pipe, concept, steps=4, stop_after=2, **where, **FAST)
        assert not first.completed and first.steps_done == 2
        second = prkit.train_residuals(pipe, concept, steps=4, **where, **FAST)
        assert second.completed and residual_names(pipe.unet) == ["default"]
        if ckpt:  # resumed from the checkpoint: exactly the uninterrupted run
            assert second.steps_done == 4 and _equal_states(second.residuals.state_dict(), full)
    with pytest.raises(ValueError, match="already on this UNet"):  # a finished set is never replaced silently
        prkit.train_residuals(pipe, concept, steps=2, **FAST)


@pytest.mark.parametrize("fast", [False, True])
def test_a_resumed_run_reports_the_seconds_of_all_its_calls(tmp_path, concept, fast, monkeypatch):
    """result.seconds (and the file's meta) count the calls before the resume: a notebook rerun on a finished
    checkpoint reports the run's training time, not the fraction of a second the rerun took."""
    import time

    import prkit.checkpoints as checkpoints

    stamp = checkpoints.fingerprint
    monkeypatch.setattr(checkpoints, "fingerprint", lambda *a: time.sleep(2.0) or stamp(*a))  # a long first call
    where = dict(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, fast=fast, **FAST)
    first = prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=4, stop_after=2, **where)
    monkeypatch.setattr(checkpoints, "fingerprint", stamp)
    saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["seconds"]
    assert 2.0 <= saved <= first.seconds
    for name in ("p2", "p3"):  # the rest of the run, then a rerun on the finished checkpoint (nothing to train)
        pipe = make_pipe(tmp_path / name)
        began = time.perf_counter()
        result = prkit.train_residuals(pipe, concept, steps=4, **where)
        own = time.perf_counter() - began
        assert result.completed and saved <= result.seconds <= own + saved + 1.0
        assert result.residuals.meta["seconds"] == result.seconds
        saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["seconds"]


def test_a_checkpoint_continues_only_on_its_base_model_objective_and_recipe(tmp_path, concept, caplog):
    """Other weights of the same architecture, another prediction type, clipping or class-image weight: refused
    (they resumed silently and the loss jumped). The same model in another dtype still resumes."""
    from diffusers import DDIMScheduler
    from tiny import tiny_unet

    ckpt = tmp_path / "ckpt"
    _stopped(tmp_path, concept, ckpt)
    cases = {"weights (another one)": lambda p: setattr(p, "unet", tiny_unet(seed=123)),
             "scheduler (another one)": lambda p: setattr(p, "scheduler", DDIMScheduler.from_config(
                 p.scheduler.config, prediction_type="v_prediction"))}
    for expected, change in cases.items():
        pipe = make_pipe(tmp_path / "other")
        change(pipe)
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            prkit.train_residuals(pipe, concept, steps=6, checkpoint_dir=str(ckpt), **FAST)
    with pytest.raises(CheckpointError, match=r"max_grad_norm \(None there, 0.1 here\)"):
        prkit.train_residuals(make_pipe(tmp_path / "c"), concept, steps=6, checkpoint_dir=str(ckpt),
                              max_grad_norm=0.1, **FAST)
    half = make_pipe(tmp_path / "h")
    half.unet.to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="prkit.train"):
        resumed = prkit.train_residuals(half, concept, steps=6, checkpoint_dir=str(ckpt), weight_decay=0.5,
                                        mixed_precision="no", **FAST)
    assert resumed.completed and resumed.steps_done == 6
    assert "weight decay 0.01; resuming at this run's 0.5" in caplog.text  # and it trains at 0.5, not the file's


def test_a_resume_trains_at_this_runs_weight_decay(tmp_path, concept):
    state = {}
    for decay in (0.0, 0.9):
        ckpt = tmp_path / f"ckpt{decay}"
        prkit.train_residuals(make_pipe(tmp_path / f"a{decay}"), concept, steps=4, stop_after=2,
                              checkpoint_dir=str(ckpt), weight_decay=0.9, **FAST)
        resumed = prkit.train_residuals(make_pipe(tmp_path / f"b{decay}"), concept, steps=4,
                                        checkpoint_dir=str(ckpt), weight_decay=decay, **FAST)
        state[decay] = resumed.residuals.state_dict()
    assert not _equal_states(state[0.0], state[0.9])


CKPT4 = dict(progress=False, steps=4, checkpoint_every=2)


@pytest.mark.parametrize("field, change", [
    ("flip", dict(flip=False)),
    ("batch_size", dict(batch_size=2)),
    ("prompt", dict(prompt_template="a picture of {token} with grass")),
    ("rank", dict(rank=0.1)),
])
def test_a_checkpoint_of_other_settings_is_refused_naming_them(tmp_path, concept, field, change):
    ckpt = str(tmp_path / "ckpt")
    prkit.train_residuals(make_pipe(tmp_path / "a"), concept, batch_size=4, checkpoint_dir=ckpt, stop_after=2, **CKPT4)
    kw = {"batch_size": 4, **change}
    with pytest.raises(CheckpointError, match=rf"belongs to another run.*\b{field} \("):
        prkit.train_residuals(make_pipe(tmp_path / "b"), concept, checkpoint_dir=ckpt, **kw, **CKPT4)


def test_a_checkpoint_of_another_class_word_is_refused_naming_it(tmp_path, concept):
    ckpt = str(tmp_path / "ckpt")
    prkit.train_residuals(make_pipe(tmp_path / "a"), concept, batch_size=4, checkpoint_dir=ckpt, stop_after=2, **CKPT4)
    with pytest.raises(CheckpointError, match=r"belongs to another run.*class_word \('dog' there, 'cat' here\)"):
        prkit.train_residuals(make_pipe(tmp_path / "b"), replace(concept, class_word="cat"), batch_size=4,
                              checkpoint_dir=ckpt, **CKPT4)


def test_a_sampler_swapped_in_or_clipping_spelt_zero_is_the_same_run(tmp_path, concept):
    """The stamp reads the training scheduler (a DPM-Solver set for sampling trains as the PNDM/DDIM it came from) and
    max_grad_norm 0 is no clipping, as None is; a finished checkpoint at another weight decay is refused."""
    from diffusers import DPMSolverMultistepScheduler

    ckpt = tmp_path / "ckpt"
    _stopped(tmp_path, concept, ckpt)
    pipe = make_pipe(tmp_path / "p2")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    done = prkit.train_residuals(pipe, concept, steps=6, checkpoint_dir=str(ckpt), checkpoint_every=2,
                                 max_grad_norm=0.0, **FAST)
    assert done.completed and done.steps_done == 6
    with pytest.raises(CheckpointError, match="weight decay 0.01: this run's 0.5 would train nothing"):
        prkit.train_residuals(make_pipe(tmp_path / "p3"), concept, steps=6, checkpoint_dir=str(ckpt),
                              weight_decay=0.5, **FAST)


@pytest.mark.parametrize("fast", [False, True])
def test_resume_false_sets_the_earlier_run_aside_and_every_finished_run_is_checkpointed(tmp_path, concept, fast):
    """Starting over must not leave the earlier run resumable: a later call with resume on would otherwise continue
    the run before it (a notebook's `resume=False` rerun with fewer steps than checkpoint_every wrote nothing)."""
    where = dict(checkpoint_dir=str(tmp_path / "ckpt"), fast=fast, **FAST)
    prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=4, checkpoint_every=2, **where)
    again = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=3, seed=5, checkpoint_every=50,
                                  resume=False, **where)
    aside = sorted((tmp_path / "ckpt").glob("checkpoint.replaced-*.pt"))
    assert [torch.load(p, weights_only=True)["step"] for p in aside] == [4]
    assert torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["step"] == 3  # its last step
    more = prkit.train_residuals(make_pipe(tmp_path / "p3"), concept, steps=5, seed=5, checkpoint_every=50, **where)
    assert more.losses[:3] == again.losses and more.steps_done == 5  # continues the run that started over
    prkit.train_residuals(make_pipe(tmp_path / "p4"), concept, steps=2, seed=5, resume=False, **where)
    kept = sorted(torch.load(p, weights_only=True)["step"] for p in (tmp_path / "ckpt").glob("checkpoint.replaced-*"))
    assert kept == [4, 5]  # a second start-over keeps the first one's set-aside file too


def test_an_interrupted_start_over_says_how_to_resume_it(tmp_path, concept, monkeypatch, caplog):
    """With resume=False the next identical call would set the interrupted run aside, not continue it."""
    interrupt_backward(monkeypatch, at=2)
    with caplog.at_level("WARNING", logger="prkit"), pytest.raises(KeyboardInterrupt):
        prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=6, checkpoint_dir=str(tmp_path / "c"),
                              resume=False, stop_after=4, fast=False, **FAST)
    assert "stop_after=4 with resume=False: every call starts over" in caplog.text
    assert "call again with resume=True (CLI: without --no-resume) to resume" in caplog.text


@pytest.mark.parametrize("fast", [False, True])
def test_a_rerun_of_a_finished_run_says_nothing_trains_and_keeps_its_seconds(tmp_path, concept, fast, caplog):
    """A notebook rerun with the same settings resumed the finished checkpoint silently (its page lost the
    validation images without a word) and reported the checkpoint's seconds plus this call's set-up."""
    where = dict(steps=2, checkpoint_dir=str(tmp_path / "ckpt"), fast=fast, **FAST)
    first = prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, **where)
    saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)
    with caplog.at_level("WARNING", logger="prkit"):
        again = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, **where)
    assert "holds all 2 steps of this run: nothing left to train" in caplog.text and "resume=False" in caplog.text
    assert "resuming from" not in caplog.text
    assert again.steps_done == 2 and again.losses == first.losses
    assert again.seconds == pytest.approx(saved["seconds"], abs=0) and again.residuals.meta["seconds"] == again.seconds
    assert _equal_states(again.residuals.state_dict(), first.residuals.state_dict())


def test_a_tilde_in_checkpoint_dir_and_file_paths_is_the_home_folder(tmp_path, concept, monkeypatch):
    """checkpoint_dir="~/x" made a folder named "~" in the current one (and a resume from "~/x" found nothing)."""
    from prkit.files import safetensors_header

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    stopped = prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, steps=4, stop_after=2,
                                    checkpoint_dir="~/ckpt", **FAST)
    assert stopped.checkpoint == home / "ckpt" / "checkpoint.pt"
    assert torch.load(home / "ckpt" / "checkpoint.pt", weights_only=True)["step"] == 2
    resumed = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=4, checkpoint_dir="~/ckpt", **FAST)
    assert resumed.steps_done == 4 and resumed.losses[:2] == stopped.losses
    assert resumed.residuals.save("~/r.safetensors") == home / "r.safetensors"
    assert safetensors_header("~/r.safetensors", "residual file")["token"] == "sks"
    loaded = prkit.load_residuals(make_pipe(tmp_path / "p3"), "~/r.safetensors")
    assert _equal_states(loaded.state_dict(), resumed.residuals.state_dict())
    again = prkit.train_residuals(make_pipe(tmp_path / "p4"), concept, steps=2, checkpoint_dir="~/ckpt",
                                  resume=False, **FAST)  # the earlier run set aside in the home folder too
    assert again.steps_done == 2 and len(list((home / "ckpt").glob("checkpoint.replaced-*.pt"))) == 1
    assert list(work.iterdir()) == []  # no folder named "~"


SIGTERM_RUN = """
import os, signal, sys
from pathlib import Path

import prkit
import prkit.train as train
from conftest import make_concept, make_pipe

signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a scheduler starts a job
real, calls = train._backward, []

def terminated(*args, **kwargs):  # the scheduler's SIGTERM lands in the middle of step 3's update
    refused = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return refused

train._backward = terminated
folder = Path(sys.argv[1])
try:
    prkit.train_residuals(make_pipe(folder / "p"), make_concept(), steps=6, checkpoint_dir=str(folder / "ckpt"),
                          checkpoint_every=0, progress=False, batch_size=4, fast=False)
except KeyboardInterrupt:
    print("interrupted; SIGTERM handler back:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
"""


def test_sigterm_during_library_training_checkpoints_like_ctrl_c(tmp_path, concept):
    """A script calling train_residuals died at a scheduler's SIGTERM without a checkpoint (only the CLI took it
    as Ctrl-C). Run in a child process: before the fix the signal ends the process that receives it."""
    import subprocess
    import sys

    env = child_env(Path(__file__).parent)  # the caller's PYTHONPATH kept: the GPU machine carries diffusers there
    done = subprocess.run([sys.executable, "-c", SIGTERM_RUN, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, f"the child ended with {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "interrupted; SIGTERM handler back: True"
    assert "interrupted at step 3; checkpoint saved to" in done.stderr
    state = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and len(state["losses"]) == 3
    resumed = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, steps=6, checkpoint_dir=str(tmp_path / "ckpt"),
                                    checkpoint_every=0, fast=False, **FAST)
    reference = prkit.train_residuals(make_pipe(tmp_path / "ref"), concept, steps=6, fast=False, **FAST)
    assert resumed.losses[:3] == state["losses"] and resumed.losses == reference.losses


def test_sigterm_is_taken_as_ctrl_c_only_over_the_default_handler_and_in_the_main_thread():
    import os
    import threading

    from prkit.interrupts import terminate_as_interrupt

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt):
            with terminate_as_interrupt():
                assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # else the kill below ends pytest
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back
        own = []
        signal.signal(signal.SIGTERM, lambda number, frame: own.append(number))
        with terminate_as_interrupt():  # the caller's own handler stays in charge
            os.kill(os.getpid(), signal.SIGTERM)
        assert own == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        seen = []

        def in_a_thread():
            with terminate_as_interrupt():  # signals are the main thread's: nothing installed, nothing raised
                seen.append(signal.getsignal(signal.SIGTERM))

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
        assert seen == [signal.SIG_DFL]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_checkpoint_dir_that_cannot_be_written_is_refused_before_training(tmp_path, concept, monkeypatch):
    """It failed at the first checkpoint, after that many steps' work (or at Ctrl-C, losing the run)."""
    import os

    import prkit.fast

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: fake the permission the folder would have
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked and mode & os.W_OK
                            else real(p, mode))
    for loop in (train, prkit.fast):
        monkeypatch.setattr(loop, "_train_eager" if loop is train else "train_fast",
                            lambda *a, **k: pytest.fail("trained before the check"))
    pipe = make_pipe(tmp_path / "p")
    try:
        for fast in (False, True):
            with pytest.raises(ValueError) as err:
                prkit.train_residuals(pipe, concept, steps=2, checkpoint_dir=str(locked / "ckpt"), fast=fast, **FAST)
            assert str(err.value) == (f"checkpoint_dir: cannot write in {str(locked)!r} (permission denied); choose "
                                      "another path")
        assert residual_names(pipe.unet) == [] and list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("direction", ["fast-then-eager", "eager-then-fast"])
def test_a_resumed_optimizer_keeps_its_own_loops_way_of_running(direction):
    """A checkpoint's AdamW settings of how it ran (the fast loop's fused + capturable on CUDA) used to come back with
    its moments, so the eager loop, or a CPU, resumed a GPU run as fused capturable AdamW. Each loop now keeps its
    own, with the step counter where its way wants it; the moments and the step count are the checkpoint's."""
    from prkit.train import load_optimizer

    def adam(fast: bool):
        p = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4))
        extra = {"fused": True, "capturable": True} if fast else {}
        return p, torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0, **extra)

    written_fast = direction == "fast-then-eager"
    p0, writer = adam(written_fast)
    for _ in range(2):
        p0.grad = torch.ones_like(p0)
        writer.step()
    p1, reader = adam(not written_fast)
    load_optimizer(reader, writer.state_dict(), 1e-2, "checkpoint")
    group, state = reader.param_groups[0], reader.state[p1]
    assert bool(group.get("fused")) == bool(group["capturable"]) == (not written_fast)
    assert state["step"].dtype == torch.float32 and float(state["step"]) == 2.0
    assert state["step"].device == p1.device
    assert torch.equal(state["exp_avg"], writer.state[p0]["exp_avg"])
    p1.grad = torch.ones_like(p1)
    reader.step()  # runs as its own loop runs, from the checkpoint's moments
    assert float(reader.state[p1]["step"]) == 3.0



@pytest.mark.parametrize("fast", [False, True])
def test_a_checkpoint_of_another_precision_is_refused_with_the_setting_that_continues_it(tmp_path, concept, fast):
    """A bf16 run resumed in fp32 or fp16 (or the reverse) mixed two precisions in one run without a word: the stamp
    had no precision. It holds what the setting resolves to ('auto' on a CPU: none, as 'no'); an older checkpoint,
    stamped without it, still resumes."""
    import io

    ckpt = tmp_path / "ckpt"
    where = dict(steps=4, checkpoint_dir=str(ckpt), fast=fast, **FAST)
    prkit.train_residuals(make_pipe(tmp_path / "a"), concept, stop_after=2, mixed_precision="bf16", **where)
    path = ckpt / "checkpoint.pt"
    written = path.read_bytes()
    for other, here in (("no", "no"), ("auto", "no"), ("fp16", "fp16")):
        with pytest.raises(CheckpointError) as err:
            prkit.train_residuals(make_pipe(tmp_path / other), concept, mixed_precision=other, **where)
        auto = " (this run's 'auto' is 'no' on its device)" if other == "auto" else ""
        assert str(err.value) == (
            f"{str(path)!r} belongs to another run (at step 2): it differs in mixed_precision ('bf16' there, "
            f"{here!r} here). To continue it, train at its precision: mixed_precision='bf16'{auto}. To keep both, "
            "pass another checkpoint_dir; to start over, delete it, pass another checkpoint_dir, or pass resume=False "
            "(CLI: --no-resume).")
    assert path.read_bytes() == written  # refused before anything was loaded or written
    resumed = prkit.train_residuals(make_pipe(tmp_path / "b"), concept, mixed_precision="bf16", **where)
    straight = prkit.train_residuals(make_pipe(tmp_path / "c"), concept, mixed_precision="bf16",
                                     **{**where, "checkpoint_dir": None})
    assert resumed.steps_done == 4 and resumed.losses == straight.losses  # at its own precision: exact
    assert torch.load(path, weights_only=True)["fingerprint"]["mixed_precision"] == "bf16"
    # a CPU's 'auto' and 'no' are one run
    auto = dict(where, checkpoint_dir=str(tmp_path / "auto"))
    prkit.train_residuals(make_pipe(tmp_path / "d"), concept, stop_after=2, mixed_precision="auto", **auto)
    assert prkit.train_residuals(make_pipe(tmp_path / "e"), concept, mixed_precision="no", **auto).steps_done == 4
    # the bf16 checkpoint as an older prkit stamped it (no mixed_precision): not checked, resumed at its step 2
    old = torch.load(io.BytesIO(written), weights_only=True)
    del old["fingerprint"]["mixed_precision"]
    torch.save(old, path)
    again = prkit.train_residuals(make_pipe(tmp_path / "f"), concept, mixed_precision="no", **where)
    assert again.steps_done == 4 and again.losses[:2] == straight.losses[:2] and again.losses != straight.losses


@pytest.mark.parametrize("fast", [False, True])
def test_an_os_error_that_is_no_checkpoint_write_reaches_the_caller_as_it_was(tmp_path, concept, monkeypatch, fast):
    """Only a checkpoint the disk refused is reworded (the set on the model, how to keep it): any other OSError
    raised once the set exists (a cache folder not writable, a broken pipe) keeps its type, errno and file name."""
    from prkit.fast import FastConfig

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/home/u/.triton/cache/ab12")

    monkeypatch.setattr(train_inputs, "encode_images", denied)
    loop = FastConfig(cuda_graph=False) if fast else False
    with pytest.raises(PermissionError) as err:
        prkit.train_residuals(make_pipe(tmp_path), concept, steps=2, checkpoint_dir=str(tmp_path / "ckpt"),
                              fast=loop, **FAST)
    assert type(err.value) is PermissionError and err.value.filename == "/home/u/.triton/cache/ab12"
    assert str(err.value) == "[Errno 13] Permission denied: '/home/u/.triton/cache/ab12'"


@pytest.mark.parametrize("how", ["stop_after", "interrupt"])
@pytest.mark.parametrize("fast", [False, True])
def test_a_checkpoint_the_disk_refuses_leaves_the_trained_set_on_the_model_and_says_so(tmp_path, concept,
                                                                                        monkeypatch, fast, how):
    """checkpoint_every=0: the only checkpoint, the stop's or the interrupt's, on a full disk raised the write's error
    alone ("then try again"); the set it had trained stayed on the model unsaid, and the call again replaced it,
    starting over. The error now says where the work is and how to keep it."""
    import errno

    from conftest import full_disk
    from prkit.fast import FastConfig

    loop = FastConfig(cuda_graph=False, check_every=1) if fast else False
    two = prkit.train_residuals(make_pipe(tmp_path / "two"), concept, steps=2, fast=loop, **FAST)
    if how == "interrupt" and fast:  # the third step, as Ctrl-C lands in it
        interrupt_fast_step(monkeypatch, at=3)
    elif how == "interrupt":
        interrupt_backward(monkeypatch, at=3)
    ckpt = tmp_path / "ckpt"
    pipe = make_pipe(tmp_path / "p")
    full_disk(monkeypatch, free_mib=3)
    with pytest.raises(OSError) as err:
        prkit.train_residuals(pipe, concept, steps=4, checkpoint_dir=str(ckpt), checkpoint_every=0, fast=loop,
                              stop_after=2 if how == "stop_after" else None, **FAST)
    assert err.value.errno == errno.ENOSPC and str(err.value) == (
        f"[Errno 28] could not write {ckpt / 'checkpoint.pt'}: No space left on device (3 MiB free there); free some "
        "space or write to another disk, then try again. Nothing was written. The residual set 'default' stays on "
        "the model with the weights it had trained: save it where there is room (prkit.save_residuals("
        "prkit.get_residuals(pipe.unet, 'default'), path)) before calling train_residuals again, which replaces it, "
        "starting over: no checkpoint holds this run")
    assert isinstance(err.value, train.TrainingWriteError)  # with the write's own error
    assert str(err.value.error) == str(err.value).split(". The residual set")[0]
    monkeypatch.undo()
    assert residual_names(pipe.unet) == ["default"] and list(ckpt.iterdir()) == []
    kept = get_residuals(pipe.unet, "default")
    assert _equal_states(kept.state_dict(), two.residuals.state_dict())  # the two steps it had trained
    prkit.save_residuals(kept, tmp_path / "kept.safetensors")  # as the message says
    loaded = prkit.load_residuals(make_pipe(tmp_path / "q"), tmp_path / "kept.safetensors")
    assert _equal_states(loaded.state_dict(), two.residuals.state_dict())
    again = prkit.train_residuals(pipe, concept, steps=2, checkpoint_dir=str(ckpt), fast=loop, **FAST)
    assert again.losses == two.losses and residual_names(pipe.unet) == ["default"]  # replaced it, starting over


@pytest.mark.parametrize("code, kind", [("EACCES", PermissionError), ("ENOENT", FileNotFoundError),
                                        ("ENOSPC", OSError)])
def test_a_checkpoint_write_error_is_still_caught_as_the_write_s_own_kind(tmp_path, concept, monkeypatch, code, kind):
    """TrainingWriteError replaced the write's own class: a checkpoint folder no longer writable (PermissionError) or
    gone (FileNotFoundError) was no longer caught by ``except PermissionError``. The error is both now, with the
    write's errno and message, the file it did not write, and it pickles and prints as it reads."""
    import errno
    import os
    import pickle

    number = getattr(errno, code)

    def refused(obj, file, *args, **kwargs):
        raise OSError(number, os.strerror(number))  # OSError(EACCES, ...) is a PermissionError, as the system's

    monkeypatch.setattr(torch, "save", refused)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(kind) as err:
        prkit.train_residuals(make_pipe(tmp_path / "p"), concept, steps=4, checkpoint_dir=str(ckpt),
                              checkpoint_every=0, stop_after=2, fast=False, **FAST)
    monkeypatch.undo()
    out = err.value
    assert isinstance(out, train.TrainingWriteError) and isinstance(out, kind) and type(out.error) is kind
    assert type(out) is train.TrainingWriteError if kind is OSError else type(out).__mro__[1:3] == (
        train.TrainingWriteError, kind)
    assert out.errno == number and out.strerror == str(out).split("] ", 1)[1]
    assert str(out).startswith(f"[Errno {number}] could not write {ckpt / 'checkpoint.pt'}: {os.strerror(number)} (")
    assert str(out.error) in str(out) and "The residual set 'default' stays on the model" in str(out)
    assert out.prkit_checkpoint == ckpt / "checkpoint.pt"  # the file it did not write, as on the write's error
    back = pickle.loads(pickle.dumps(out))
    assert type(back) is type(out) and str(back) == str(out) and back.errno == out.errno
    assert str(back.error) == str(out.error) and back.prkit_checkpoint == out.prkit_checkpoint
    try:
        raise out
    except train.TrainingWriteError as caught:  # the command line's clause
        assert caught is out


def test_a_training_write_error_of_an_os_error_subclass_of_its_own_kind():
    """One class per kind of write error (cached); a kind that cannot be mixed in (its own constructor) gives a
    plain TrainingWriteError, still with the write's errno and error."""
    import pickle

    from prkit.train_config import TrainingWriteError

    first = TrainingWriteError.of(PermissionError(13, "Permission denied"), "could not write x")
    second = TrainingWriteError.of(PermissionError(13, "Permission denied", "y"), "could not write y")
    assert type(first) is type(second) and isinstance(first, PermissionError)
    assert second.filename == "y" and str(second) == "[Errno 13] could not write y: 'y'"
    assert type(first).__name__ == "TrainingWriteError[PermissionError]" and "PermissionError" in repr(first)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # 0-2 write PermissionError as OSError: its errno says
        back = pickle.loads(pickle.dumps(second, protocol))
        assert type(back) is type(second) and str(back) == str(second) and back.filename == "y", protocol

    class Odd(OSError):
        def __init__(self, path):
            super().__init__(5, "Input/output error", path)

    odd = TrainingWriteError.of(Odd("z"), "could not write z")
    assert isinstance(odd, TrainingWriteError) and odd.errno == 5 and str(odd) == "[Errno 5] could not write z: 'z'"
    assert isinstance(odd.error, Odd)
    plain = TrainingWriteError.of(OSError("no errno"), "could not write w")
    assert type(plain) is TrainingWriteError and str(plain) == "could not write w" and plain.errno is None


class _MyWriteError(prkit.train_config.TrainingWriteError):
    pass


def test_a_training_write_error_keeps_its_message_kind_and_class_through_copies():
    """A kind's own __str__ replaced the message (that the set stays on the model); a subclass of
    TrainingWriteError came back from pickle/copy as TrainingWriteError; and pickle's protocols 0-2 lost a kind
    without an errno (they write PermissionError as OSError)."""
    import copy
    import pickle

    from prkit.train_config import TrainingWriteError

    class DiskTrouble(OSError):
        def __str__(self):
            return f"disk trouble ({self.errno})"

    trouble = TrainingWriteError.of(DiskTrouble(28, "No space left on device"), "could not write x")
    assert isinstance(trouble, DiskTrouble) and str(trouble) == "[Errno 28] could not write x"

    mine = _MyWriteError(28, "could not write m")
    copies = (copy.copy(mine), copy.deepcopy(mine), pickle.loads(pickle.dumps(mine)))
    assert all(type(c) is _MyWriteError for c in copies)
    moved = PermissionError(13, "Permission denied", "a.pt.tmp", None, "a.pt")
    moved.__notes__ = ["while renaming"]  # add_note, as Python 3.10 has none
    both = TrainingWriteError.of(moved, "could not write a.pt")
    assert (both.filename, both.filename2) == ("a.pt.tmp", "a.pt") and not getattr(both, "__notes__", None)
    assert str(both) == "[Errno 13] could not write a.pt: 'a.pt.tmp' -> 'a.pt'" and both.error is moved
    quiet = TrainingWriteError.of(PermissionError("no errno"), "could not write q")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(quiet, protocol))
        assert type(back) is type(quiet) and isinstance(back, PermissionError) and str(back) == str(quiet), protocol


def test_a_checkpoint_written_before_exact_copies_were_left_out_is_refused_naming_them(tmp_path, concept):
    """load_concept leaves out exact copies of images (photo.jpg and 'photo (1).jpg'), so a checkpoint a run wrote
    when they still trained stamps other images: it was refused as "another run" without a word of the copies. The
    message names them (the copies alone explain it: the stamp with them is the checkpoint's), and says it can only
    start over; copies where the images differ otherwise as well are named as a possible reason."""
    import shutil

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(concept.images):
        image.save(folder / f"photo{i}.png")
    shutil.copyfile(folder / "photo1.png", folder / "photo1 (1).png")
    with pytest.warns(UserWarning, match="exact copies"):
        now = prkit.load_concept(folder, "sks", "dog", resolution=16)
    assert [p.name for p in now.paths] == ["photo0.png", "photo1.png", "photo2.png"]
    everything = sorted(folder.iterdir(), key=lambda p: p.name)  # as prkit loaded the folder before: copies too
    before = Concept([prkit.data.load_image(p, 16) for p in everything], "sks", "dog", everything)
    ckpt = tmp_path / "ckpt"
    _stopped(tmp_path, before, ckpt)
    with pytest.raises(CheckpointError) as err:
        prkit.train_residuals(make_pipe(tmp_path / "p2"), now, steps=6, checkpoint_dir=str(ckpt), **FAST)
    message = str(err.value)
    assert message.startswith(f"{str(ckpt / 'checkpoint.pt')!r} belongs to another run (at step 2): it differs in "
                              "images (another one). ")
    assert ("It was written when exact copies of images still trained: 'photo1 (1).png' (same bytes as "
            "'photo1.png') trained then and is left out now, so it cannot continue on these images. ") in message
    assert message.endswith("To keep both, pass another checkpoint_dir; to start over, delete it, pass another "
                            "checkpoint_dir, or pass resume=False (CLI: --no-resume).")
    fresh = prkit.train_residuals(make_pipe(tmp_path / "p3"), now, steps=2, checkpoint_dir=str(ckpt), resume=False,
                                  **FAST)
    assert fresh.completed and fresh.steps_done == 2  # as the message says
    other = tmp_path / "other"
    _stopped(tmp_path, Concept(before.images[:2], "sks", "dog", everything[:2]), other)  # without photo2 as well
    with pytest.raises(CheckpointError) as err:
        prkit.train_residuals(make_pipe(tmp_path / "p4"), now, steps=6, checkpoint_dir=str(other), **FAST)
    assert ("images (another one). Part of it may be the exact copies of images in its folder, left out now but "
            "trained by a checkpoint written before: 'photo1 (1).png' (same bytes as 'photo1.png'). To keep both") \
        in str(err.value)
    alone = Concept(now.images, "sks", "dog", [])  # no files: nothing said of copies
    with pytest.raises(CheckpointError) as err:
        prkit.train_residuals(make_pipe(tmp_path / "p5"), alone, steps=6, checkpoint_dir=str(other), **FAST)
    assert "copies" not in str(err.value)


def test_a_checkpoint_continues_only_with_the_vae_encoder_and_text_encoder_it_cached_with(tmp_path, concept):
    """A VAE or text encoder swapped for another between a run and its resume: the resumed steps trained on latents
    or a prompt of another model, without a word. A VAE that differs only in its decoder still resumes."""
    ckpt = tmp_path / "ckpt"
    _stopped(tmp_path, concept, ckpt)

    def scaled(module_of, name):
        def change(pipe):
            with torch.no_grad():
                dict(module_of(pipe).named_parameters())[name].mul_(1.5)
        return change

    cases = {"VAE encoder": scaled(lambda p: p.vae, "encoder.conv_in.weight"),
             "text encoder": scaled(lambda p: p.text_encoder, "embeddings.token_embedding.weight"),
             "latents' scaling": lambda p: p.vae.register_to_config(scaling_factor=0.5)}
    for what, change in cases.items():
        pipe = make_pipe(tmp_path / what)
        change(pipe)
        with pytest.raises(CheckpointError, match=re.escape("inputs (another one)")):
            prkit.train_residuals(pipe, concept, steps=6, checkpoint_dir=str(ckpt), **FAST)
    decoder = make_pipe(tmp_path / "decoder")
    scaled(lambda p: p.vae, "decoder.conv_out.weight")(decoder)
    resumed = prkit.train_residuals(decoder, concept, steps=6, checkpoint_dir=str(ckpt), **FAST)
    assert resumed.completed and resumed.steps_done == 6


@pytest.mark.parametrize("left", ["stopped", "finished"])
def test_a_resumed_run_with_nothing_to_train_pays_no_warm_up(tmp_path, concept, monkeypatch, left):
    """A fast run resumed at its stop_after (or at its last step) trains nothing, yet made its training step and
    warmed it up: on a GPU a throwaway step or the step's CUDA graph capture (seconds, and the graph's memory), for
    no step at all."""
    import prkit.fast_step as fast_step
    from prkit.fast import FastConfig

    steps = []
    real = fast_step.TrainStep.__init__

    def made(self, *args, **kwargs):
        steps.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(fast_step.TrainStep, "__init__", made)
    loop = FastConfig(cuda_graph=False, warm_up=True)
    where = dict(steps=4 if left == "stopped" else 2, stop_after=2, checkpoint_dir=str(tmp_path / "ckpt"), fast=loop,
                 **FAST)
    first = prkit.train_residuals(make_pipe(tmp_path / "p1"), concept, **where)
    assert first.steps_done == 2 and len(steps) == 1
    again = prkit.train_residuals(make_pipe(tmp_path / "p2"), concept, **where)
    assert again.steps_done == 2 and again.losses == first.losses and len(steps) == 1  # no step made, none warmed
    assert again.completed is (left == "finished")
