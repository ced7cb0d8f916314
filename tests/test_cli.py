"""The command line on a tiny pipeline folder: train, resume, sample, info, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
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
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(model), "--residuals", str(out), "--prompt", "a photo of a sks dog",
                 "--num-images", "2", "--steps", "2", "--out", str(samples), "--device", "cpu"]) == 0
    assert sorted(p.name for p in samples.iterdir()) == ["000.png", "001.png"]
    # a prompt without the identifier cannot be localized: a clear error, exit code 2
    assert main(["sample", "--model", str(model), "--residuals", str(out), "--prompt", "a photo of a dog",
                 "--steps", "2", "--out", str(samples), "--device", "cpu"]) == 2
    assert "does not contain the identifier 'sks'" in capsys.readouterr().err


def test_errors_name_the_input(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nope"), "--images", str(tmp_path), "--token", "sks",
                 "--class-word", "dog", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["info", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "prkit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout and "sample" in done.stdout
