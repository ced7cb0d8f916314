"""Loading base models: local folders, offline hub ids with a useful message, device/dtype choice, light import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import prkit
from conftest import run_unet, unet_inputs
from prkit.pipeline import resolve_device, resolve_dtype


def test_load_pipeline_from_a_saved_folder(pipe, tmp_path):
    folder = tmp_path / "saved"
    pipe.save_pretrained(str(folder))
    loaded = prkit.load_pipeline(folder, device="cpu")
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert loaded.unet.device.type == "cpu" and loaded.unet.dtype == torch.float32
    assert loaded.name_or_path == str(folder)
    inputs = unet_inputs()
    assert torch.equal(run_unet(loaded.unet, inputs), run_unet(pipe.unet, inputs))
    half = prkit.load_pipeline(str(folder), device="cpu", dtype="bf16")
    assert half.unet.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16


def test_offline_hub_id_says_how_to_get_the_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "prkit-tests/no-such-model"
    with pytest.raises(RuntimeError) as err:
        prkit.load_pipeline(name, device="cpu")
    message = str(err.value)
    assert name in message and "download" in message and "HF_HUB_OFFLINE" in message


def test_folder_without_model_index_raises(tmp_path):
    folder = tmp_path / "not_a_pipeline"
    folder.mkdir()
    (folder / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not_a_pipeline.*model_index\.json"):
        prkit.load_pipeline(folder, device="cpu")


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cuda:1")) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_resolve_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, torch.device("mps")) == torch.float32
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    for text, dtype in [("fp32", torch.float32), ("float16", torch.float16), ("bf16", torch.bfloat16)]:
        assert resolve_dtype(text, cpu) == dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None, cuda) == torch.float16
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype("fp8", cpu)


def test_import_prkit_is_light():
    code = ("import sys, prkit; heavy = [m for m in ('diffusers', 'transformers', 'safetensors', 'prkit.train') "
            "if m in sys.modules]; assert not heavy, heavy; assert prkit.add_residuals.__module__ == "
            "'prkit.residuals'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _trained(pipe, **config):
    from conftest import make_concept

    from prkit.residuals import remove_residuals

    result = prkit.train_residuals(pipe, make_concept(), steps=3, progress=False, batch_size=2, **config)
    weights = {k: v.detach().clone() for k, v in result.residuals.state_dict().items()}
    remove_residuals(pipe.unet, result.residuals.name)
    return weights


def test_model_folder_defaults_set_the_learning_rate(pipe, tmp_path):
    """A folder's prkit_defaults.json is the learning rate when TrainConfig leaves it None; explicit values win."""
    import json

    from prkit.pipeline import model_defaults
    from prkit.train import default_learning_rate

    plain, own = tmp_path / "plain", tmp_path / "own"
    pipe.save_pretrained(str(plain))
    pipe.save_pretrained(str(own))
    (own / "prkit_defaults.json").write_text(json.dumps({"residuals": {"learning_rate": 0.02}}))
    p_plain, p_own = prkit.load_pipeline(plain, device="cpu"), prkit.load_pipeline(own, device="cpu")
    assert model_defaults(p_plain) == {} and model_defaults(p_own) == {"learning_rate": 0.02}
    assert default_learning_rate(p_plain) == 1e-3 and default_learning_rate(p_own) == 0.02  # METHOD's / the folder's
    assert default_learning_rate(p_own, "lora") == 1e-4  # other targets: their published recipe
    assert default_learning_rate(p_own, "custom_diffusion", batch_size=4) == pytest.approx(4e-5)  # lr x batch
    by_default = _trained(p_own)
    assert all(torch.equal(by_default[k], v) for k, v in _trained(p_own, learning_rate=0.02).items())
    assert not all(torch.equal(by_default[k], v) for k, v in _trained(p_own, learning_rate=1e-3).items())
    plain_default = _trained(p_plain)
    assert all(torch.equal(plain_default[k], v) for k, v in _trained(p_plain, learning_rate=1e-3).items())


def test_world_ships_its_learning_rate_and_bad_defaults_name_the_file(tmp_path):
    from prkit.pipeline import read_model_defaults, world_path

    assert read_model_defaults(world_path()) == {"residuals": {"learning_rate": 0.01}}
    (tmp_path / "prkit_defaults.json").write_text("{not json")
    with pytest.raises(ValueError, match="prkit_defaults.json"):
        read_model_defaults(tmp_path)
    (tmp_path / "prkit_defaults.json").write_text('{"learning_rate": 0.01}')
    with pytest.raises(ValueError, match="residuals"):
        read_model_defaults(tmp_path)
    (tmp_path / "prkit_defaults.json").write_text('{"residuals": {"steps": 300}}')
    with pytest.raises(ValueError, match="residuals.steps.*only learning_rate"):
        read_model_defaults(tmp_path)


def test_a_device_that_is_not_there_is_a_clear_error(monkeypatch):
    from prkit.pipeline import check_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda' was asked for, but this torch sees no CUDA GPU"):
        check_available(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:1' was asked for, but this machine has 1 CUDA GPU"):
        check_available(torch.device("cuda:1"))
    check_available(torch.device("cuda:0"))
    check_available(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"'gpu0' is not a device torch knows"):
        resolve_device("gpu0")
