"""Metrics: hand computations on fixed embeddings, tiny random CLIP/ViT end to end, reasons when unavailable."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from prkit import metrics
from prkit.metrics import MetricUnavailable
from tiny import tiny_clip, tiny_vit

GEN = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # unit vectors e1 and e2 (the second scaled: cosine ignores it)
REF = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, -1.0]])  # 45 deg, e1, -e2
S = 1 / math.sqrt(2)


def test_clip_i_and_dino_are_mean_pairwise_cosine():
    # gen e1 vs refs: s, 1, 0 ; gen e2 vs refs: s, 0, -1
    per_image = [(S + 1 + 0) / 3, (S + 0 - 1) / 3]
    for fn in (metrics.clip_i, metrics.dino):
        assert fn(GEN, REF) == pytest.approx(sum(per_image) / 2, abs=1e-6)
        assert torch.allclose(fn(GEN, REF, reduce=False), torch.tensor(per_image), atol=1e-6)


def test_clip_t_both_conventions_paired_and_shared():
    text = torch.tensor([[1.0, 1.0], [0.0, -5.0]])  # cos with e1: s ; with e2: -1
    assert metrics.clip_t(GEN, text) == pytest.approx((S - 1) / 2, abs=1e-6)
    assert metrics.clip_t(GEN, text, "clipscore") == pytest.approx(2.5 * (S + 0) / 2, abs=1e-6)
    shared = torch.tensor([3.0, 4.0])  # cos with e1: 0.6, with e2: 0.8
    assert torch.allclose(metrics.clip_t(GEN, shared, reduce=False), torch.tensor([0.6, 0.8]), atol=1e-6)
    assert metrics.clip_t(GEN, shared[None], "clipscore") == pytest.approx(2.5 * 0.7, abs=1e-6)
    assert set(metrics.CLIP_T_CONVENTIONS) == {"dreambooth", "clipscore"}
    with pytest.raises(ValueError, match="convention"):
        metrics.clip_t(GEN, text, "cosine")
    with pytest.raises(ValueError, match="3 text embeddings for 2 images"):
        metrics.clip_t(GEN, torch.ones(3, 2))


def test_batched_metrics_match_a_loop():
    gen = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    ref = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    loop = sum(float(torch.nn.functional.cosine_similarity(g, r, dim=0)) for g in gen for r in ref) / 35
    assert metrics.clip_i(gen, ref) == pytest.approx(loop, abs=1e-6)
    assert metrics.clip_i(gen.double(), ref) == pytest.approx(loop, abs=1e-6)


def test_an_embedding_scored_against_itself_is_exactly_1_and_no_cosine_passes_it():
    """In float32 an image scored against itself came out 0.99999994, and cosines of 1.0000001 (a value no two
    vectors have) went into the rows: CLIP-I/DINO of identical images must read 1, not nearly."""
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * torch.rand(64, 1) * 10
    cos = metrics.pairwise_cosine(x, x)
    assert cos.dtype == torch.float32 and cos.abs().max() <= 1 and torch.equal(cos.diag(), torch.ones(64))
    assert all(metrics.clip_i(row, row) == 1.0 and metrics.dino(row, row) == 1.0 for row in x)
    assert torch.equal(metrics.clip_t(x, x, reduce=False), torch.ones(64))
    assert metrics.clip_t(x, x, "clipscore") == 2.5 and metrics.clip_t(x, -x) == -1.0


def _images(n: int, size: int = 40) -> list:
    return [Image.new("RGB", (size + 8 * i, size), (40 * i, 200 - 30 * i, 90)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def tiny_vit_folder(tmp_path_factory):
    return tiny_vit(tmp_path_factory.mktemp("dino"))


def test_tiny_clip_end_to_end(tiny_clip_folder):
    clip = metrics.load_clip(tiny_clip_folder)
    gen, ref = clip.embed_images(_images(3)), clip.embed_images(_images(2, 64))
    assert gen.shape == (3, 16) and ref.shape == (2, 16) and gen.dtype == torch.float32
    texts = clip.embed_texts(["a photo of a dog", "a red ball on the beach", "a cat"])
    assert texts.shape == (3, 16)
    assert -1 <= metrics.clip_i(gen, ref) <= 1
    assert 0 <= metrics.clip_t(gen, texts, "clipscore") <= 2.5
    # batching does not change embeddings; identical images give CLIP-I 1
    clip.batch_size = 1
    assert torch.allclose(clip.embed_images(_images(3)), gen, atol=1e-5)
    assert metrics.clip_i(gen[:1], gen[:1]) == pytest.approx(1.0, abs=1e-6)
    for empty in (lambda: clip.embed_images([]), lambda: clip.embed_texts([])):
        with pytest.raises(ValueError, match="no (images|texts) to embed"):  # was torch.cat's "non-empty list"
            empty()


def test_tiny_dino_end_to_end(tiny_vit_folder):
    backbone = metrics.load_dino(tiny_vit_folder)
    feats = backbone.embed_images(_images(4))
    assert feats.shape == (4, 32)
    assert -1 <= metrics.dino(feats[:2], feats[2:]) <= 1
    x = metrics._pixels(_images(1, 300), 256, 224, metrics.IMAGENET_MEAN, metrics.IMAGENET_STD)
    assert x.shape == (1, 3, 224, 224)  # resize 256, centre crop 224


def test_missing_backbones_give_reasons(tmp_path, monkeypatch):
    model, reason = metrics.try_load_clip("openai/clip-vit-base-patch32", cache_dir=tmp_path)  # cache only
    assert model is None and "downloads are off" in reason and "openai/clip-vit-base-patch32" in reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, reason = metrics.try_load_clip("openai/clip-vit-base-patch32", download=True, cache_dir=tmp_path)
    assert model is None and "offline" in reason and "hf download" in reason
    model, reason = metrics.try_load_dino("facebook/dino-vits16", cache_dir=tmp_path)
    assert model is None and "facebook/dino-vits16" in reason
    with pytest.raises(MetricUnavailable, match="not a transformers model folder"):
        metrics.load_clip(tmp_path)
    monkeypatch.setattr(metrics, "world_clip_path", lambda: tmp_path / "nothing")
    with pytest.raises(MetricUnavailable, match="world CLIP"):
        metrics.load_clip("world")


def test_a_checkpoint_that_lacks_the_backbones_weights_is_a_reason_not_a_random_network(tiny_clip_folder,
                                                                                          tiny_vit_folder, tmp_path):
    """--dino given a CLIP folder (or a DINOv2 one) loaded a ViT whose every weight was random (transformers only
    warns), and DINO was scored with it; a CLIP folder without some of its weights scored with random ones."""
    import shutil

    from safetensors.torch import load_file, save_file

    assert metrics.try_load_dino(tiny_vit_folder)[0] is not None and metrics.try_load_clip(tiny_clip_folder)[0]
    model, reason = metrics.try_load_dino(tiny_clip_folder)
    assert model is None and reason.startswith(f"{str(tiny_clip_folder)!r} is no DINO checkpoint (its model type is "
                                               "'clip'): ") and "weights are missing from it" in reason
    clip = Path(shutil.copytree(tiny_clip_folder, tmp_path / "clip"))
    weights = load_file(clip / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "text_projection.weight"}, clip / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(MetricUnavailable, match=r"is no CLIP checkpoint .*: 1 weights are missing from it \(e\.g\. "
                                                r"'text_projection\.weight'\)"):
        metrics.load_clip(clip)


def test_a_missing_local_backbone_folder_is_named_not_sent_to_the_hub(tmp_path):
    model, reason = metrics.try_load_clip(str(tmp_path / "my_clip_folder"))
    assert model is None and "there is no folder" in reason and "hf download" not in reason


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_backbone_name_is_a_reason_not_the_current_folder(tiny_clip_folder, monkeypatch, name):
    """load_clip("") loaded the CLIP folder one stood in (Path("") is '.'), as load_pipeline("") no longer does."""
    monkeypatch.chdir(tiny_clip_folder)
    model, reason = metrics.try_load_clip(name)
    assert model is None and reason == (f"load_clip: name_or_path={name!r} is empty; give a hub id, a folder that "
                                        "holds the backbone's config.json ('.' for the current one) or 'world' (an "
                                        "unset variable?)")
    with pytest.raises(MetricUnavailable, match=r"^load_dino: name_or_path='.*' is empty; give a hub id, a folder "
                                                 r"that holds the backbone's config.json \('.' for the current one\) "
                                                 r"\(an unset variable\?\)$"):
        metrics.load_dino(name)
    assert metrics.try_load_clip(".")[0] is not None  # said so, it loads


def test_transparent_and_16_bit_images_are_embedded_as_loaded_and_as_clips_processor_does(tiny_clip_folder, tmp_path):
    """Transparency on white (prkit's loader and transformers' CLIP processor); a 16-bit grey image scaled, not
    clipped. They were converted with Pillow's convert('RGB'): the transparent background became black and a 16-bit
    photo almost all white."""
    import numpy as np

    from prkit.images import _to_rgb

    clip = metrics.load_clip(tiny_clip_folder)
    cutout = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # a cut-out subject on a transparent background
    cutout.paste((200, 10, 10, 255), (10, 10, 30, 30))
    on_white = Image.alpha_composite(Image.new("RGBA", (40, 40), (255,) * 4), cutout).convert("RGB")
    assert torch.allclose(clip.embed_images([cutout]), clip.embed_images([on_white]), atol=1e-5)
    Image.fromarray(np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16)).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as grey:
        assert grey.mode.startswith("I")
        x = metrics._pixels([grey], 32, 32, metrics.CLIP_MEAN, metrics.CLIP_STD)
        assert torch.allclose(x, metrics._pixels([_to_rgb(grey, grey.format)], 32, 32, metrics.CLIP_MEAN,
                                                 metrics.CLIP_STD))


def test_pixels_resize_the_long_side_as_clips_processor_and_torchvision_do():
    """The long side is int(size * long / short), as transformers' CLIP processor and torchvision's Resize make it:
    rounding it made a 47x33 image 46 px wide instead of 45 and shifted the centre crop by a pixel."""
    import numpy as np

    rng = np.random.default_rng(0)
    for w, h in [(47, 33), (33, 47), (4032 // 40, 3024 // 40)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        short, long = min(w, h), max(w, h)
        size = (32, int(32 * long / short)) if w <= h else (int(32 * long / short), 32)
        resized = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (resized.width - 32) // 2, (resized.height - 32) // 2
        ref = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255.0
        ref = (torch.from_numpy(ref).permute(2, 0, 1)[None] - torch.tensor(metrics.CLIP_MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(metrics.CLIP_STD).view(1, 3, 1, 1)
        assert torch.allclose(metrics._pixels([image], 32, 32, metrics.CLIP_MEAN, metrics.CLIP_STD), ref,
                              atol=1e-6), (w, h)


def test_embeddings_of_other_sizes_or_none_are_refused():
    """Text and image embeddings of other widths (another CLIP's, hidden states instead of projections) are refused:
    clip_t reshaped (1, 32) text embeddings into two rows of 16 for two images and gave a number; clip_i and dino
    failed with torch's 'mat1 and mat2 shapes cannot be multiplied'; clip_t of no images gave NaN."""
    with pytest.raises(ValueError, match="32 dimensions.*16"):
        metrics.clip_t(torch.ones(2, 16), torch.ones(1, 32))
    with pytest.raises(ValueError, match="8 dimensions.*16"):
        metrics.clip_t(torch.ones(2, 16), torch.ones(4, 8))
    for fn in (metrics.clip_i, metrics.dino):
        with pytest.raises(ValueError, match="16 dimensions.*32"):
            fn(torch.ones(2, 16), torch.ones(3, 32))
    with pytest.raises(ValueError, match="no image embeddings"):
        metrics.clip_t(torch.ones(0, 16), torch.ones(16))
    assert metrics.clip_t(torch.ones(16), torch.ones(16)) == pytest.approx(1.0)  # one of each still works
    assert metrics.clip_t(GEN, torch.tensor([[[3.0, 4.0]], [[3.0, 4.0]]])) == pytest.approx(0.7, abs=1e-6)  # (N, 1, D)


def test_images_that_are_no_pil_images_are_named(tiny_clip_folder, tiny_vit_folder):
    """An array or tensor (a pipeline's output_type='np' or 'pt') is refused naming what it is and what to pass: it
    failed with "'numpy.ndarray' object has no attribute 'convert'"."""
    import numpy as np

    for backbone in (metrics.load_clip(tiny_clip_folder), metrics.load_dino(tiny_vit_folder)):
        for bad, name in [(np.zeros((40, 40, 3), np.uint8), "ndarray"), (torch.zeros(3, 40, 40), "Tensor")]:
            with pytest.raises(TypeError, match=rf"image 1 is a {name}.*PIL"):
                backbone.embed_images([_images(1)[0], bad])
