"""Figures and their inputs: images of any mode, maps aligned with their labels, masks drawn as they are, the
attention explorer outside a widget frontend."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from prkit.attention import AttentionStore
from prkit.lag import word_index
from prkit.viz import _upsample, attention_explorer, block_grid, mean_change, to_array, token_heatmaps

matplotlib.use("Agg")


def _store(tokens: int = 3, steps=(0, 1)) -> AttentionStore:
    store = AttentionStore()
    for s in steps:
        store.maps[("down_blocks.0.attentions.0", s)] = torch.rand(1, tokens, 4, 4)
        store.maps[("up_blocks.1.attentions.0", s)] = torch.rand(1, tokens, 2, 2)
    return store


def test_to_array_reads_every_image_mode_as_rgb():
    rgb = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    ref = to_array(rgb)
    image = Image.fromarray(rgb)
    assert np.allclose(to_array(image.convert("RGBA")), ref)
    assert np.allclose(to_array(image.convert("P", palette=Image.ADAPTIVE, colors=256)), ref, atol=0.1)
    grey = to_array(image.convert("L"))
    assert grey.shape == (8, 8, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    assert np.allclose(to_array(torch.from_numpy(rgb).permute(2, 0, 1)), ref)  # uint8 (3, H, W) tensor
    assert np.allclose(to_array(torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1), ref, atol=1e-6)
    assert mean_change([image], [image.convert("RGBA")]) == 0.0
    with pytest.raises(ValueError, match="equally long"):
        mean_change([image, image], [image])


def test_maps_must_match_their_labels():
    store = _store(tokens=3)
    with pytest.raises(ValueError, match="3 token positions but 2 labels"):
        attention_explorer(store, np.zeros((8, 8, 3)), ["a", "sks"], interactive=False)
    with pytest.raises(ValueError, match="2 maps for 3 labels"):
        token_heatmaps(np.zeros((8, 8, 3)), np.zeros((2, 4, 4)), ["a", "sks", "ball"])
    with pytest.raises(ValueError, match="store is empty"):
        attention_explorer(AttentionStore(), np.zeros((8, 8, 3)), ["a"])


def test_explorer_outside_a_kernel_gives_the_static_figure_and_leaves_none_open():
    import matplotlib.pyplot as plt

    plt.close("all")
    fig = attention_explorer(_store(), np.zeros((8, 8, 3)), ["a", "sks", "ball"], interactive=True, token=1)
    assert isinstance(fig, matplotlib.figure.Figure) and "'sks'" in fig._suptitle.get_text()
    assert plt.get_fignums() == []


def test_masks_are_drawn_as_they_are():
    ones = np.ones((4, 4))
    assert _upsample(ones, (8, 8), normalize=False).min() == 1.0  # stretched, an all-ones mask was drawn black
    assert _upsample(np.full((4, 4), 0.5), (8, 8), normalize=False).max() == pytest.approx(0.5, abs=0.01)
    fig = block_grid(np.zeros((8, 8, 3)), {"down_blocks.0.attentions.0": ones}, cmap="gray", normalize=False)
    assert fig.axes[0].images[-1].get_array().min() == 1.0
    with pytest.raises(ValueError, match="no maps"):
        block_grid(np.zeros((8, 8, 3)), {})


def test_word_index_finds_a_class_word_of_several_words(tokenizer):
    """DreamBench's class "stuffed animal" (three of its subjects) was "not among the prompt's tokens [..., 'stuffed',
    'animal']": word_index joined the labels without the space. Each word of it must be whole ("red ball" is not the
    pieces of one word)."""
    from prkit.lag import prompt_tokens

    _, labels = prompt_tokens(tokenizer, "a photo of a sks red ball on the beach")
    assert word_index(labels, "red ball") == 5 and word_index(labels, "  Red  Ball ") == 5
    assert word_index(labels, "on the beach") == 7 and word_index(["a", "zw", "x", "q", "ball"], "zwxq ball") == 1
    for missing in ("ball on the grass", "redball", "beach on"):
        with pytest.raises(ValueError, match="is not among"):
            word_index(labels, missing)


def test_maps_of_the_wrong_shape_are_named_and_any_tensor_dtype_is_drawn():
    """token_heatmaps(image, store.aggregate(), labels) (the batch, not image 0's maps) said "1 maps for 7 labels: keep
    the labels' positions in the store", and block_grid of a (T, h, w) map failed inside PIL ("Cannot handle this
    data type"); both name the shape they want now. A bfloat16 map (np.asarray cannot read one) is drawn."""
    image = np.zeros((8, 12, 3))
    with pytest.raises(ValueError, match=r"one image's maps \(T, h, w\), got a batch \(1, 2, 4, 6\).*\(\)\[0\]"):
        token_heatmaps(image, torch.rand(1, 2, 4, 6), ["a", "b"])
    with pytest.raises(ValueError, match=r"one \(h, w\) grid, got shape \(2, 4, 6\)"):
        block_grid(image, {"down_blocks.0.attentions.0": torch.rand(2, 4, 6)})
    ramp = torch.arange(24.0).reshape(4, 6) / 23
    fig = block_grid(image, {"down_blocks.0.attentions.0": ramp.bfloat16()}, normalize=False)
    drawn = fig.axes[0].images[-1].get_array()
    assert drawn.shape == (8, 12) and drawn.min() < 0.1 and drawn.max() > 0.9
    assert len(token_heatmaps(image, ramp[None].bfloat16(), ["a"]).axes[1].images) == 2  # the image, the map on it


def test_word_index_finds_split_identifiers():
    labels = ["a", "photo", "of", "a", "zw", "x", "q", "ball"]
    assert word_index(labels, "zwxq") == 4 and word_index(labels, "ball") == 7 and word_index(labels, "a") == 0
    with pytest.raises(ValueError, match="'sks' is not among"):
        word_index(labels, "sks")


def test_word_index_matches_whole_words_only():
    """word_index joined the labels and ignored where words end: "cat" was found as the first pieces of "category"
    ("c", "a", "t", "e", ...), and "at" as the last piece of "cat" (prompt_tokens strips CLIP's '</w>')."""
    from transformers import CLIPTokenizer

    from prkit.lag import prompt_tokens
    from prkit.pipeline import world_path

    tokenizer = CLIPTokenizer.from_pretrained(str(world_path() / "tokenizer"))  # the world's CLIP tokenizer
    _, labels = prompt_tokens(tokenizer, "a photo of a category cat at a zwxq ball")
    assert labels[4:13] == ["c", "a", "t", "e", "g", "or", "y", "c", "at"]  # how it splits them
    assert word_index(labels, "cat") == 11 and word_index(labels, "at") == 13  # not 4, not 12
    assert word_index(labels, "category") == 4 and word_index(labels, "zwxq") == 15  # split words still found
    assert word_index(labels, "ball") == 18 and word_index(labels, "a") == 0
    assert [label.ends_word for label in labels[4:13]] == [False] * 6 + [True, False, True]
    _, labels = prompt_tokens(tokenizer, "a photo of a category")
    with pytest.raises(ValueError, match=r"^'cat' is not among the prompt's tokens \['a', 'photo', 'of', 'a', 'c', "
                                         r"'a', 't', 'e', 'g', 'or', 'y'\] as a whole word$"):
        word_index(labels, "cat")


def test_word_index_finds_an_identifier_written_in_capitals(tokenizer):
    """CLIP's tokenizer lowercases the prompt, so an identifier written "SKS" (diffusers' SDXL DreamBooth examples use
    "TOK") is the label "sks": word_index(labels, residuals.token), as notebook 03 calls it, raised "not among the
    prompt's tokens" for the very token the prompt holds."""
    from prkit.lag import prompt_tokens

    _, labels = prompt_tokens(tokenizer, "a photo of a SKS dog with a red Ball")
    assert labels[4] == "sks" and labels[9] == "ball"  # what the tokenizer makes of them
    assert word_index(labels, "SKS") == 4 and word_index(labels, "Sks") == 4 and word_index(labels, "sks") == 4
    assert word_index(labels, "BALL") == 9 and word_index(["a", "zw", "x", "q"], "ZWXQ") == 1
    with pytest.raises(ValueError, match="'ZWX' is not among"):
        word_index(labels, "ZWX")


def test_empty_inputs_say_so():
    from prkit import metrics
    from prkit.viz import image_grid

    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])
    one, refs = torch.randn(8), torch.randn(3, 8)
    assert metrics.clip_i(one, refs) == pytest.approx(metrics.clip_i(one[None], refs))  # (D,) is one embedding
    with pytest.raises(ValueError, match="no embeddings"):
        metrics.clip_i(torch.zeros(0, 8), refs)


