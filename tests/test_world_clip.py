"""The world's CLIP: shipped, loaded through prkit.metrics like any CLIP, and it reads renders."""

import pytest
import torch
from PIL import Image

from prkit import metrics
from prkit.world import clip as C
from prkit.world.render import Obj, Scene, render


def test_plain_caption_drops_colours_and_patterns():
    assert C.plain_caption("a photo of an orange and blue striped ring next to a red ball on the grass") == \
        "a photo of a ring next to a ball on the grass"
    assert C.plain_caption("a picture of a red box") == "a picture of a box"
    assert C.plain_caption("an orange star") == "a star"


def test_build_clip_fits_the_budget():
    from transformers import CLIPTokenizer

    from prkit.world.build_tokenizer import TOKENIZER_DIR

    model = C.build_clip(CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)))
    assert sum(p.numel() for p in model.parameters()) < 1.5e6
    assert model.config.vision_config.image_size == 64


def test_shipped_world_clip_matches_images_to_their_captions():
    clip, reason = metrics.try_load_clip("world")
    assert reason is None, reason
    captions = ["a photo of a red ball on the grass", "a photo of a blue box in the snow",
                "a photo of a green star on the beach", "a photo of a yellow heart under the night sky"]
    scenes = [Scene("grass", [Obj("ball", "red", 32, 32, 14)]), Scene("snow", [Obj("box", "blue", 32, 32, 14)]),
              Scene("beach", [Obj("star", "green", 32, 32, 14)]), Scene("night sky", [Obj("heart", "yellow", 32, 32, 14)])]
    images = [Image.fromarray(render(s, seed=i)[0]) for i, s in enumerate(scenes)]
    sims = metrics.pairwise_cosine(clip.embed_images(images), clip.embed_texts(captions))
    assert torch.equal(sims.argmax(1), torch.arange(4)), sims
    # the metric convention: CLIPScore of the right caption beats the wrong ones on average
    right = metrics.clip_t(clip.embed_images(images), clip.embed_texts(captions), "clipscore")
    wrong = metrics.clip_t(clip.embed_images(images), clip.embed_texts(captions[1:] + captions[:1]), "clipscore")
    assert right > wrong + 0.2


def test_retrieval_accuracy_on_fresh_renders():
    from prkit.world.train import render_pool

    clip, _ = metrics.try_load_clip("world")
    images, caps = render_pool(11, 9, 100, 100, 0.5, 0)
    acc = C.retrieval_accuracy(clip.model.float(), clip.tokenizer, images, caps, torch.device("cpu"), group=50)
    assert acc >= 0.85


@pytest.mark.parametrize("args", [["--eval-n", "50"], ["--steps", "0"], ["--minutes", "0"], ["--batch", "0"]])
def test_clip_command_refuses_settings_it_would_crash_on_after_training(tmp_path, args):
    from prkit.world import clip

    with pytest.raises(SystemExit):
        clip.main(["--out", str(tmp_path), *args])
    assert not (tmp_path / "clip").exists()


@pytest.mark.parametrize("minutes", ["nan", "inf"])
def test_clip_command_refuses_a_time_it_cannot_train_for(tmp_path, minutes, monkeypatch, capsys):
    """--minutes nan passed the check (nan <= 0 is False), rendered the pool, trained no step and failed on the
    unset loss; --minutes inf never stopped."""
    from prkit.world import clip

    monkeypatch.setattr(clip, "train_clip", lambda *a, **k: pytest.fail("it trained"))
    with pytest.raises(SystemExit):
        clip.main(["--out", str(tmp_path), "--minutes", minutes])
    assert f"--minutes {minutes}: must be a finite number above 0" in capsys.readouterr().err


def test_clip_training_shorter_than_one_step_trains_one():
    """--minutes 1e-9 trained no step and failed with UnboundLocalError on the loss, after rendering the pool."""
    import math

    from prkit.world import clip

    recipe = clip.ClipRecipe(n_images=8, chunk=8, workers=0, minutes=1e-9, batch=4, eval_n=100)
    _, _, info = clip.train_clip(recipe, torch.device("cpu"))
    assert info["steps"] == 1 and math.isfinite(info["loss_last"]) and 0 <= info["retrieval_top1_of_100"] <= 1
