"""Tests of the world oracle: shapes, read() structure, weights round trip, a tiny training smoke."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from prkit.world.oracle import (
    CLASS_LABELS, COLOR_NAMES, IGNORE, PATTERN_LABELS, Oracle, OracleTrainConfig, augment, evaluate_oracle,
    load_oracle, read, render_batch, save_oracle, train_oracle,
)
from prkit.world.vocab import BACKGROUNDS, CLASSES, PATTERNS


@pytest.fixture(scope="module")
def batch():
    return render_batch(np.random.default_rng(0), 6, patterns_p=1.0)


def test_forward_shapes(batch):
    torch.manual_seed(0)
    oracle = Oracle().eval()
    assert sum(p.numel() for p in oracle.parameters()) <= 1_500_000
    out = oracle(torch.from_numpy(batch["image"]))  # uint8 channels-last is accepted
    assert out["background"].shape == (6, len(BACKGROUNDS))
    assert out["cls"].shape == (6, 2, len(CLASSES) + 1) and out["color"].shape == (6, 2, 8)
    assert out["pattern"].shape == (6, 2, len(PATTERNS) + 1) and out["color2"].shape == (6, 2, 8)
    assert out["xy"].shape == (6, 2, 2) and out["mask"].shape == (6, 64, 64)
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(oracle(x)["cls"], out["cls"], atol=1e-5)


def test_render_batch_targets(batch):
    assert batch["image"].dtype == np.uint8 and batch["mask"].any((1, 2)).all()
    assert (batch["cls"][:, 0] > 0).all()  # slot 0 always holds an object
    single = batch["cls"][:, 1] == 0
    assert (batch["color"][single, 1] == IGNORE).all() and (batch["pattern"][single, 1] == IGNORE).all()
    for i, s in zip(*np.nonzero(batch["cls"] > 0)):
        pattern = PATTERN_LABELS[batch["pattern"][i, s]]
        assert (batch["color2"][i, s] == IGNORE) == (pattern == "none")
        if pattern in ("stripes", "checks"):
            assert batch["color"][i, s] < batch["color2"][i, s]


def test_read_structure_with_random_weights(batch):
    oracle = Oracle().eval()
    images = [Image.fromarray(im) for im in batch["image"][:3]]
    for inp in (images, batch["image"][:3], torch.from_numpy(batch["image"][:3]).permute(0, 3, 1, 2) / 255.0,
                [im.resize((128, 128)) for im in images]):
        results = read(inp, oracle)
        assert len(results) == 3
        for r in results:
            assert r["background"] in BACKGROUNDS and r["mask"].shape == (64, 64) and r["mask"].dtype == bool
            assert 1 <= len(r["objects"]) <= 2
            for obj in r["objects"]:
                assert set(obj) == {"cls", "color", "pattern", "color2", "x", "y"}
                assert obj["cls"] in CLASS_LABELS[1:] and obj["color"] in COLOR_NAMES
                assert (obj["pattern"] is None) == (obj["color2"] is None)
                assert 0 <= obj["x"] <= 64 and 0 <= obj["y"] <= 64


def test_save_load_round_trip(tmp_path, batch):
    oracle = Oracle().eval()
    path = save_oracle(oracle, tmp_path / "oracle.safetensors")
    loaded = load_oracle("cpu", path)
    x = torch.from_numpy(batch["image"])
    assert torch.allclose(oracle(x)["background"], loaded(x)["background"], atol=5e-2)
    with pytest.raises(FileNotFoundError, match="--stage oracle"):
        load_oracle("cpu", tmp_path / "missing.safetensors")


def test_augment_keeps_range():
    x = torch.rand(5, 3, 64, 64)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)


def test_train_oracle_smoke():
    config = OracleTrainConfig(num_workers=0, eval_n=0)
    oracle, metrics = train_oracle(steps=5, batch_size=4, device="cpu", seed=0, config=config)
    assert not oracle.training and np.isfinite(metrics["loss_last"])
    assert metrics["loss_last"] < metrics["loss_first"]
    scores = evaluate_oracle(oracle, n=20, seed=0)
    assert {"background", "cls", "color", "pattern", "color2", "mask_iou"} <= set(scores)


def test_read_takes_every_common_image_form_and_reads_it_alike(batch):
    from prkit.world.oracle_input import as_batch

    images = batch["image"][:2]
    ref = as_batch(images)
    pil = [Image.fromarray(im) for im in images]
    rgba = np.concatenate([images, np.full(images.shape[:3] + (1,), 255, np.uint8)], -1)
    forms = {
        "single PIL": (pil[0], ref[:1]), "single HWC array": (images[0], ref[:1]),
        "list of arrays": (list(images), ref), "PIL of two sizes": ([pil[0], pil[1].resize((128, 128))], None),
        "float NHWC in [0, 1]": (images.astype(np.float32) / 255, ref), "RGBA": (rgba, ref),
        "uint8 NHWC tensor": (torch.from_numpy(images), ref), "uint16": (images.astype(np.uint16) * 257, ref),
        "CHW float tensor": (torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255, ref[:1]),
    }
    for name, (form, expected) in forms.items():
        x = as_batch(form)
        assert x.shape[1:] == (3, 64, 64) and x.dtype == torch.float32, name
        if expected is not None:
            assert torch.allclose(x, expected, atol=1e-5), name
    dark = np.full((1, 8, 8, 3), 200, np.uint16)  # 16-bit values are read on 16 bits, however dark
    assert torch.allclose(as_batch(dark), torch.full((1, 3, 64, 64), 200 / 65535))
    assert torch.allclose(as_batch(torch.from_numpy(dark.astype(np.int32)).to(torch.uint16)), as_batch(dark))
    grey = as_batch(pil[0].convert("L"))
    assert grey.shape == (1, 3, 64, 64) and torch.equal(grey[:, 0], grey[:, 2])
    oracle = Oracle().eval()
    assert read([], oracle) == [] and read(np.zeros((0, 64, 64, 3), np.uint8), oracle) == []
    assert len(read(pil[0], oracle)) == 1 and len(read([pil[0], pil[1].resize((100, 100))], oracle)) == 2


@pytest.mark.parametrize("bad", ["float 0-255", "[-1, 1]", "5-d", "int8"])
def test_read_refuses_values_it_would_misread(batch, bad):
    image = batch["image"][:1]
    form = {"float 0-255": image.astype(np.float32),
            "[-1, 1]": torch.from_numpy(image).permute(0, 3, 1, 2).float() / 127.5 - 1,
            "5-d": np.zeros((1, 1, 64, 64, 3), np.uint8),
            "int8": (image // 2).astype(np.int8)}[bad]  # was refused as "float values"
    says = "int8 values are no image depth the oracle knows" if bad == "int8" else r"\[0, 1\]|5-d"
    with pytest.raises(ValueError, match=says):
        read(form, Oracle().eval())


def test_read_takes_16_bit_and_float_pil_images_at_their_depth(batch):
    """A 16-bit PNG opens as mode I;16 (older Pillow: I) and a float image as F; convert("RGB") clipped them to
    0-255, so a mid-grey 16-bit image read as white and a float one in [0, 1] as black."""
    import io

    from prkit.world.oracle_input import as_batch

    grey = np.asarray(Image.fromarray(batch["image"][0]).convert("L"))  # (64, 64) uint8
    expected = as_batch(Image.fromarray(grey))
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(buffer, "PNG")
    forms = {
        "16-bit PNG": Image.open(io.BytesIO(buffer.getvalue())),
        "I;16B": Image.frombytes("I;16B", (64, 64), (grey.astype(">u2") * 257).tobytes()),
        "I, 16-bit values": Image.fromarray(grey.astype(np.int32) * 257),
        "I, 8-bit values": Image.fromarray(grey.astype(np.int32)),
        "F in [0, 1]": Image.fromarray(grey.astype(np.float32) / 255),
    }
    for name, form in forms.items():
        assert torch.allclose(as_batch(form), expected, atol=1e-6), name
    with pytest.raises(ValueError, match=r"float values span \[.*\]; the oracle reads floats in \[0, 1\]"):
        as_batch(Image.fromarray(grey.astype(np.float32) * 2))  # F in 0-510: refused, as a float array is


@pytest.mark.parametrize("bad,says", [
    ("nan", r"images: float values include NaN or infinity.*pipeline"),
    ("int above 65535", r"images: int32 values span \[70000, 70000\]; the oracle reads integers in 0-255 or 0-65535"),
    ("negative int", r"images: int64 values span \[-5, 200\]; the oracle reads integers in 0-255 or 0-65535"),
])
def test_read_refuses_nan_and_integers_outside_an_image_depth(batch, bad, says):
    """A NaN image (a diverged sample) was read as a red ball in the snow at x = NaN, and integers outside 0-65535
    were clamped to black or white and read, where floats outside [0, 1] are refused."""
    from prkit.world.oracle_input import as_batch

    image = batch["image"][0].astype(np.float32) / 255
    form = {"nan": np.where(image > 0.5, np.nan, image),
            "int above 65535": np.full((64, 64, 3), 70000, np.int32),
            "negative int": torch.tensor([[-5, 200]]).repeat(32, 32)}[bad]
    with pytest.raises(ValueError, match=says):
        as_batch(form)
    assert as_batch(np.full((8, 8), 65535, np.int32)).min() == 1 and as_batch(np.zeros((8, 8), np.int64)).max() == 0


def test_read_names_what_is_no_image_and_takes_read_only_arrays_silently(tmp_path, recwarn):
    """A path, None or a dict ended in torch's "can't convert np.ndarray of type numpy.object_"; np.asarray of a PIL
    image (read-only) made torch warn that writing to it is undefined."""
    from prkit.world.render import Obj, Scene, render

    image, _ = render(Scene("grass", [Obj("ball", "red", 32, 32, 12)]), seed=1)
    frozen = np.asarray(Image.fromarray(image))
    assert not frozen.flags.writeable
    (reading,) = read(frozen)
    assert not [w for w in recwarn.list if "not writable" in str(w.message)]
    assert reading["objects"][0]["cls"] == "ball" and reading["objects"][0]["color"] == "red"
    with pytest.raises(ValueError, match=r"images: a PosixPath is not an image \(a file path\? open it with PIL"):
        read(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"images\[1\]: a NoneType is not an image"):
        read([image, None])
    with pytest.raises(ValueError, match=r"images\[0\]: a str is not an image \(a file path"):
        read(["x.png"])


def test_load_oracle_names_a_folder_or_a_file_of_other_weights(tmp_path):
    """A folder failed with "No such device (os error 19)", a broken file with "header too small" naming no file,
    another model's weights with every missing key of the oracle."""
    from safetensors.torch import save_file as save

    broken, other = tmp_path / "broken.safetensors", tmp_path / "other.safetensors"
    broken.write_bytes(b"junk")
    save({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path} is a folder; pass the oracle's weights file")):
        load_oracle(path=tmp_path)
    for path in (broken, other):
        with pytest.raises(ValueError, match=re.escape(f"{path} holds no oracle weights (")):
            load_oracle(path=path)
    assert isinstance(load_oracle(path=save_oracle(Oracle(), tmp_path / "o.safetensors")), Oracle)