def test_image_grid_titles_are_one_per_image_or_one_per_column():
    """04 gave one title per prompt, repeated for its rows: with 2 images per prompt (grouped p0, p0, p1, p1) the
    titles went to the wrong images, without a word."""
    from prkit.viz import image_grid

    images = [np.full((4, 4, 3), i / 8) for i in range(8)]
    fig = image_grid(images, ncols=4, titles=list("abcdefgh"))
    assert [ax.get_title() for ax in fig.axes] == list("abcdefgh")
    fig = image_grid(images, ncols=4, titles=list("abcd"))  # column titles: over the top row
    assert [ax.get_title() for ax in fig.axes] == list("abcd") + [""] * 4
    with pytest.raises(ValueError, match="got 2 titles for 8 images in 4 columns"):
        image_grid(images, ncols=4, titles=["p0", "p1"])
    with pytest.raises(ValueError, match="got 6 titles for 8 images in 4 columns"):
        image_grid(images, ncols=4, titles=["p0", "p1"] * 3)


def test_a_single_image_or_a_batch_of_one_is_read_as_one_image():
    """image_grid(image) raised "object of type 'Image' has no len()" for a PIL image and split an (H, W, 3) array
    or a (3, H, W) tensor into H (or 3) strips drawn as images, without a word; difference_maps alike; a (1, 3, H, W)
    batch of one reached imshow as (1, 3, W, 3) ("Invalid shape") from token_heatmaps, overlay and the explorer."""
    from prkit.viz import difference_maps, image_grid

    rgb = (np.random.default_rng(0).random((8, 6, 3)) * 255).astype(np.uint8)
    ref = to_array(rgb)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W)
    for one in (Image.fromarray(rgb), rgb, tensor):
        fig = image_grid(one, titles=["x"])
        assert len(fig.axes) == 1 and np.allclose(fig.axes[0].images[0].get_array(), ref)
        fig = difference_maps(one, one)
        assert len(fig.axes) == 1 and fig.axes[0].images[0].get_array().max() == 0
        assert mean_change(one, one) == 0
    assert np.allclose(to_array(tensor[None]), ref) and np.allclose(to_array(rgb[None]), ref)
    fig = token_heatmaps(tensor[None], np.zeros((2, 4, 4)), ["a", "sks"])
    assert np.allclose(fig.axes[0].images[0].get_array(), ref)
    assert len(image_grid(np.stack([rgb, rgb])).axes) == 2 and len(image_grid(tensor[None]).axes) == 1  # batches
    with pytest.raises(ValueError, match=r"a batch of 2 images \(2, 3, 8, 6\)"):
        to_array(torch.stack([tensor, tensor]))


