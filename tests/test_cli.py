"""The command line on a tiny pipeline folder: train, resume, sample, info, and clear errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prkit.cli import main
from tiny import tiny_pipeline


def _concept(folder, n=3):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_train_sample_info(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    images = _concept(tmp_path / "images")
    out = tmp_path / "sks.safetensors"
    args = ["train", "--model", str(model), "--images", str(images), "--token", "sks", "--class-word", "dog",
            "--out", str(out), "--steps", "4", "--rank", "2", "--device", "cpu"]
    assert main(args) == 0
    assert out.is_file() and "saved" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "sks" in info and "dog" in info and "sd1" in info
    assert '"steps": 4' in info and '"rank": 2' in info and "seconds:" in info  # how it was trained
    assert main(["info", str(tmp_path)]) == 0  # a folder: each file in it
    assert f"{out}:" in capsys.readouterr().out
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(model), "--residuals", str(out), "--prompt", "a photo of a sks dog",
                 "--num-images", "2", "--steps", "2", "--out", str(samples), "--device", "cpu"]) == 0
    assert sorted(p.name for p in samples.iterdir()) == ["000.png", "001.png"]
    made = Image.open(samples / "001.png").info  # what made each image travels with it
    assert made["prompt"] == "a photo of a sks dog" and '"image_of_call": 1' in made["prkit"]
    assert str(out) in made["prkit"] and '"seed": 0' in made["prkit"]
    # a prompt without the identifier cannot be localized: a clear error, exit code 2
    assert main(["sample", "--model", str(model), "--residuals", str(out), "--prompt", "a photo of a dog",
                 "--steps", "2", "--out", str(samples), "--device", "cpu"]) == 2
    assert "does not contain the identifier 'sks'" in capsys.readouterr().err


def test_sample_keeps_each_files_strength_and_takes_any_file_name(tmp_path, capsys):
    """Without --scale, prkit sample applied every set at 1.0 over the strength its file records (the Python API
    keeps it); a file named like a method (train.safetensors) could not be sampled at all."""
    import prkit
    from prkit.files import load_residuals

    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    pipe = prkit.load_pipeline(model, device="cpu")
    residuals = prkit.add_residuals(pipe.unet, rank=2, token="sks", class_word="dog")
    from conftest import randomize
    randomize(residuals, seed=1, std=0.5)
    residuals.scale = 0.5
    path = residuals.save(tmp_path / "train.safetensors")
    common = ["--model", str(model), "--residuals", str(path), "--prompt", "a photo of a sks dog", "--steps", "2",
              "--device", "cpu", "--no-lag", "--num-images", "1"]

    def sampled(name, *extra):
        assert main(["sample", *common, "--out", str(tmp_path / name), *extra]) == 0, capsys.readouterr().err
        return np.asarray(Image.open(tmp_path / name / "000.png")).astype(int), Image.open(tmp_path / name / "000.png")

    own, image = sampled("own")
    half, _ = sampled("half", "--scale", "0.5")
    full, _ = sampled("full", "--scale", "1")
    assert np.array_equal(own, half) and np.abs(own - full).max() > 0
    assert '"scale": [0.5]' in image.info["prkit"]  # the strength used, not the flag as typed
    pipe = prkit.load_pipeline(model, device="cpu")
    api = prkit.generate(pipe, "a photo of a sks dog", load_residuals(pipe, path), lag=False, steps=2, seed=0)[0]
    assert np.array_equal(np.asarray(api).astype(int), own)
    assert "wrote 1 image to" in capsys.readouterr().out


def test_out_of_range_numbers_and_a_folder_as_out_are_said_before_any_model_loads(tmp_path, capsys):
    """A seed past 2**64 - 1 and a side that is no multiple of 8 passed the parser and failed after the model had
    loaded, without naming the flag ('Overflow when unpacking long long', diffusers' 'divisible by 8'); train --out .
    printed "PosixPath('.') has an empty name"."""
    images = _concept(tmp_path / "images")
    sample = ["sample", "--model", str(tmp_path / "never-loaded"), "--prompt", "a photo of a sks dog", "--out",
              str(tmp_path / "s")]
    for flag, value, said in (("--seed", str(2 ** 64), "must be at most 18446744073709551615"),
                              ("--height", "30", "must be a multiple of 8 (the pipelines' rule), got 30; e.g. 32"),
                              ("--width", "20000", "must be at most 16384")):
        with pytest.raises(SystemExit) as err:
            main(sample + [flag, value])
        assert err.value.code == 2 and f"argument {flag}: {said}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--images", str(images), "--token", "sks", "--class-word", "dog", "--out", "x.safetensors",
              "--seed", str(2 ** 64)])
    assert "argument --seed: must be at most" in capsys.readouterr().err
    assert main(["train", "--images", str(images), "--token", "sks", "--class-word", "dog", "--out", "."]) == 2
    err = capsys.readouterr().err
    assert "--out '.'" in err and "PosixPath" not in err


def test_info_into_a_reader_that_leaves_is_no_error(tmp_path):
    """`prkit info ... | head -1` reported '[Errno 32] Broken pipe' and exit code 2."""
    import fcntl
    import subprocess
    import sys

    from conftest import child_env

    import prkit
    from tiny import tiny_unet

    for i in range(40):
        prkit.add_residuals(tiny_unet(), rank=2).save(tmp_path / f"r{i:02d}.safetensors")
    reader = subprocess.Popen([sys.executable, "-m", "prkit", "info", str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=child_env(HF_HUB_OFFLINE="1"))
    # the pipe made to hold one page (Linux): the 40 files' ~8 KB of lines fitted the default 64 KiB, and the child
    # could write them all and end (exit 0) before the reader left, about one run in three
    fcntl.fcntl(reader.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    first = reader.stdout.readline()
    reader.stdout.close()  # as head does after its line
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 141 and first and "Broken pipe" not in err and "Traceback" not in err


def test_errors_name_the_input(tmp_path, capsys):
    images = _concept(tmp_path / "images")
    assert main(["train", "--model", str(tmp_path / "nope"), "--images", str(images), "--token", "sks",
                 "--class-word", "dog", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["info", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err


def test_info_shows_a_header_another_tool_edited(tmp_path, capsys):
    """A 'seconds' entry that is no number (a header edited by hand or by another tool; loading passes over it)
    stopped `prkit info` with "could not convert string to float: 'abc'", naming neither the file nor the entry."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import prkit
    from tiny import tiny_unet

    path = prkit.add_residuals(tiny_unet(), rank=2).save(tmp_path / "r.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    save_file(tensors, str(path), metadata={**meta, "seconds": "abc"})
    assert main(["info", str(path)]) == 0
    assert "seconds: abc" in capsys.readouterr().out


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "prkit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout and "sample" in done.stdout


def _train_args(tmp_path, out, *extra):
    model = tmp_path / "model"
    if not model.exists():
        tiny_pipeline(tmp_path / "build").save_pretrained(model)
    images = tmp_path / "images"
    if not images.exists():
        _concept(images)
    return ["train", "--model", str(model), "--images", str(images), "--token", "sks", "--class-word", "dog",
            "--out", str(out), "--steps", "2", "--rank", "2", "--device", "cpu", *extra]


def test_outputs_are_checked_before_training_and_never_overwritten_silently(tmp_path, capsys, monkeypatch):
    import prkit.train

    out = tmp_path / "sks.safetensors"
    assert main(_train_args(tmp_path, out)) == 0
    first = out.read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(prkit.train, "train_residuals", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert main(_train_args(tmp_path, out)) == 2  # refused before any training
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == first
    (tmp_path / "afile").write_text("x")
    assert main(_train_args(tmp_path, tmp_path / "afile" / "x.safetensors")) == 2
    assert "'" + str(tmp_path / "afile") + "' is a file, not a folder" in capsys.readouterr().err
    assert main(_train_args(tmp_path, tmp_path)) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(_train_args(tmp_path, out, "--overwrite", "--steps", "3", "--no-resume")) == 0
    assert out.read_bytes() != first


def test_numbers_are_checked_by_the_parser(tmp_path, capsys):
    for flag, value, says in (("--steps", "0", "must be at least 1"), ("--batch-size", "-2", "must be at least 1"),
                              ("--rank", "abc", "a fraction in (0, 1)"), ("--rank", "1.5", "whole rank"),
                              ("--rank", "inf", "whole rank"), ("--rank", "0", "whole rank"),
                              ("--resolution", "0", "must be at least 1"),
                              # a typo's 51200 px crops were made before the model loaded: the OOM killer, no word
                              ("--resolution", "51200", "must be at most 16384"), ("--lr", "nan", "finite number"),
                              ("--lr", "0", "must be a number > 0")):
        with pytest.raises(SystemExit) as err:
            main(_train_args(tmp_path, tmp_path / "x.safetensors", flag, value))
        assert err.value.code == 2
        message = capsys.readouterr().err
        assert flag in message and says in message, (flag, message)


@pytest.mark.parametrize("args, flag", [(["info", ""], "file"), (["export", "", "--out", "x.safetensors"], "file"),
                                        (["sample", "--prompt", "a sks dog", "--out", ""], "--out"),
                                        (["sample", "--prompt", "a sks dog", "--residuals", ""], "--residuals"),
                                        (["eval", "--data", "", "--out", "x"], "--data")])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, capsys, monkeypatch, args, flag):
    """Path("") is the current folder: `prkit info ""` listed it and `sample --out ""` wrote images into it."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert f"error: {flag} is empty; give a path (an unset shell variable?)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("model", ["", "  "])
@pytest.mark.parametrize("args", [["sample", "--prompt", "a sks dog", "--out", "s"],
                                  ["export", "in.safetensors", "--out", "x.safetensors"],
                                  ["train", "--images", "images", "--out", "x.safetensors"],
                                  ["eval", "--out", "e"]], ids=lambda a: a[0])
def test_an_empty_model_is_refused(tmp_path, capsys, monkeypatch, args, model):
    """--model "$MODEL" unset: export took the model the file records without a word, sample and train said that
    '.' (which nobody gave) is not a diffusers pipeline folder; a blank one got past the check (export said there
    is no folder '<here>/  ', train and sample said it in load_pipeline's words)."""
    monkeypatch.chdir(tmp_path)
    assert main(args + ["--model", model]) == 2
    assert ("error: --model is empty; give 'world', a diffusers folder or a hub id (an unset shell variable?)"
            in capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []

def test_train_refuses_an_empty_images_path_and_a_resolution_the_vae_cannot_take(tmp_path, capsys):
    # "" is the current folder to Path: an unset shell variable trained on whatever images were there
    args = _train_args(tmp_path, tmp_path / "x.safetensors")
    args[args.index("--images") + 1] = ""
    assert main(args) == 2
    assert "--images is empty" in capsys.readouterr().err
    # sampling refuses sizes that are no multiple of the VAE's factor; training at one made crops the VAE cut down
    assert main(_train_args(tmp_path, tmp_path / "x.safetensors", "--resolution", "33")) == 2
    message = capsys.readouterr().err
    assert "--resolution 33 is no multiple of" in message and "(the VAE's factor)" in message
    assert not (tmp_path / "x.safetensors").exists()


def test_samples_go_after_the_images_already_in_the_folder(tmp_path, capsys):
    out = tmp_path / "sks.safetensors"
    assert main(_train_args(tmp_path, out)) == 0
    samples = tmp_path / "samples"
    sample = ["sample", "--model", str(tmp_path / "model"), "--residuals", str(out), "--prompt", "a photo of a sks dog",
              "--num-images", "2", "--steps", "2", "--out", str(samples), "--device", "cpu"]
    assert main(sample) == 0 and main(sample) == 0
    assert sorted(p.name for p in samples.iterdir()) == ["000.png", "001.png", "002.png", "003.png"]
    assert "(002.png to 003.png)" in capsys.readouterr().out
    (tmp_path / "taken").write_text("x")
    assert main(sample[:-4] + ["--out", str(tmp_path / "taken"), "--device", "cpu"]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_an_image_another_run_wrote_meanwhile_is_kept(tmp_path, capsys, monkeypatch):
    """Two runs into one folder number their images from the same listing; the later writer replaced the
    earlier one's image of the same number. Now a number taken meanwhile is passed over."""
    out = tmp_path / "sks.safetensors"
    assert main(_train_args(tmp_path, out)) == 0
    samples = tmp_path / "samples"
    real = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if not (samples / "000.png").exists():  # the other run writes its 000.png while this one encodes
            (samples / "000.png").write_bytes(b"the other run's image")
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    assert main(["sample", "--model", str(tmp_path / "model"), "--residuals", str(out), "--prompt", "a sks dog",
                 "--num-images", "2", "--steps", "2", "--out", str(samples), "--device", "cpu"]) == 0
    assert (samples / "000.png").read_bytes() == b"the other run's image"
    assert sorted(p.name for p in samples.iterdir()) == ["000.png", "001.png", "002.png"]
    assert Image.open(samples / "002.png").size == Image.open(samples / "001.png").size
    assert "(001.png to 002.png)" in capsys.readouterr().out


def test_sample_refuses_an_out_folder_it_cannot_list_before_sampling(tmp_path, capsys, monkeypatch):
    """A write-only folder (mode 733) passed the check, and the images were lost after sampling, when the folder was
    listed to number them. (Root reads any folder, so the permission is faked.)"""
    import os

    import prkit.cli_args as cli_args

    out = tmp_path / "sks.safetensors"
    assert main(_train_args(tmp_path, out)) == 0
    drop = tmp_path / "drop"
    drop.mkdir()
    real = os.access
    monkeypatch.setattr(cli_args.os, "access", lambda p, mode: False if Path(p) == drop and mode & os.R_OK
                        else real(p, mode))
    monkeypatch.setattr("prkit.sample.generate", lambda *a, **k: pytest.fail("sampled before the check"))
    assert main(["sample", "--model", str(tmp_path / "model"), "--residuals", str(out), "--prompt", "a sks dog",
                 "--steps", "2", "--out", str(drop), "--device", "cpu"]) == 2
    assert "cannot list" in capsys.readouterr().err


def test_sample_with_nan_latents_fails_and_writes_no_black_image(tmp_path, capsys):
    """`prkit sample --steps 1000` on the world model (DPM-Solver++, 1000 training timesteps) wrote black images and
    exited 0: the scheduler's repeated timestep made the latents NaN. Here the same on 20 training timesteps."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = tiny_pipeline(tmp_path / "build")
    pipe.scheduler = DPMSolverMultistepScheduler(num_train_timesteps=20, beta_schedule="scaled_linear", steps_offset=1)
    pipe.save_pretrained(tmp_path / "model")
    samples = tmp_path / "samples"
    sample = ["sample", "--model", str(tmp_path / "model"), "--prompt", "a photo of a dog", "--out", str(samples),
              "--device", "cpu", "--steps"]
    assert main(sample + ["20"]) == 2
    assert ("prkit sample: error: generate: 20 denoising steps of DPMSolverMultistepScheduler gave non-finite latents "
            "(NaN or inf), which would be black images; none are returned. Sample with fewer steps") in \
        capsys.readouterr().err
    assert not samples.exists()
    assert main(sample + ["19"]) == 0
    assert np.asarray(Image.open(samples / "000.png")).max() > 0


def test_a_failing_image_write_leaves_no_half_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sks.safetensors"
    assert main(_train_args(tmp_path, out)) == 0
    samples = tmp_path / "samples"
    real = Image.Image.save
    writes = []

    def save(self, fp, *args, **kwargs):
        writes.append(fp)
        if len(writes) == 2:  # the second image: half written, then the disk is full
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(2 ** 30, 2 ** 30 - 2 ** 21, 2 ** 21))
    sample = ["sample", "--model", str(tmp_path / "model"), "--residuals", str(out), "--prompt", "a photo of a sks dog",
              "--num-images", "2", "--steps", "2", "--out", str(samples), "--device", "cpu"]
    assert main(sample) == 2
    assert (f"could not write {samples / '001.png'}: No space left on device (2 MiB free there); free some space or "
            "write to another disk, then try again. 000.png was written, the other image was not\n"
            ) in capsys.readouterr().err
    assert sorted(p.name for p in samples.iterdir()) == ["000.png"]  # no half 001.png, no temporary file
    assert Image.open(samples / "000.png").size == (16, 16)


def test_ctrl_c_before_any_checkpoint_says_nothing_is_kept_yet(tmp_path, capsys, monkeypatch):
    import prkit.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prkit.train, "train_residuals", interrupted)
    assert main(_train_args(tmp_path, tmp_path / "x.safetensors")) == 130
    # before any checkpoint (the model still loading): nothing to resume, and it says so
    assert "interrupted; nothing was kept yet: run the same command again to start" in capsys.readouterr().err


def test_ctrl_c_while_the_arguments_are_read_is_a_line_not_a_traceback(capsys, monkeypatch):
    """Building the parser imports torch (eval's defaults, about a second): Ctrl-C in that second, the first of every
    command, went past main's handling and printed a traceback of torch's imports, the process dying of SIGINT."""
    import prkit.eval_cli

    def interrupted(*args, **kwargs):  # Ctrl-C while EvalConfig() imports torch
        raise KeyboardInterrupt

    monkeypatch.setattr(prkit.eval_cli, "EvalConfig", interrupted)
    assert main(["info", "x.safetensors"]) == 130
    assert capsys.readouterr().err == "prkit: interrupted\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_without_cuda_is_a_clear_error(tmp_path, capsys):
    args = _train_args(tmp_path, tmp_path / "x.safetensors")
    assert main(args[:-1] + ["cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_export_writes_a_lora_diffusers_loads_with_the_same_effect(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    import prkit

    out = tmp_path / "sks.safetensors"
    assert main(_train_args(tmp_path, out, "--lr", "0.05")) == 0
    lora = tmp_path / "lora.safetensors"
    export = ["export", str(out), "--out", str(lora), "--model", str(tmp_path / "model"), "--dtype", "fp32"]
    assert main(export) == 0
    # its folder and weight_name: the form every supported diffusers loads offline (< 0.40 refuses a bare file path)
    assert f"load it with pipe.load_lora_weights({str(tmp_path)!r}, weight_name='lora.safetensors')" in \
        capsys.readouterr().out
    assert main(["info", str(tmp_path)]) == 0  # a folder with the LoRA beside the residuals: skipped, named
    listed = capsys.readouterr().out
    assert f"{lora}: not a prkit residual file, skipped" in listed and f"{out}:" in listed
    assert main(export) == 2 and "pass --overwrite" in capsys.readouterr().err  # never replaced silently
    assert main(export[:3] + [str(out)] + export[4:] + ["--overwrite"]) == 2  # not over its own input
    assert "is the residual file itself" in capsys.readouterr().err
    recorded = tmp_path / "recorded.safetensors"  # no --model: the base model the file records (was: the world)
    assert main(["export", str(out), "--out", str(recorded), "--dtype", "fp32"]) == 0
    assert f"base model: {tmp_path / 'model'}" in capsys.readouterr().err
    (tmp_path / "model").rename(tmp_path / "moved")  # the recorded folder is gone: said, not the world tried
    assert main(["export", str(out), "--out", str(tmp_path / "gone.safetensors"), "--dtype", "fp32"]) == 2
    assert "which is not a folder on this machine; pass --model" in capsys.readouterr().err
    (tmp_path / "moved").rename(tmp_path / "model")
    pipe = prkit.load_pipeline(tmp_path / "model", device="cpu")
    args = dict(prompt="a photo of a sks dog", num_inference_steps=2, generator=None, output_type="np")
    base = pipe(**{**args, "generator": torch.Generator().manual_seed(0)}).images
    with_residuals = prkit.generate(pipe, "a photo of a sks dog", prkit.load_residuals(pipe, out), lag=False,
                                    steps=2, seed=0, output_type="np")
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    plain.load_lora_weights(str(lora.parent), weight_name=lora.name)  # as the hint says
    lora_images = plain(**{**args, "generator": torch.Generator().manual_seed(0)}).images
    assert abs(lora_images - base).max() > 1e-3  # the LoRA does something ...
    assert abs(lora_images - with_residuals).max() < 1e-4  # ... and it is what the residuals do


def test_export_of_a_file_that_records_no_model_says_which_it_used(tmp_path, capsys):
    """A file saved without a base model was exported against the world in silence, and a file that does not fit
    it failed with a channel mismatch that did not say the model was a guess or that --model chooses it."""
    import prkit
    from tiny import tiny_unet

    path = prkit.add_residuals(tiny_unet(), rank=2).save(tmp_path / "bare.safetensors")
    assert main(["export", str(path), "--out", str(tmp_path / "lora.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"base model: the embedded world ({path} records none; --model to choose another)" in err
    assert "No --model was given, so 'world' was used: pass --model with the model the file was trained on" in err
    assert not (tmp_path / "lora.safetensors").exists()


def test_train_records_a_relative_model_folder_as_the_folder_it_loaded(tmp_path, capsys, monkeypatch):
    """`prkit train --model models/tiny` recorded 'models/tiny' as written, relative to the folder it ran in (the
    Python API records the absolute path): `prkit export` run from any other folder took it for a hub id and failed
    offline, and the file named no folder that `prkit info` could point a user to."""
    from prkit.files import read_metadata

    work = tmp_path / "work"
    tiny_pipeline(tmp_path / "build").save_pretrained(work / "models" / "tiny")
    _concept(work / "images")
    monkeypatch.chdir(work)
    assert main(["train", "--model", "models/tiny", "--images", "images", "--token", "sks", "--class-word", "dog",
                 "--out", "sks.safetensors", "--steps", "2", "--rank", "2", "--device", "cpu"]) == 0
    assert read_metadata(work / "sks.safetensors")["base_model"] == str(work / "models" / "tiny")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["export", str(work / "sks.safetensors"), "--out", "lora.safetensors"]) == 0, capsys.readouterr().err
    assert f"base model: {work / 'models' / 'tiny'} (recorded in" in capsys.readouterr().err
    assert (elsewhere / "lora.safetensors").is_file()


def _weights_refused(monkeypatch) -> None:
    """Loading any model's weights fails: a diffusers pipeline or model (the UNet, the VAE), a transformers one (the
    text encoders)."""
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel

    def refused(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained: weights were loaded")

    for owner in (DiffusionPipeline, ModelMixin, PreTrainedModel):
        monkeypatch.setattr(owner, "from_pretrained", classmethod(refused))


def _hub_cache(folder, repo: str, pipe):
    """``pipe`` saved as the hub id ``repo`` in the hub cache ``folder`` (as a download leaves it)."""
    revision = "0" * 40
    root = folder / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    pipe.save_pretrained(str(root / "snapshots" / revision))


DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _contents(path) -> tuple[dict, bytes]:
    """A .safetensors file's header, parsed, and its tensors' bytes: all of it but the order of the metadata's
    entries, which safetensors writes from a hash map (the same file saved twice differs there)."""
    import json

    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl", "world", "hub"])
def test_export_reads_no_weights_and_writes_what_the_loaded_pipeline_gave(tmp_path, capsys, monkeypatch, kind):
    """`prkit export` loaded the whole base model (UNet, VAE, text encoders: seconds and GBs for SD1.5 or SDXL),
    where it reads the UNet's blocks and layer shapes alone; it writes the same LoRA (tensors byte for byte, the same
    metadata) and refuses a model the file does not fit in the same words."""
    import huggingface_hub

    import prkit
    from conftest import randomize
    from prkit.files import export_lora
    from test_pipeline import _tiny_sdxl

    model = {"world": "world", "hub": "prkit-tests/sd1"}.get(kind, str(tmp_path / "model"))
    built = _tiny_sdxl(tmp_path / "build") if kind == "sdxl" else tiny_pipeline(tmp_path / "build", kind == "sd2")
    if kind == "hub":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        _hub_cache(tmp_path / "cache", model, built)
    elif kind != "world":
        built.save_pretrained(model)
    residuals = prkit.add_residuals(prkit.load_pipeline(model, device="cpu").unet, rank=2, token="sks",
                                    class_word="dog", seed=0)
    randomize(residuals)
    residuals.scale = 0.75
    path = residuals.save(tmp_path / "sks.safetensors", base_model=model)
    other = "world" if kind != "world" else str(tmp_path / "model")
    if kind == "world":
        built.save_pretrained(other)
    written = {}  # what export wrote: the file loaded onto the whole pipeline
    for dtype in ("fp16", "fp32"):
        loaded = prkit.load_residuals(prkit.load_pipeline(model, device="cpu", dtype="fp32"), path)
        written[dtype] = _contents(export_lora(loaded, tmp_path / f"{dtype}.safetensors", dtype=DTYPES[dtype]))
    with pytest.raises(ValueError) as unfit:
        prkit.load_residuals(prkit.load_pipeline(other, device="cpu", dtype="fp32"), path)
    _weights_refused(monkeypatch)
    for dtype in ("fp16", "fp32"):
        lora = tmp_path / f"lora_{dtype}.safetensors"
        assert main(["export", str(path), "--out", str(lora), "--dtype", dtype]) == 0, capsys.readouterr().err
        assert _contents(lora) == written[dtype]
    assert main(["export", str(path), "--out", str(tmp_path / "unfit.safetensors"), "--model", other]) == 2
    assert str(unfit.value) in capsys.readouterr().err and not (tmp_path / "unfit.safetensors").exists()


def test_export_of_a_model_load_pipeline_refuses_is_refused_in_its_words(tmp_path, capsys):
    """A model whose UNet export cannot build from its config alone (here: its index names a pipeline class prkit
    does not support) goes the way load_pipeline goes: the same refusal, in the same words (before any weights
    load, since load_pipeline reads the class from the index first)."""
    import json

    import prkit

    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    path = prkit.add_residuals(prkit.load_pipeline(model, device="cpu").unet, rank=2).save(
        tmp_path / "sks.safetensors", base_model=str(model))
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionImg2ImgPipeline"}))
    with pytest.raises(TypeError) as refused:
        prkit.load_pipeline(model, device="cpu", dtype="fp32")
    assert main(["export", str(path), "--out", str(tmp_path / "lora.safetensors")]) == 2
    assert str(refused.value) in capsys.readouterr().err and not (tmp_path / "lora.safetensors").exists()


def test_inputs_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import prkit.pipeline

    args = _train_args(tmp_path, tmp_path / "x.safetensors")
    loads = []
    real = prkit.pipeline.load_pipeline
    monkeypatch.setattr(prkit.pipeline, "load_pipeline", lambda *a, **k: loads.append(1) or real(*a, **k))
    (tmp_path / "empty").mkdir()
    images = args.index("--images") + 1
    assert main(args[:images] + [str(tmp_path / "empty")] + args[images + 1:]) == 2
    assert "no images in concept folder" in capsys.readouterr().err
    (tmp_path / "not.safetensors").write_bytes(b"junk")
    sample = ["sample", "--model", str(tmp_path / "model"), "--residuals", str(tmp_path / "not.safetensors"),
              "--prompt", "a photo of a sks dog", "--out", str(tmp_path / "s"), "--device", "cpu"]
    assert main(sample) == 2
    assert "not.safetensors" in capsys.readouterr().err
    assert loads == []  # both refused before any model was loaded
    for bad in ("inf", "nan", "-1"):
        with pytest.raises(SystemExit) as err:
            main(sample[:-2] + ["--guidance-scale", bad, "--device", "cpu"])
        assert err.value.code == 2 and "--guidance-scale" in capsys.readouterr().err


def test_sigterm_checkpoints_like_ctrl_c_and_the_rerun_resumes_exactly(tmp_path, capsys, caplog, monkeypatch):
    import os
    import signal

    import prkit.train
    from safetensors.torch import load_file

    reference = tmp_path / "ref.safetensors"
    assert main(_train_args(tmp_path, reference, "--steps", "6")) == 0
    real_backward, calls = prkit.train._backward, []

    def terminated(*args, **kwargs):  # a scheduler's SIGTERM lands in the middle of step 3's update
        real_backward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(prkit.train, "_backward", terminated)
    out = tmp_path / "x.safetensors"
    assert main(_train_args(tmp_path, out, "--steps", "6", "--checkpoint-every", "0")) == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
    monkeypatch.setattr(prkit.train, "_backward", real_backward)
    assert main(_train_args(tmp_path, out, "--steps", "6", "--checkpoint-every", "0")) == 0
    assert "resuming from" in caplog.text and "at step 3" in caplog.text
    got, want = load_file(out), load_file(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_sample_with_a_lora_on_top_of_the_residuals(tmp_path, capsys):
    pytest.importorskip("peft")
    import prkit
    from prkit.files import export_lora

    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    out = tmp_path / "sks.safetensors"
    assert main(["train", "--model", str(model), "--images", str(_concept(tmp_path / "images")), "--token", "sks",
                 "--class-word", "dog", "--out", str(out), "--steps", "4", "--rank", "2", "--lr", "0.05",
                 "--device", "cpu"]) == 0
    donor = prkit.load_pipeline(model, device="cpu")
    style = prkit.add_residuals(donor.unet, rank=2, name="style", seed=1)
    for factor in style.parameters():
        torch.nn.init.normal_(factor, std=0.5)
    lora = export_lora(style, tmp_path / "style.safetensors", dtype=torch.float32)  # stands for any LoRA file

    def sample(folder, *extra):
        code = main(["sample", "--model", str(model), "--residuals", str(out), "--prompt", "a photo of a sks dog",
                     "--num-images", "2", "--steps", "2", "--out", str(tmp_path / folder), "--device", "cpu", *extra])
        return code, [np.asarray(Image.open(p), dtype=np.float32) for p in sorted((tmp_path / folder).glob("*.png"))]

    code, plain = sample("plain")
    assert code == 0
    code, styled = sample("styled", "--lora", str(lora))
    assert code == 0 and len(styled) == 2
    assert max(abs(a - b).max() for a, b in zip(plain, styled)) > 10  # the LoRA paints on top of the residuals
    code, zero = sample("zero", "--lora", str(lora), "--lora-scale", "0")
    assert code == 0 and max(abs(a - b).max() for a, b in zip(plain, zero)) <= 1  # weight 0: the residuals alone
    code, halves = sample("halves", "--lora", str(lora), "--lora-scale", "0.5", "--lora", str(lora), "--lora-scale",
                          "0.5")  # repeated options add up: two adapters at 0.5 paint what one does at 1
    assert code == 0 and max(abs(a - b).max() for a, b in zip(styled, halves)) <= 1
    capsys.readouterr()
    assert sample("x1", "--lora", str(out))[0] == 2  # a residual file given as a LoRA
    assert "is a prkit residual file; pass it with --residuals" in capsys.readouterr().err
    assert sample("x2", "--lora", str(lora), "--lora-scale", "1", "2")[0] == 2
    assert "--lora-scale gives 2 value(s) for 1 --lora file(s)" in capsys.readouterr().err
    assert sample("x3", "--lora", str(tmp_path / "nope.safetensors"))[0] == 2
    assert "nope.safetensors' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x3").exists()  # refused before anything was written


def test_sample_options_reach_the_pipeline(tmp_path, capsys, monkeypatch):
    """--negative-prompt, --height/--width, --scale, --lag-threshold and --dtype are what generate receives;
    --scale is checked against --residuals and --offload against the device before the model loads."""
    import prkit.sample
    from prkit.cli import LAG_THRESHOLDS
    from prkit.lag import THRESHOLDS

    assert LAG_THRESHOLDS == THRESHOLDS
    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    out = tmp_path / "sks.safetensors"
    assert main(["train", "--model", str(model), "--images", str(_concept(tmp_path / "images")), "--token", "sks",
                 "--class-word", "dog", "--out", str(out), "--steps", "2", "--rank", "2", "--device", "cpu"]) == 0
    seen = {}
    real = prkit.sample.generate

    def spy(pipe, prompt, residuals=None, **kwargs):
        seen.update(kwargs, scales=[r.scale for r in residuals], dtype=pipe.unet.dtype)
        return real(pipe, prompt, residuals, **kwargs)

    monkeypatch.setattr(prkit.sample, "generate", spy)
    base = ["sample", "--model", str(model), "--residuals", str(out), "--prompt", "a photo of a sks dog",
            "--num-images", "1", "--steps", "2", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "a"), "--negative-prompt", "blurry", "--height", "24", "--width", "32",
                        "--scale", "0.5", "--lag-threshold", "otsu", "--dtype", "bf16"]) == 0
    assert seen["negative_prompt"] == "blurry" and (seen["height"], seen["width"]) == (24, 32)
    assert seen["scales"] == [0.5] and seen["lag_config"].threshold == "otsu" and seen["dtype"] == torch.bfloat16
    assert Image.open(tmp_path / "a" / "000.png").size == (32, 24)
    assert main(base + ["--out", str(tmp_path / "b"), "--scale", "0.5", "2"]) == 2
    assert "--scale has 2 values for 1 --residuals files" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "c"), "--offload", "model"]) == 2
    assert "--offload model moves the models between the CPU and a GPU; the device is cpu" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves models to a GPU")
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_sample_offloaded_equals_sample_on_the_gpu(tmp_path, offload):
    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    out = tmp_path / "sks.safetensors"
    assert main(["train", "--model", str(model), "--images", str(_concept(tmp_path / "images")), "--token", "sks",
                 "--class-word", "dog", "--out", str(out), "--steps", "2", "--rank", "2", "--device", "cpu"]) == 0
    base = ["sample", "--model", str(model), "--residuals", str(out), "--prompt", "a photo of a sks dog",
            "--num-images", "2", "--steps", "2", "--device", "cuda", "--dtype", "fp32"]
    assert main(base + ["--out", str(tmp_path / "gpu")]) == 0
    assert main(base + ["--out", str(tmp_path / "off"), "--offload", offload]) == 0
    for name in ("000.png", "001.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=np.int16) for d in ("gpu", "off"))
        assert np.abs(a - b).max() <= 1


def test_train_memory_options_reach_the_recipe(tmp_path, monkeypatch):
    import prkit.train

    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    seen = []
    real = prkit.train.train_residuals

    def spy(pipe, concept, config=None, **kwargs):
        seen.append(config)
        return real(pipe, concept, config, **kwargs)

    monkeypatch.setattr(prkit.train, "train_residuals", spy)
    args = ["train", "--model", str(model), "--images", str(_concept(tmp_path / "images")), "--token", "sks",
            "--class-word", "dog", "--steps", "2", "--rank", "2", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "a.safetensors")]) == 0
    assert seen[-1].mixed_precision == "auto" and not seen[-1].gradient_checkpointing
    assert main(args + ["--out", str(tmp_path / "b.safetensors"), "--mixed-precision", "no",
                        "--gradient-checkpointing"]) == 0
    assert seen[-1].mixed_precision == "no" and seen[-1].gradient_checkpointing


def test_train_mixed_precision_other_than_the_models_half_says_the_flags(tmp_path, monkeypatch, capsys):
    """On a GPU prkit train loads the model in bf16 (fp16 on a T4 or V100); --mixed-precision in the other half
    precision was refused with advice for Python: "load the pipeline in fp16 (prkit.load_pipeline(..., dtype='fp16'))",
    which train has no flag for."""
    import prkit.pipeline

    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    args = ["train", "--model", str(model), "--images", str(_concept(tmp_path / "images")), "--token", "sks",
            "--class-word", "dog", "--rank", "2", "--device", "cpu", "--out", str(tmp_path / "a.safetensors")]
    real = prkit.pipeline.load_pipeline
    for loaded, wanted in (("bf16", "fp16"), ("fp16", "bf16")):  # as on an A100, as on a T4
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[loaded]
        monkeypatch.setattr(prkit.pipeline, "load_pipeline", lambda *a, dtype=dtype, **k: real(*a, **k).to(dtype))
        assert main(args + ["--mixed-precision", wanted]) == 2
        err = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("prkit train: error:"))
        assert err == (f"prkit train: error: --mixed-precision {wanted} on a UNet loaded in {loaded}: the two half "
                       f"precisions cannot mix in one step. Use --mixed-precision auto or {loaded} (prkit train loads "
                       f"the model in {loaded} on this GPU and has no flag to load it in {wanted})")


def test_train_says_mixed_precision_values_as_the_flag_takes_them(tmp_path, capsys):
    """train's rewording of the library's "mixed_precision=" left Python's quotes around the value: "train at its
    precision: --mixed-precision 'bf16' (this run's 'auto' is 'no' on its device)" and a divergence's "or use
    --mixed-precision 'no'". The values are said bare now; the library's own messages keep their quotes."""
    from prkit.cli_output import _cli_words
    from prkit.train import TrainConfig, diverged_message

    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    args = ["train", "--model", str(model), "--images", str(_concept(tmp_path / "images")), "--token", "sks",
            "--class-word", "dog", "--rank", "2", "--device", "cpu", "--out", str(tmp_path / "a.safetensors")]
    assert main(args + ["--steps", "2", "--mixed-precision", "bf16"]) == 0  # its checkpoint: bf16, at step 2
    capsys.readouterr()
    assert main(args + ["--steps", "3", "--overwrite"]) == 2  # auto: none on the CPU
    err = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("prkit train: error:"))
    assert ("To continue it, train at its precision: --mixed-precision bf16 (this run's --mixed-precision auto is no "
            "on its device). To keep both, pass another --checkpoint-dir;") in err
    assert "'bf16'." not in err and "'auto'" not in err
    diverged = diverged_message(float("nan"), 3, None, TrainConfig(learning_rate=0.01), torch.bfloat16)
    assert diverged.endswith("Lower learning_rate (now 0.01) or use mixed_precision='no'.")  # Python: as it was
    assert _cli_words(diverged, "train").endswith("Lower --lr (now 0.01) or use --mixed-precision no.")


def test_paths_expand_the_home_folder_and_errors_use_the_flags(tmp_path, capsys, monkeypatch):
    """A quoted "~/imgs" (or --out=~/x, which the shell leaves) was read literally: the folder was not found, and
    outputs went to a folder named "~" under the current one. Errors spoke of skip_bad=True, not --skip-bad."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    _concept(home / "imgs")
    assert main(["train", "--model", str(model), "--images", "~/imgs", "--token", "sks", "--class-word", "dog",
                 "--out=~/sks.safetensors", "--steps", "2", "--rank", "2", "--device", "cpu"]) == 0
    assert (home / "sks.safetensors").is_file() and not (tmp_path / "~").exists()
    assert main(["sample", "--model", str(model), "--residuals", "~/sks.safetensors", "--prompt",
                 "a photo of a sks dog", "--num-images", "1", "--steps", "2", "--out", "~/s", "--device", "cpu"]) == 0
    assert (home / "s" / "000.png").is_file()
    (home / "imgs" / "3.png").write_bytes(b"not a png")
    assert main(["train", "--model", str(model), "--images", "~/imgs", "--token", "sks", "--class-word", "dog",
                 "--out", "~/b.safetensors", "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "3.png" in err and "or pass --skip-bad to skip it" in err and "skip_bad" not in err
    assert main(["sample", "--model", str(model), "--residuals", "~/sks.safetensors", "--prompt", "a photo of a dog",
                 "--steps", "2", "--out", "~/s", "--device", "cpu"]) == 2
    assert "or sample with --no-lag" in capsys.readouterr().err


def test_messages_name_flags_and_missing_folders(tmp_path, capsys):
    """The CLI's errors named Python arguments (token=..., model='world'), a missing local folder was sent to the
    hub with a download command for it, and --help cut its description mid-sentence."""
    args = ["sample", "--model", str(tmp_path / "no_such_model"), "--prompt", "a photo"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "there is no such folder" in err and "--model world" in err and "download" not in err
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    assert main(["train", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "pass --token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``prkit eval`` (also ``python -m prkit``)" in capsys.readouterr().out.replace("\n", " ")


def test_outputs_are_safetensors_files_and_piped_runs_draw_no_bars(tmp_path, capsys, monkeypatch):
    """--out newdir/ wrote a file named newdir; a run piped to a log wrote every progress redraw (27 KB for 150
    steps) and TQDM_DISABLE could not stop it."""
    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    images = _concept(tmp_path / "images")
    base = ["train", "--model", str(model), "--images", str(images), "--token", "sks", "--class-word", "dog",
            "--steps", "3", "--rank", "2", "--device", "cpu"]
    for out in (str(tmp_path / "newdir") + "/", str(tmp_path / "x.pt")):
        assert main(base + ["--out", out]) == 2
        assert "name it *.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "newdir").exists() and not (tmp_path / "x.pt").exists()
    assert main(base + ["--out", str(tmp_path / "ok.safetensors")]) == 0  # stderr is not a terminal here
    err = capsys.readouterr().err
    assert "personalizing" not in err and "Loading pipeline components" not in err
    import diffusers.utils.logging as diffusers_logging

    assert diffusers_logging.is_progress_bar_enabled()  # off for the command only
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(model), "--residuals", str(tmp_path / "ok.safetensors"), "--prompt",
                 "a photo of a sks dog", "--steps", "2", "--out", str(samples), "--device", "cpu"]) == 0
    assert "it/s" not in capsys.readouterr().err


def test_several_residual_files_are_named_after_their_files_and_one_file_twice_is_refused(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    images = _concept(tmp_path / "images")
    dog, cat = tmp_path / "my-dog.safetensors", tmp_path / "cat.safetensors"
    for out, token in ((dog, "sks"), (cat, "zwx")):
        assert main(["train", "--model", str(model), "--images", str(images), "--token", token, "--class-word", "dog",
                     "--out", str(out), "--steps", "2", "--rank", "2", "--device", "cpu"]) == 0
    base = ["sample", "--model", str(model), "--steps", "2", "--out", str(tmp_path / "s"), "--device", "cpu"]
    assert main(base + ["--residuals", str(dog), str(cat), "--prompt", "a photo of a sks dog"]) == 2
    assert "of residual set 'cat'" in capsys.readouterr().err  # was 'default_2'
    assert main(base + ["--residuals", str(dog), str(dog), "--prompt", "a photo of a sks dog"]) == 2
    assert "more than once" in capsys.readouterr().err


def test_warnings_and_messages_speak_the_command_lines_words(tmp_path, capsys):
    """A warning printed prkit's source path and line; errors named Python arguments (device=, token=) and a file
    given as eval's --out failed with [Errno 17]."""
    import warnings

    images = _concept(tmp_path / "images")
    assert main(["train", "--images", str(images), "--class-word", "dog", "--out", str(tmp_path / "x.safetensors"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--token is required: pass --token" in err and 'put a concept.json holding "token"' in err
    before = warnings.formatwarning
    assert main(["train", "--images", str(images), "--token", "sks", "--class-word", "dog", "--steps", "1",
                 "--rank", "2", "--resolution", "512", "--model", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "y.safetensors"), "--device", "cpu"]) == 2
    assert warnings.formatwarning is before  # put back after the command
    (tmp_path / "file").write_text("x")
    assert main(["eval", "--out", str(tmp_path / "file"), "--device", "cpu"]) == 2
    assert "is a file" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        undo = __import__("prkit.cli", fromlist=["_in_cli_words"])._in_cli_words("sample")
        try:
            assert warnings.formatwarning("see (download=False)", UserWarning, "f.py", 3) == \
                "prkit sample: warning: see (add --download-backbones)\n"
            assert "DeprecationWarning" in warnings.formatwarning("old", DeprecationWarning, "lib.py", 3)
        finally:
            undo()
    import logging

    handler = logging.StreamHandler(__import__("io").StringIO())
    logging.getLogger().addHandler(handler)
    try:
        undo = __import__("prkit.cli", fromlist=["_in_cli_words"])._in_cli_words("eval")
        record = logging.LogRecord("prkit.x", logging.WARNING, "f.py", 1, "unavailable (%s)", ("download=False",), None)
        handler.handle(record)
        undo()
    finally:
        logging.getLogger().removeHandler(handler)
    assert handler.stream.getvalue() == "unavailable (add --download-backbones)\n"
    assert record.getMessage() == "unavailable (download=False)"  # other handlers see the record as it was


def test_info_on_a_folder_lists_the_files_train_writes_in_any_case(tmp_path, capsys):
    """train and export take --out X.SAFETENSORS (the suffix in any case), but `prkit info FOLDER` looked for
    *.safetensors only and said there were no files in it."""
    import json

    from safetensors.torch import save_file

    from prkit.files import FORMAT

    layers = {"mid_block.attentions.0": {"channels": 8, "rank": 2}}
    save_file({"w": torch.zeros(1)}, str(tmp_path / "DOG.SAFETENSORS"),
              metadata={"format": FORMAT, "token": "sks", "class_word": "dog", "layers": json.dumps(layers)})
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'DOG.SAFETENSORS'}:" in out and "sks" in out and "32 parameters" in out


def test_info_on_a_folder_passes_over_a_folder_named_like_a_file(tmp_path, capsys):
    """A folder inside it named *.safetensors (an unpacked download, a LoRA saved with save_lora_weights(dir)) ended
    `prkit info FOLDER` after the first file, exit 2, saying that the folder was a folder: it is no file of it."""
    import prkit
    from tiny import tiny_unet

    prkit.add_residuals(tiny_unet(), rank=2, token="sks").save(tmp_path / "a.safetensors")
    (tmp_path / "lora.safetensors").mkdir()
    prkit.add_residuals(tiny_unet(), rank=2, token="zwx").save(tmp_path / "z.safetensors")
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'a.safetensors'}:" in out and f"{tmp_path / 'z.safetensors'}:" in out
    assert "sks" in out and "zwx" in out and "lora.safetensors" not in out


def test_a_failed_save_or_an_interrupt_says_where_the_training_is_kept(tmp_path, capsys, monkeypatch):
    """A full disk at the final save printed only the write's error: the user could not tell that the training was
    kept in the checkpoint folder and that the same command finishes it."""
    import prkit.files
    import prkit.train
    from conftest import full_disk, interrupt_backward

    out, kept = tmp_path / "x.safetensors", tmp_path / "x.ckpt"
    real_save = prkit.files.save_residuals

    def save_on_a_full_disk(*args, **kwargs):  # the disk fills after the last checkpoint
        full_disk(monkeypatch, free_mib=2)
        return real_save(*args, **kwargs)

    args = _train_args(tmp_path, out, "--steps", "4")
    capsys.readouterr()  # the model folder's writing
    monkeypatch.setattr(prkit.files, "save_residuals", save_on_a_full_disk)
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"prkit train: error: [Errno 28] could not write {out}: No space left on device (2 MiB free there); free "
        "some space or write to another disk, then try again. Nothing was written; run the same command again to "
        f"resume (the training is kept in {kept})\n")
    monkeypatch.undo()
    assert main(args) == 0 and out.is_file()  # the kept run, saved
    assert "(4 steps," in capsys.readouterr().out
    interrupt_backward(monkeypatch, at=3)
    other = tmp_path / "y.safetensors"
    assert main(_train_args(tmp_path, other, "--steps", "4", "--no-resume")) == 130
    assert capsys.readouterr().err.endswith(
        "prkit train: interrupted; run the command again without --no-resume to resume (the training is kept in "
        f"{tmp_path / 'y.ckpt'})\n")


def test_a_failed_save_without_checkpoints_keeps_the_residuals_elsewhere(tmp_path, capsys, monkeypatch):
    """--checkpoint-every 0: a run that could not write --out lost all its training (no checkpoint holds a finished
    run) and said only "try again". The residuals go to the checkpoint folder, else to the system's temporary one,
    and the error names the file; where neither takes them, it says the command trains again from the start."""
    import errno
    import tempfile

    import prkit.atomic
    import prkit.files
    from conftest import full_disk
    from safetensors.torch import load_file

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    reference = tmp_path / "ref.safetensors"
    assert main(_train_args(tmp_path, reference, "--steps", "3")) == 0
    real_save, refused = prkit.files.save_residuals, []

    def save(residuals, path, **kwargs):  # --out's folder, then the checkpoint folder, refuses the file
        if Path(path).parent in refused:
            raise prkit.atomic.write_error(Path(path), PermissionError(errno.EACCES, "Permission denied"))
        return real_save(residuals, path, **kwargs)

    monkeypatch.setattr(prkit.files, "save_residuals", save)
    out, kept = tmp_path / "x.safetensors", tmp_path / "x.ckpt"
    args = _train_args(tmp_path, out, "--steps", "3", "--checkpoint-every", "0")
    capsys.readouterr()
    for refuse, rescued in (([tmp_path], kept / "x.safetensors"), ([tmp_path, kept], None)):
        refused[:] = refuse
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"prkit train: error: [Errno 13] could not write {out}: Permission denied (")
        rescued = rescued or next(temporary.glob("prkit-*/x.safetensors"))
        assert err.endswith("then try again. Nothing was written; the trained residuals are saved as "
                            f"{rescued} instead: move that file to {out} (no need to train again)\n")
        assert not out.exists() and load_file(rescued).keys() == load_file(reference).keys()
        assert all(torch.equal(load_file(rescued)[k], v) for k, v in load_file(reference).items())  # the run's
        assert sorted(p.name for p in kept.iterdir()) == ["x.safetensors"]  # and no checkpoint
    monkeypatch.setattr(prkit.files, "save_residuals", real_save)
    (kept / "x.safetensors").unlink()
    shutil.rmtree(rescued.parent)

    def full(*args, **kwargs):  # the disk fills after training: every write fails
        full_disk(monkeypatch, free_mib=2)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(prkit.files, "save_residuals", full)
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"prkit train: error: [Errno 28] could not write {out}: No space left on device (2 MiB free there); free "
        "some space or write to another disk, then try again. Nothing was written; no checkpoint keeps the training "
        f"and it could not be saved elsewhere either ({kept}: No space left on device; {temporary}: No space left "
        "on device): the same command trains again from the start\n")
    assert list(kept.iterdir()) == [] and list(temporary.glob("prkit-*")) == []  # no half file, no empty folder


def test_a_checkpoint_the_disk_refuses_says_what_the_command_keeps(tmp_path, capsys, monkeypatch):
    """The library's error says how to save the set it leaves on the model from Python; the command's model ends with
    its process, so it says what a checkpoint keeps instead: the one before, or nothing (--checkpoint-every 0)."""
    import prkit.checkpoints
    from conftest import full_disk, interrupt_backward

    real_save, saves = prkit.checkpoints.save, []

    def save(*args, **kwargs):  # the disk fills after the first checkpoint of the run
        saves.append(1)
        if len(saves) == 2:
            full_disk(monkeypatch, free_mib=2)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(prkit.checkpoints, "save", save)
    out, kept = tmp_path / "x.safetensors", tmp_path / "x.ckpt"
    assert main(_train_args(tmp_path, out, "--steps", "4", "--checkpoint-every", "2")) == 2
    assert capsys.readouterr().err.endswith(
        f"prkit train: error: [Errno 28] could not write {kept / 'checkpoint.pt'}: No space left on device (2 MiB "
        "free there); free some space or write to another disk, then try again. The file that was there is "
        f"unchanged; run the same command again to resume (the training is kept in {kept})\n")
    monkeypatch.undo()
    saves[:] = [1]  # the next save fills the disk: Ctrl-C's, the only one of a run without periodic checkpoints
    monkeypatch.setattr(prkit.checkpoints, "save", save)
    interrupt_backward(monkeypatch, at=2)
    other, folder = tmp_path / "y.safetensors", tmp_path / "y.ckpt"
    assert main(_train_args(tmp_path, other, "--steps", "4", "--checkpoint-every", "0")) == 2
    assert capsys.readouterr().err.endswith(
        f"prkit train: error: [Errno 28] could not write {folder / 'checkpoint.pt'}: No space left on device (2 MiB "
        "free there); free some space or write to another disk, then try again. Nothing was written; no checkpoint "
        "keeps the training: the same command trains again from the start\n")
