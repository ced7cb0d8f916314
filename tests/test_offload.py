"""Residuals on a pipeline that offloads its models to the CPU between calls (the small-GPU settings of diffusers:
enable_model_cpu_offload, enable_sequential_cpu_offload, enable_group_offload): sampling gives the images it gives
without offloading, whether the residuals were loaded before or after offloading was switched on; training refuses
an offloaded UNet with what to do instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prkit
from conftest import randomize
from prkit.pipeline import offloading

PROMPT = "a photo of a sks dog"
FAST = dict(steps=2, output_type="np")


def _saved_set(pipe, path):
    residuals = prkit.add_residuals(pipe.unet, name="dog", token="sks", class_word="dog")
    randomize(residuals, seed=3, std=0.5)
    residuals.save(path)
    return residuals


def _images(pipe, residuals, lag):
    return prkit.generate(pipe, PROMPT, residuals, lag=lag, num_images=2, **FAST)


@pytest.mark.parametrize("order", ["residuals first", "offload first"])
def test_sequential_offload_samples_as_without(pipe, tmp_path, order):
    """accelerate's sequential offload (its hooks keep every weight on the meta device between calls; here with
    the CPU as the execution device): the residual factors, which no forward of their own used to reach, came
    out of the meta device uninitialized and the images were noise; a set loaded after offloading was made on
    the meta device and could not run at all."""
    from accelerate import cpu_offload

    path = tmp_path / "dog.safetensors"
    residuals = _saved_set(pipe, path)
    want = {lag: _images(pipe, residuals, lag) for lag in (False, True)}
    base = _images(pipe, None, False)
    assert np.abs(want[False] - base).max() > 1e-2  # the set changes the images
    if order == "offload first":
        prkit.remove_residuals(pipe.unet, "dog")
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    assert pipe.unet.device.type == "meta" and offloading(pipe.unet) == "accelerate"
    if order == "offload first":
        residuals = prkit.load_residuals(pipe, path)
    for lag in (False, True):
        np.testing.assert_allclose(_images(pipe, residuals, lag), want[lag], atol=1e-6)
    np.testing.assert_allclose(_images(pipe, None, False), base, atol=1e-6)


def test_a_set_offloaded_with_its_unet_is_not_read_or_written_in_silence(pipe, tmp_path):
    """Sequential offload keeps a set added before it on the meta device between calls: new values written into it
    were lost without a word, and saving or exporting it failed with 'Cannot copy out of meta tensor'."""
    from accelerate import cpu_offload

    from prkit.files import export_lora

    residuals = _saved_set(pipe, tmp_path / "dog.safetensors")
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    for call in (lambda: residuals.save(tmp_path / "again.safetensors"),
                 lambda: residuals.load_state_dict({}),
                 lambda: export_lora(residuals, tmp_path / "lora.safetensors")):
        with pytest.raises(RuntimeError, match=r"cannot (read|write) residual set 'dog': the UNet is offloaded .*"
                                               r"before enabling offloading, or after pipe.remove_all_hooks\(\)"):
            call()
    assert not (tmp_path / "again.safetensors").exists() and not (tmp_path / "lora.safetensors").exists()


def test_training_refuses_an_offloaded_unet(pipe, concept):
    from accelerate import cpu_offload

    assert offloading(pipe.unet) is None
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"offloaded to the CPU.*remove_all_hooks\(\).*generate\(\) works"):
        prkit.train_residuals(pipe, concept, steps=1, progress=False)
    assert prkit.residual_names(pipe.unet) == []  # nothing was added


@pytest.mark.skipif(not torch.cuda.is_available(), reason="diffusers' offloading needs an accelerator")
@pytest.mark.parametrize("mode", ["model", "sequential", "group"])
@pytest.mark.parametrize("order", ["residuals first", "offload first"])
def test_diffusers_offloading_samples_as_without(pipe, tmp_path, mode, order):
    path = tmp_path / "dog.safetensors"
    pipe.to("cuda")
    residuals = _saved_set(pipe, path)
    want = {lag: _images(pipe, residuals, lag) for lag in (False, True)}
    pipe.to("cpu")
    if order == "offload first":
        prkit.remove_residuals(pipe.unet, "dog")
    if mode == "model":
        pipe.enable_model_cpu_offload()
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.enable_group_offload(torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1)
    assert offloading(pipe.unet) == ("group" if mode == "group" else "accelerate")
    if order == "offload first":
        residuals = prkit.load_residuals(pipe, path)
    for lag in (False, True):
        np.testing.assert_allclose(_images(pipe, residuals, lag), want[lag], atol=1e-4)


def test_merging_under_offload_is_refused_and_a_set_merged_before_samples_as_merged(pipe, tmp_path):
    """Merging writes the base weight, which sequential offload keeps on the meta device between calls: the
    write used to vanish and the set to drop out of the images silently. A set merged before offloading stays in."""
    from accelerate import cpu_offload

    from prkit.files import export_lora

    residuals = _saved_set(pipe, tmp_path / "dog.safetensors")
    want = _images(pipe, residuals, False)
    residuals.merge()
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    np.testing.assert_allclose(_images(pipe, residuals, False), want, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"cannot unmerge .*offloaded.*unmerge before enabling offloading"):
        residuals.unmerge()
    assert residuals.merged
    other = prkit.add_residuals(pipe.unet, name="cat", token="zwx", class_word="cat")
    randomize(other, seed=4, std=0.5)
    with pytest.raises(RuntimeError, match=r"cannot merge .*offloaded"):
        other.merge()
    assert not other.merged