def test_a_store_without_those_maps_says_what_it_holds():
    """store.aggregate() of a store nothing was sampled into raised "max() arg is an empty sequence", and a step the
    store did not keep (AttentionStore(steps=[0, 10])) a bare KeyError: ('down_blocks.0.attentions.0', 5)."""
    with pytest.raises(ValueError, match="the attention store is empty: fill it by sampling"):
        AttentionStore().aggregate()
    store = _store(steps=(0, 10))
    with pytest.raises(KeyError, match=r"step 5 of block 'down_blocks.0.attentions.0' was not kept; kept steps: "
                                        r"\[0, 10\]"):
        store.aggregate(step=5)
    with pytest.raises(KeyError, match=r"no maps stored for block 'mid_block.attentions.0'; stored: "
                                        r"\['down_blocks.0.attentions.0', 'up_blocks.1.attentions.0'\]"):
        store.get("mid_block.attentions.0", 0)
    assert torch.equal(store.get("up_blocks.1.attentions.0", 10), store.maps[("up_blocks.1.attentions.0", 10)])
    assert store.aggregate(step=10, size=4).shape == (1, 3, 4, 4)


def test_difference_maps_pairs_its_images_and_titles_or_says_why_not():
    """difference_maps drew min(len) pairs of unequal lists without a word (mean_change refuses them), raised
    IndexError for fewer titles than pairs, dropped extra titles, and met an empty list with matplotlib's 'Number of
    columns must be a positive integer, not 0'."""
    from prkit.viz import difference_maps

    black, white = np.zeros((4, 4, 3)), np.ones((4, 4, 3))
    fig = difference_maps([black, black], [white, black], titles=["a", "b"])
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    assert [ax.images[0].get_array().max() for ax in fig.axes] == [1.0, 0.0]
    with pytest.raises(ValueError, match="equally long, non-empty lists of images, got 2 and 1"):
        difference_maps([black, black], [white])
    with pytest.raises(ValueError, match="equally long, non-empty lists of images, got 0 and 0"):
        difference_maps([], [])
    for titles in (["a"], ["a", "b", "c"]):
        with pytest.raises(ValueError, match=f"got {len(titles)} titles for 2 pairs"):
            difference_maps([black, black], [white, black], titles=titles)


def test_attention_explorer_names_an_image_or_token_index_out_of_range():
    """image_index=1 on a store of one image (or a token past the labels) failed with a bare IndexError: "index 1 is
    out of bounds for dimension 0 with size 1", naming no argument."""
    store, image = _store(), np.zeros((8, 8, 3))
    with pytest.raises(ValueError, match=r"attention_explorer: image_index=1, but the store holds 1 image"):
        attention_explorer(store, image, ["a", "b", "c"], image_index=1, interactive=False)
    with pytest.raises(ValueError, match=r"attention_explorer: token=3 is no index into the 3 labels"):
        attention_explorer(store, image, ["a", "b", "c"], token=3, interactive=False)
    attention_explorer(store, image, ["a", "b", "c"], image_index=-1, token=2, interactive=False)
