"""Tests for prkit.data: one per bad input, on tiny images written to tmp_path."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prkit.data import (
    IMAGE_EXTENSIONS,
    Concept,
    ConceptDataError,
    DataConfig,
    load_concept,
    load_dreambooth,
    load_image,
)

R = 32  # crop side used throughout: small for speed
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def halves(left: tuple, right: tuple, size: tuple[int, int] = (64, 64), mode: str = "RGB"):
    """An image whose left half is `left` and right half `right`."""
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def close(px: tuple, rgb: tuple, tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, rgb))


def make_folder(folder: Path, n: int = 3, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 80, 160)).save(folder / f"{i:02d}.png")
    return folder


# --- load_image: modes and geometry ----------------------------------------------------------


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    img = halves(RED, BLUE)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg", R)
    top, bottom = out.getpixel((R // 2, 2)), out.getpixel((R // 2, R - 3))
    # 6 = rotate 90 deg clockwise to display: the left (red) half ends on top; 8 is the reverse
    assert close(top, RED if orientation == 6 else BLUE)
    assert close(bottom, BLUE if orientation == 6 else RED)


def test_grayscale_becomes_rgb(tmp_path):
    Image.new("L", (40, 40), 100).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png", R)
    assert out.mode == "RGB" and out.size == (R, R) and out.getpixel((5, 5)) == (100, 100, 100)


def test_palette_with_transparency_composites_on_white(tmp_path):
    img = Image.new("P", (40, 40), 0)
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.paste(1, (20, 0, 40, 40))
    img.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png", R)
    assert out.getpixel((2, 2)) == WHITE  # the transparent red index
    assert out.getpixel((R - 3, 2)) == BLUE


def test_rgba_transparent_pixels_become_white(tmp_path):
    halves((255, 0, 0, 0), (0, 0, 255, 255), (40, 40), "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", R)
    assert out.getpixel((2, 2)) == WHITE and out.getpixel((R - 3, 2)) == BLUE


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert close(load_image(tmp_path / "c.jpg", R).getpixel((5, 5)), RED)


@pytest.mark.parametrize("mode,name", [("I;16", "x.png"), ("I;16B", "x.tif"), ("I", "x.tif")])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, mode, name):
    arr = np.full((40, 40), 65535, dtype=np.uint16)
    arr[:, 20:] = 32768
    if mode == "I;16":
        img = Image.fromarray(arr)
    elif mode == "I;16B":
        img = Image.frombytes("I;16B", (40, 40), arr.astype(">u2").tobytes())
    else:
        img = Image.fromarray(arr.astype(np.int32))
    assert img.mode == mode
    img.save(tmp_path / name)
    out = load_image(tmp_path / name, R)
    assert out.getpixel((2, 2)) == WHITE
    assert all(abs(c - 128) <= 1 for c in out.getpixel((R - 3, 2)))


@pytest.mark.parametrize("name,maxval,sample,grey", [
    ("dark.pgm", 4095, 15, 1),  # 15/4095 of white; Pillow rescales it to 240 of 65535
    ("dark.pgm", 65535, 255, 1),
    ("mid.pgm", 1023, 512, 128),
    ("dark.png", 65535, 255, 1),  # a 16-bit PNG, opened as mode "I" as Pillow 10 does
])
def test_dark_sixteen_bit_pgm_and_png_keep_their_range(tmp_path, monkeypatch, name, maxval, sample, grey):
    """A PGM's maxval (or a 16-bit PNG's 0..65535) is its white: values that all stay under 256 were read as 8-bit,
    a dark picture 257x too bright (a pixel of 255/65535 came out as 255 of 255)."""
    if name.endswith(".pgm"):
        samples = np.full((8, 8), sample, ">u2" if maxval > 255 else "u1")
        (tmp_path / name).write_bytes(f"P5\n8 8\n{maxval}\n".encode() + samples.tobytes())
    else:
        from PIL import PngImagePlugin

        Image.fromarray(np.full((8, 8), sample, np.uint16)).save(tmp_path / name)
        monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
        with Image.open(tmp_path / name) as opened:
            assert opened.mode == "I"
    assert load_image(tmp_path / name, 8).getpixel((2, 2)) == (grey, grey, grey)


def test_one_bit(tmp_path):
    halves(0, 1, (40, 40), "1").save(tmp_path / "b.png")
    out = load_image(tmp_path / "b.png", R)
    assert out.getpixel((2, 2)) == (0, 0, 0) and out.getpixel((R - 3, 2)) == WHITE


def test_tiny_image_is_upscaled_with_warning(tmp_path):
    Image.new("RGB", (8, 8), GREEN).save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match=r"tiny\.png.*8x8.*upscaling"):
        out = load_image(tmp_path / "tiny.png", R)
    assert out.size == (R, R)


def test_wide_image_is_center_cropped(tmp_path):
    img = Image.new("RGB", (5000, 300), RED)
    img.paste(GREEN, (2350, 0, 2650, 300))  # exactly the central 300 x 300 square
    img.save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", R)
    assert out.size == (R, R)
    assert all(close(out.getpixel(xy), GREEN, 5) for xy in [(0, 0), (R - 1, 0), (0, R - 1)])
    small = load_image(tmp_path / "wide.png", R, max_side=1000)  # downscaled 5x first
    assert close(small.getpixel((0, 0)), GREEN, 5)


def test_center_crop_false_keeps_whole_image(tmp_path):
    halves(RED, BLUE, (128, 64)).save(tmp_path / "w.png")
    out = load_image(tmp_path / "w.png", R, center_crop=False)
    assert out.size == (R, R) and close(out.getpixel((1, 1)), RED, 5)


# --- load_image: unreadable files ------------------------------------------------------------


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "trunc.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConceptDataError, match=r"cannot read image '.*trunc\.jpg': .*truncated"
                                               r".*Replace the file") as err:
        load_image(path, R)
    assert "skip_bad" not in str(err.value)  # load_concept's switch: load_image reads one file and has none


def test_load_image_says_a_heic_photo_needs_pillow_heif(tmp_path):
    """load_concept named pillow-heif for .heic files in a folder; load_image said only that Pillow could not
    identify the file (and advised load_concept's skip_bad)."""
    from prkit.images import _plugin_opens

    if _plugin_opens(".heic"):
        pytest.skip("pillow-heif is installed here")
    (tmp_path / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    with pytest.raises(ConceptDataError, match=r"phone\.heic'.*\.heic images need pillow-heif \(pip install "
                                               r"pillow-heif\), or convert it to JPEG or PNG"):
        load_image(tmp_path / "phone.heic", R)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ConceptDataError, match=r"empty\.png.*empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png", R)


def test_text_file_named_png(tmp_path):
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(ConceptDataError, match=r"cannot read image '.*fake\.png'.*identify"):
        load_image(tmp_path / "fake.png", R)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (50, 50)).save(tmp_path / "bomb.png")  # 2,500 pixels: past twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ConceptDataError, match=r"bomb\.png.*decompression bomb.*MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "bomb.png", R)


def test_images_past_the_bomb_warning_but_under_the_limit_are_read(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "big.png")  # 1,600 pixels: a 108 MP photo, scaled
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(tmp_path / "big.png", 8).getpixel((4, 4)) == (10, 200, 30)


def _decoded_sizes(monkeypatch) -> list:
    """The sizes Pillow decodes at from now on (after any reduced-scale draft)."""
    opened = []
    real_load = Image.Image.load

    def spy(self):
        opened.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    return opened


def test_huge_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    grid = np.indices((400, 300)).sum(0) % 2 * 255  # checkerboard: a full decode would be read as grey
    Image.fromarray(np.uint8(grid.T)).convert("RGB").save(tmp_path / "huge.jpg", quality=95)
    opened = _decoded_sizes(monkeypatch)
    out = load_image(tmp_path / "huge.jpg", 16, max_side=100)
    assert out.size == (16, 16)
    assert opened[0] == (100, 75)  # the DCT's 1/4 scale: never below max_side, never the full 400 x 300


def test_float_and_wide_integer_modes_keep_their_brightness(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "float.tif")
    Image.fromarray(np.full((8, 8), 200, np.int32), "I").save(tmp_path / "eight.tif")
    assert load_image(tmp_path / "float.tif", 8).getpixel((2, 2)) == (128, 128, 128)
    assert load_image(tmp_path / "eight.tif", 8).getpixel((2, 2)) == (200, 200, 200)


def test_multi_frame_images_use_the_first_frame_and_say_so(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning) as caught:
        concept = load_concept(tmp_path, "sks", "dog", 8)
    assert any(re.search(r"anim\.gif' has 2 frames; using the first", str(w.message)) for w in caught)
    assert concept.images[0].getpixel((4, 4))[0] > 200


# --- load_concept: folders and arguments -----------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(ConceptDataError, match=r"'.*nowhere' does not exist"):
        load_concept(tmp_path / "nowhere", "sks", "dog")


def test_folder_is_a_file(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(ConceptDataError, match="is not a directory"):
        load_concept(tmp_path / "f.png", "sks", "dog")


def test_a_folder_this_user_cannot_read_is_named_with_what_to_do(tmp_path, monkeypatch):
    """A concept folder without read (or search) permission raised a bare PermissionError naming
    '<folder>/concept.json', a file the user never had, and saying nothing of what to do (`prkit train` printed
    just that). Simulated with patched stats: root reads any folder."""
    folder = make_folder(tmp_path / "photos")
    stat = Path.stat

    def denied(self, *args, **kwargs):
        if self.parent == folder:  # a folder with r but not x: its entries cannot be reached
            raise PermissionError(13, "Permission denied", str(self))
        return stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", denied)
    with pytest.raises(ConceptDataError, match=r"cannot read concept folder '.*photos' \(permission denied\); .*access"):
        load_concept(folder, "sks", "dog", R)


def test_empty_folder(tmp_path):
    with pytest.raises(ConceptDataError, match=r"no images .* the folder is empty.*\.webp"):
        load_concept(tmp_path, "sks", "dog")


def test_folder_with_only_non_images(tmp_path):
    for i in range(7):
        (tmp_path / f"note{i}.txt").write_text("x")
    match = r"found 7 other file\(s\) or folder\(s\) \(note0\.txt, .*note4\.txt, \.\.\.\)\. Accepted"
    with pytest.raises(ConceptDataError, match=match + r" extensions: \.jpg"):
        load_concept(tmp_path, "sks", "dog")


@pytest.mark.parametrize("token,class_word,match", [
    ("", "dog", "token must be a non-empty string"),
    ("s ks", "dog", "token 's ks' contains whitespace"),
    ("sks", " ", "class_word must be a non-empty string"),
    ("dog", "dog", "token and class_word are both 'dog'"),
    (None, "dog", "token is required"),
    # a prompt word as the token: its attention and LAG's mask took the other occurrence too
    ("a", "dog", "token 'a' is also another word of the training prompt 'a photo of a a dog'"),
    ("Photo", "dog", "token 'Photo' is also another word"),
    ("hot", "hot dog", "token 'hot' is also another word of the training prompt 'a photo of a hot hot dog'"),
])
def test_bad_token_or_class_word(tmp_path, token, class_word, match):
    make_folder(tmp_path)
    with pytest.raises(ConceptDataError, match=re.escape(match)):
        load_concept(tmp_path, token, class_word, R)


@pytest.mark.parametrize("token,class_word,template,where", [
    ("sks", "sks dog", None, "the class word 'sks dog' contains it. Choose another token (a rare identifier), "
                             "or a class word without it"),
    ("a", "dog", None, "the prompt template 'a photo of a {token} {class_word}' contains it. Choose another token (a "
                       "rare identifier such as 'sks'), or a prompt template without it"),
    ("sks", "dog", "a sks photo of {token} {class_word}", "the prompt template 'a sks photo of {token} {class_word}' "
                                                          "contains it"),
    ("photo", "photo frame", None, "the class word 'photo frame' and the prompt template 'a photo of a {token} "
                                   "{class_word}' contain it. Choose another token (a rare identifier such as 'sks'), "
                                   "or a class word and a prompt template without it"),
])
def test_a_token_that_is_another_word_of_the_prompt_says_where_that_word_is(tmp_path, token, class_word, template,
                                                                              where):
    """The token's second occurrence in the training prompt was not placed: the class word ('sks dog') or the
    template's text hold it, and only that is to change (the advice to pick 'sks' was no help for 'sks' itself)."""
    make_folder(tmp_path)
    with pytest.raises(ConceptDataError, match=f"token {token!r} is also another word of the training prompt") as err:
        load_concept(tmp_path, token, class_word, R, prompt_template=template)
    assert where in str(err.value)


@pytest.mark.parametrize("token,class_word,template,prompt,where", [
    ("sks!", "sks dog", None, "a photo of a sks! sks dog", "the class word 'sks dog' contains its word 'sks'"),
    ("<sks>", "dog", "a photo of {token} {class_word}, sks style", "a photo of <sks> dog, sks style",
     "the prompt template 'a photo of {token} {class_word}, sks style' contains its word 'sks'"),
    ("sks.", "dog", "sks: a photo of {token} {class_word}", "sks: a photo of sks. dog",
     "the prompt template 'sks: a photo of {token} {class_word}' contains its word 'sks'"),
    ("dog!", "dog", None, "a photo of a dog! dog", "the class word 'dog' contains its word 'dog'"),
    ("zwx-v2", "dog", "a photo of {token} {class_word} (zwx v2)", "a photo of zwx-v2 dog (zwx v2)",
     "the prompt template 'a photo of {token} {class_word} (zwx v2)' contains its words 'zwx v2'"),
])
def test_a_token_with_punctuation_is_another_word_of_the_prompt_too(tmp_path, token, class_word, template, prompt,
                                                                     where):
    """The text encoder reads punctuation apart ('sks!' is 'sks' and '!'), but the check compared the token whole
    with the prompt's words: 'sks!' with the class word 'sks dog' trained "a photo of a sks! sks dog". The token's
    words are compared, punctuation aside; a token whose words are not the other text's, in their order, passes."""
    make_folder(tmp_path)
    with pytest.raises(ConceptDataError) as err:
        load_concept(tmp_path, token, class_word, R, prompt_template=template)
    assert str(err.value).startswith(f"token {token!r} is also another word of the training prompt {prompt!r}: "
                                     f"{where}. Choose another token")
    assert load_concept(tmp_path, "zwx-dog", "dog", R).prompt == "a photo of a zwx-dog dog"  # 'zwx dog' is not held
    assert load_concept(tmp_path, "<sks>", "dog", R).prompt == "a photo of a <sks> dog"


@pytest.mark.parametrize("template", ["{{token}} photo of a {class_word}", "a photo of a {token} {class_word.upper}",
                                      "a photo of a {token} {class_word!r}", "a photo of a {token!r} {class_word}"])
def test_train_config_refuses_the_prompt_templates_load_concept_refuses(tmp_path, template):
    """TrainConfig looked for the text '{token}' and tried the format: '{{token}}' (a literal, no identifier),
    '{class_word.upper}' (a method's text) and '{class_word!r}' (the word in quotes) passed and trained such prompts.
    One rule for both, in the same words."""
    from prkit.train import TrainConfig

    make_folder(tmp_path)
    rule = "must contain {token} and may use only {token} and {class_word}, as plain fields"
    with pytest.raises(ConceptDataError) as err:
        load_concept(tmp_path, "sks", "dog", R, prompt_template=template)
    assert str(err.value) == f"prompt_template {template!r} {rule}."
    with pytest.raises(ValueError) as err:
        TrainConfig(prompt_template=template)
    example = "(e.g. 'a photo of a {token} {class_word}')"
    assert str(err.value) == f"TrainConfig.prompt_template {template!r} {rule} {example}"
    for fine in ("{{token}} {token} {class_word}", "a {token} photo"):
        assert TrainConfig(prompt_template=fine).prompt_template == fine
        assert load_concept(tmp_path, "sks", "dog", R, prompt_template=fine).prompt_template == fine


def test_bad_prompt_template(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(ConceptDataError, match="prompt_template"):
        load_concept(tmp_path, "sks", "dog", R, prompt_template="a {token} {colour}")
    with pytest.raises(ConceptDataError, match=r"prompt_template 'a \{token\} photo of \{token\} \{class_word\}' "
                                               r"holds \{token\} 2 times; use it once"):
        load_concept(tmp_path, "sks", "dog", R, prompt_template="a {token} photo of {token} {class_word}")
    assert load_concept(tmp_path, "sks", "dog", R, prompt_template="{{token}} {token} {class_word}")  # a literal
    from prkit.train import TrainConfig

    with pytest.raises(ValueError, match=r"TrainConfig.prompt_template '\{token\} \{token\}' holds \{token\} 2 times"):
        TrainConfig(prompt_template="{token} {token}")


def test_corrupt_file_in_folder_raises_naming_it(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "zz.jpg").write_text("junk")
    with pytest.raises(ConceptDataError, match=r"zz\.jpg.*skip_bad=True"):
        load_concept(tmp_path, "sks", "dog", R)


def test_skip_bad_skips_with_warning(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "zz.jpg").write_text("junk")
    with pytest.warns(UserWarning, match=r"skipping unreadable image '.*zz\.jpg'"):
        c = load_concept(tmp_path, "sks", "dog", R, skip_bad=True)
    assert len(c) == 3 and [p.name for p in c.paths] == ["00.png", "01.png", "02.png"]


def test_all_bad_with_skip_bad(tmp_path):
    (tmp_path / "a.jpg").write_text("junk")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping"):
        with pytest.raises(ConceptDataError, match=r"none of the 2 image file\(s\).*could be read: a\.jpg \(.*b\.png"):
            load_concept(tmp_path, "sks", "dog", R, config=DataConfig(resolution=R, skip_bad=True))


def test_non_images_warn_once_hidden_files_silent(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "CAPTION.csv").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = load_concept(tmp_path, "sks", "dog", R)
    assert len(c) == 3
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "CAPTION.csv, notes.txt" in msg and ".DS_Store" not in msg


def test_order_is_sorted_and_extensions_case_insensitive(tmp_path):
    for name, color in [("b.PNG", BLUE), ("a.jpeg", RED), ("c.BMP", GREEN)]:
        Image.new("RGB", (40, 40), color).save(tmp_path / name)
    c = load_concept(tmp_path, "sks", "dog", R)
    assert [p.name for p in c.paths] == ["a.jpeg", "b.PNG", "c.BMP"]
    assert close(c.images[0].getpixel((0, 0)), RED) and c.images[2].getpixel((0, 0)) == GREEN
    assert ".bmp" in IMAGE_EXTENSIONS


def test_exact_copies_in_a_concept_folder_train_once_and_are_named(tmp_path):
    """Two files with the same bytes (photo.jpg and 'photo (1).jpg', a second download) trained that photo twice,
    silently weighting it double: the shortest name is kept ('photo.jpg', not 'photo (1).jpg', which sorts before
    it), and one warning names each copy and its original.
    The same picture saved as a PNG decodes to other pixels than the JPEG (its loss): another file, kept."""
    Image.new("RGB", (40, 40), RED).save(tmp_path / "photo.jpg")
    for name in ("photo (1).jpg", "photo (2).jpg"):
        (tmp_path / name).write_bytes((tmp_path / "photo.jpg").read_bytes())
    Image.new("RGB", (40, 40), RED).save(tmp_path / "red.png")
    Image.new("RGB", (40, 40), BLUE).save(tmp_path / "blue.png")
    with pytest.warns(UserWarning) as caught:
        c = load_concept(tmp_path, "sks", "dog", R)
    assert [p.name for p in c.paths] == ["blue.png", "photo.jpg", "red.png"] and len(c) == 3
    assert c.images[0].getpixel((2, 2)) == BLUE and close(c.images[1].getpixel((2, 2)), RED)
    assert c.tensors().shape == (3, 3, R, R)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert ("leaving out 'photo (1).jpg' (same bytes as 'photo.jpg'), 'photo (2).jpg' (same bytes as "
            "'photo.jpg'). Delete the copies from the folder") in messages[0]


def test_the_same_picture_saved_again_in_other_bytes_trains_once_and_is_named(tmp_path):
    """A picture saved twice with other settings (another PNG compression, added metadata, BMP) has other bytes but
    decodes to the same pixels: it trained twice, weighting it double, as exact copies did. It is left out as they
    are (the shortest name kept), one warning naming each copy, its original and what they share."""
    from PIL import PngImagePlugin

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    picture.save(tmp_path / "dog.png", compress_level=9)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "exported again")
    picture.save(tmp_path / "dog copy.png", compress_level=1, pnginfo=info)
    picture.save(tmp_path / "dog-export.bmp")
    (tmp_path / "dog (1).png").write_bytes((tmp_path / "dog.png").read_bytes())
    Image.new("RGB", (40, 40), BLUE).save(tmp_path / "blue.png")
    assert len({(tmp_path / name).read_bytes() for name in ("dog.png", "dog copy.png", "dog-export.bmp")}) == 3
    with pytest.warns(UserWarning) as caught:
        c = load_concept(tmp_path, "sks", "dog", R)
    assert [p.name for p in c.paths] == ["blue.png", "dog.png"] and c.tensors().shape == (2, 3, R, R)
    assert c.images[1].tobytes() == load_image(tmp_path / "dog.png", R).tobytes()
    assert [(copy.name, kept.name) for copy, kept in c.left_out] == [
        ("dog (1).png", "dog.png"), ("dog copy.png", "dog.png"), ("dog-export.bmp", "dog.png")]
    messages = [str(w.message) for w in caught if "copies" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert ("holds exact copies of images; training on each image once, leaving out 'dog (1).png' (same bytes as "
            "'dog.png'), 'dog copy.png' (same pixels as 'dog.png'), 'dog-export.bmp' (same pixels as 'dog.png'). "
            "Delete the copies from the folder to silence this.") in messages[0]


def test_a_byte_copy_of_a_file_left_out_as_a_pixel_copy_names_the_file_that_trains(tmp_path):
    """'photo (1).png' has photo.png's bytes; photo.png has p.bmp's pixels, and p.bmp (the shorter name) trains. The
    warning said "'photo (1).png' (same bytes as 'photo.png')", naming a file that was left out itself."""
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    picture.save(tmp_path / "photo.png")
    (tmp_path / "photo (1).png").write_bytes((tmp_path / "photo.png").read_bytes())
    picture.save(tmp_path / "p.bmp")
    for i, color in enumerate((BLUE, (200, 30, 30))):
        Image.new("RGB", (40, 40), color).save(tmp_path / f"plain{i}.png")
    with pytest.warns(UserWarning) as caught:
        c = load_concept(tmp_path, "sks", "dog", R)
    assert [p.name for p in c.paths] == ["p.bmp", "plain0.png", "plain1.png"]
    assert [(copy.name, kept.name) for copy, kept in c.left_out] == [("photo (1).png", "p.bmp"),
                                                                     ("photo.png", "p.bmp")]
    message = next(str(w.message) for w in caught if "copies" in str(w.message))
    assert "leaving out 'photo (1).png' (same pixels as 'p.bmp'), 'photo.png' (same pixels as 'p.bmp')." in message


def test_too_few_images_warns(tmp_path):
    make_folder(tmp_path, n=2)
    with pytest.warns(UserWarning, match="has 2 usable image.*3-15"):
        load_concept(tmp_path, "sks", "dog", R)


# --- Concept ----------------------------------------------------------------------------------


def test_tensors_shape_range_and_flip(tmp_path):
    halves((0, 0, 0), WHITE, (40, 40)).save(tmp_path / "00.png")
    img = load_image(tmp_path / "00.png", R)
    c = Concept([img] * 3, "sks", "dog", [tmp_path / "00.png"] * 3)
    x = c.tensors()
    assert x.shape == (3, 3, R, R) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert x[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert torch.equal(c.tensors(flip=True), x.flip(-1))
    assert c.tensors(flip=True)[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert c.prompt == "a photo of a sks dog"


def test_save_then_load_round_trip(tmp_path):
    src = make_folder(tmp_path / "src", n=3)
    c = load_concept(src, "sks", "teddy bear", R, prompt_template="a {token} {class_word} toy")
    out = c.save(tmp_path / "prepared")
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "02.png", "concept.json"]
    meta = json.loads((out / "concept.json").read_text())
    assert meta["token"] == "sks" and meta["sources"][0].endswith("00.png")
    back = load_concept(out, None, None, R)
    assert (back.token, back.class_word) == ("sks", "teddy bear")
    assert back.prompt == "a sks teddy bear toy"
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(c.images, back.images))
    c.save(out)  # saving again over our own files is fine
    (out / "99.jpg").write_bytes(b"x")
    with pytest.raises(ConceptDataError, match=r"already holds other images \(99\.jpg\)"):
        c.save(out)


# --- DreamBooth layout ------------------------------------------------------------------------

PROMPTS_FILE = """Classes

subject_name,class
backpack,backpack
dog,dog
cat2,cat

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on top of pink fabric'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]
"""


@pytest.fixture
def dreambooth_root(tmp_path) -> Path:
    (tmp_path / "prompts_and_classes.txt").write_text(PROMPTS_FILE)
    make_folder(tmp_path / "backpack")
    make_folder(tmp_path / "dog")
    return tmp_path


def test_dreambooth_parsing(dreambooth_root):
    ds = load_dreambooth(dreambooth_root)
    assert sorted(ds.subjects) == ["backpack", "dog"]  # cat2 is listed but has no folder
    assert ds.subjects["dog"].is_live and not ds.subjects["backpack"].is_live
    assert ds.object_prompts[1] == "a {0} {1} on top of pink fabric"
    assert len(ds.object_prompts) == len(ds.live_prompts) == 3
    assert ds.prompts("dog")[:2] == ["a sks dog in the jungle", "a sks dog wearing a red hat"]
    assert ds.prompts("backpack", token="zwx")[1] == "a zwx backpack on top of pink fabric"
    c = ds.concept("dog", resolution=R)
    assert len(c) == 3 and c.prompt == "a photo of a sks dog"


def test_dreambooth_missing_pieces(dreambooth_root, tmp_path_factory):
    ds = load_dreambooth(dreambooth_root)
    with pytest.raises(ConceptDataError, match=r"'cat2' is listed .* folder '.*cat2' is missing"):
        ds.concept("cat2")
    with pytest.raises(ConceptDataError, match=r"unknown DreamBooth subject 'robot'"):
        ds.prompts("robot")
    empty = tmp_path_factory.mktemp("nothing")
    with pytest.raises(ConceptDataError, match=r"'.*prompts_and_classes\.txt' not found"):
        load_dreambooth(empty)


def test_huge_phone_photo_is_decoded_small_enough_for_its_crop(tmp_path, monkeypatch):
    Image.new("RGB", (1200, 900), (200, 30, 30)).save(tmp_path / "phone.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600_000)  # stands for the 89-megapixel bomb warning
    opened = _decoded_sizes(monkeypatch)
    out = load_image(tmp_path / "phone.jpg", 50)  # max_side 8192 would not reduce it at all
    assert opened[0] == (300, 225) and out.size == (50, 50)  # 1/4: the short side keeps 4x the crop's 50
    assert out.getpixel((25, 25))[0] > 180
    Image.new("RGB", (4000, 3), (0, 0, 0)).save(tmp_path / "strip.jpg")
    with pytest.warns(UserWarning, match="upscaling"):  # 100 x 1 after the reduction: no division by zero
        assert load_image(tmp_path / "strip.jpg", 8, max_side=100).size == (8, 8)


def test_concept_save_writes_each_file_whole(tmp_path, monkeypatch):
    images = [Image.new("RGB", (8, 8), (i * 80, 10, 10)) for i in range(3)]
    concept = Concept(images, "sks", "dog", [])
    concept.save(tmp_path / "c")
    good = (tmp_path / "c" / "01.png").read_bytes()
    real_save, calls = Image.Image.save, []

    def crash(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second image: half written, then the disk is full
            Path(fp).write_bytes(b"half a png")
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        Concept([im.rotate(90) for im in images], "sks", "dog", []).save(tmp_path / "c")
    assert (tmp_path / "c" / "01.png").read_bytes() == good  # the old file survived whole
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["00.png", "01.png", "02.png", "concept.json"]


def test_a_jpeg_past_pillows_hard_limit_is_read_at_a_reduced_scale(tmp_path, monkeypatch):
    """A 200-megapixel phone JPEG (past twice Pillow's limit) was refused with advice a CLI user cannot follow,
    although a reduced-scale decode reads it in a fraction of a second; a PNG that large still is refused."""
    Image.new("RGB", (2000, 1600), (10, 200, 30)).save(tmp_path / "phone.jpg", quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 3.2 MP: past twice the limit
    opened = _decoded_sizes(monkeypatch)
    out = load_image(tmp_path / "phone.jpg", 64)
    assert out.size == (64, 64) and close(out.getpixel((32, 32)), (10, 200, 30), tol=8)
    assert opened[0] == (500, 400) and Image.MAX_IMAGE_PIXELS == 100_000  # 1/4 scale; the limit is back
    with pytest.raises(ConceptDataError, match="decompression bomb"):
        load_image(tmp_path / "phone.jpg", 512)  # a crop of 512 needs 2048 px a side: no reduction fits


def test_a_broken_link_is_named_not_passed_over_and_more_pillow_formats_count(tmp_path):
    """A dangling symlink to an image was counted as a non-image and training went on without it; .jfif (what
    browsers save) and other formats Pillow opens were refused as non-images; .h5 beside the photos is not one."""
    make_folder(tmp_path)
    (tmp_path / "3.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(ConceptDataError, match=r"3\.png': no such file \(a broken link\)"):
        load_concept(tmp_path, "sks", "dog", R)
    (tmp_path / "3.png").unlink()
    Image.new("RGB", (40, 40), RED).save(tmp_path / "4.jfif", format="JPEG")
    (tmp_path / "data.h5").write_bytes(b"\x89HDF")
    (tmp_path / "IMG_1.HEIC").write_bytes(b"\0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        concept = load_concept(tmp_path, "sks", "dog", R)
    assert [p.name for p in concept.paths][-1] == "4.jfif" and len(concept) == 4
    message = str(caught[0].message)
    assert "IMG_1.HEIC, data.h5" in message and "IMG_1.HEIC need pillow-heif" in message


def test_a_symlink_loop_is_named_as_one_and_a_dangling_link_stays_a_broken_link(tmp_path):
    """A link to itself, or two links to each other, was reported as "a broken link", which sends one looking for a
    missing file. A loop is an error as a broken link is, and skipped with a note under skip_bad as one is."""
    folder = make_folder(tmp_path / "self")
    os.symlink("self.png", folder / "self.png")
    with pytest.raises(ConceptDataError, match=r"self\.png': a symlink loop \('self\.png' -> 'self\.png'"):
        load_concept(folder, "sks", "dog", R)
    folder = make_folder(tmp_path / "dangling")
    os.symlink(folder / "missing.png", folder / "gone.png")
    with pytest.raises(ConceptDataError, match=r"gone\.png': no such file \(a broken link\)"):
        load_concept(folder, "sks", "dog", R)
    folder = make_folder(tmp_path / "pair")
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        concept = load_concept(folder, "sks", "dog", R, skip_bad=True)
    assert sorted(p.name for p in concept.paths) == ["00.png", "01.png", "02.png"]
    skipped = sorted(str(w.message) for w in caught if "skipping" in str(w.message))
    assert len(skipped) == 2 and "a.png': a symlink loop ('a.png' -> 'b.png'" in skipped[0]
    assert "b.png': a symlink loop ('b.png' -> 'a.png'" in skipped[1] and "broken" not in "".join(skipped)

def test_sixteen_bit_grey_transparency_is_white_as_in_eight_bit(tmp_path):
    grey = np.full((32, 32), 30000, np.uint16)
    grey[:, 16:] = 5  # the transparent level
    Image.fromarray(grey).save(tmp_path / "g16.png", transparency=5)
    eight = Image.fromarray(np.where(grey == 5, 0, 117).astype(np.uint8), "L")
    eight.save(tmp_path / "g8.png", transparency=0)
    for name in ("g16.png", "g8.png"):
        out = load_image(tmp_path / name, R)
        assert out.getpixel((28, 16)) == (255, 255, 255) and close(out.getpixel((4, 16)), (117, 117, 117), 2), name


def test_other_crops_of_the_same_files_are_another_run_for_a_checkpoint(tmp_path):
    """The checkpoint stamp hashed the files, not how they were cut: a run on whole-image crops resumed one made
    on centre crops. A default load stamps as before (interrupted runs stay resumable across the update)."""
    from prkit.checkpoints import _images_digest

    for i in range(3):
        halves(RED, (0, 0, 255 - 40 * i), (80, 40)).save(tmp_path / f"{i}.png")  # three photos, not copies
    centre = load_concept(tmp_path, "sks", "dog", R)
    whole = load_concept(tmp_path, "sks", "dog", config=DataConfig(resolution=R, center_crop=False))
    assert centre.crop == "" and whole.crop == "center_crop=False max_side=8192"
    assert _images_digest(centre) != _images_digest(whole)
    assert _images_digest(centre) == _images_digest(Concept(centre.images, "sks", "dog", centre.paths))


def test_heic_photos_are_read_once_pillow_heif_is_installed(tmp_path, monkeypatch):
    """The error said HEIC photos need pillow-heif (pip install it, then register_heif_opener()), but .heic was never
    an image extension: with the plugin installed and registered they were still ignored as non-images. Installed,
    it is now registered where a HEIC file is met (the command line cannot call register_heif_opener())."""
    import sys
    import types

    make_folder(tmp_path)
    Image.new("RGB", (40, 40), RED).save(tmp_path / "IMG_9.HEIC", format="PNG")  # Pillow opens by content
    registered = []

    def register_heif_opener():  # what pillow-heif's does: an opener for .heic/.heif (here: the PNG one)
        registered.append(True)
        monkeypatch.setitem(Image.EXTENSION, ".heic", "PNG")
        monkeypatch.setitem(Image.EXTENSION, ".heif", "PNG")

    monkeypatch.setitem(sys.modules, "pillow_heif", types.SimpleNamespace(register_heif_opener=register_heif_opener))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "ignoring 1 file(s) ... that are not images"
        concept = load_concept(tmp_path, "sks", "dog", R)
    assert registered and len(concept) == 4 and concept.paths[-1].name == "IMG_9.HEIC"
    assert concept.images[-1].getpixel((16, 16)) == RED


def test_save_refuses_to_overwrite_images_no_earlier_save_wrote(tmp_path):
    """Saving a concept into the folder it was loaded from overwrote the user's photos (00.png, ...) with the crops;
    images of those names that no earlier save wrote (no concept.json) are now kept and the save refused."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (120, 90), (60 * i, 80, 160)).save(src / f"{i:02d}.png")
    before = [(src / f"{i:02d}.png").read_bytes() for i in range(3)]
    c = load_concept(src, "sks", "dog", R)
    with pytest.raises(ConceptDataError, match=r"00\.png, 01\.png, 02\.png.*own source photos.*empty folder"):
        c.save(src)
    assert [(src / f"{i:02d}.png").read_bytes() for i in range(3)] == before and not (src / "concept.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "01.png")
    with pytest.raises(ConceptDataError, match=r"01\.png, which no earlier save wrote"):
        c.save(other)
    out = c.save(tmp_path / "prepared")
    load_concept(out, None, None, R).save(out)  # an earlier save's crops: written again


def test_an_unreadable_concept_json_does_not_block_words_given_explicitly(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "concept.json").write_text("{bad")
    with pytest.raises(ConceptDataError, match=r"cannot read .*concept\.json.*pass token and class_word"):
        load_concept(folder, None, None, R)
    with pytest.warns(UserWarning, match=r"cannot read .*concept\.json.*default prompt template"):
        c = load_concept(folder, "sks", "dog", R)
    assert c.prompt == "a photo of a sks dog" and len(c.images) == 3


@pytest.mark.parametrize("template, where", [
    ("a photo of {{token}} {class_word}", "argument"),  # a literal "{token}": no identifier in the prompt
    ("a {token} {class_word.upper}", "argument"),
    ("a {token!r} {class_word}", "argument"),
    ("a {token:>10} {class_word}", "argument"),
    (5, "concept.json"),
    (["a {token}"], "concept.json"),
])
def test_prompt_templates_are_plain_fields_and_strings(tmp_path, template, where):
    """A number in concept.json raised a bare TypeError, "{{token}}" trained on the literal text '{token}', and
    attribute access raised a bare AttributeError; each now names prompt_template (and the file it came from)."""
    folder = make_folder(tmp_path)
    if where == "argument":
        with pytest.raises(ConceptDataError, match="prompt_template"):
            load_concept(folder, "sks", "dog", R, prompt_template=template)
    else:
        (folder / "concept.json").write_text(json.dumps({"token": "sks", "class_word": "dog",
                                                         "prompt_template": template}))
        with pytest.raises(ConceptDataError, match=r"concept\.json.*prompt_template must be a string"):
            load_concept(folder, None, None, R)


@pytest.mark.parametrize("field, value", [("max_side", 0), ("max_side", -1), ("max_side", None), ("max_side", "8192"),
                                          ("max_side", True), ("resolution", True)])
def test_sizes_given_wrongly_are_named(tmp_path, field, value):
    """max_side=0 raised ZeroDivisionError, None or '8192' a TypeError, and load_image(path, True) returned a 1x1
    image; each is now refused naming the argument."""
    folder = make_folder(tmp_path)
    with pytest.raises(ConceptDataError, match=f"{field} must be a positive int"):
        load_image(folder / "00.png", **{"resolution": R, field: value})
    if field == "max_side":
        with pytest.raises(ConceptDataError, match="max_side must be a positive int"):
            load_concept(folder, "sks", "dog", config=DataConfig(resolution=R, max_side=value))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_a_wide_panorama_is_not_shrunk_below_the_crop(tmp_path, fmt):
    """A 4000x400 panorama with max_side=2000 was halved by its long side first, so its 400 px square came out
    200 px and was upscaled (with a warning to use larger originals); the reduction now stops at the crop's side."""
    img = halves((200, 30, 30), (30, 30, 200), (4000, 400))
    img.save(tmp_path / f"pano.{fmt}", quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "upscaling it" warning
        out = load_image(tmp_path / f"pano.{fmt}", 300, max_side=2000)
    assert out.size == (300, 300)
    tall = load_image(tmp_path / f"pano.{fmt}", 64, max_side=2000)  # room to reduce: still reduced, still square
    assert tall.size == (64, 64)


def test_an_image_that_cannot_be_asked_about_is_named_and_skippable(tmp_path, monkeypatch):
    """A link into a folder this user may not search made Path.is_dir() raise PermissionError: load_concept failed
    with it even under skip_bad=True, and load_image with a bare traceback. A FIFO named like an image was reported
    as "no such file"."""
    folder = make_folder(tmp_path / "c")
    locked = folder / "09.png"
    locked.write_bytes(b"")
    real_is_dir, real_is_file = Path.is_dir, Path.is_file

    def denied(method):
        def ask(self, *args, **kwargs):
            if self.name == "09.png":
                raise PermissionError(13, "Permission denied", str(self))
            return method(self, *args, **kwargs)
        return ask
    monkeypatch.setattr(Path, "is_dir", denied(real_is_dir))
    monkeypatch.setattr(Path, "is_file", denied(real_is_file))
    with pytest.raises(ConceptDataError, match=r"09\.png.*permission denied.*make it and its folder readable"):
        load_concept(folder, "sks", "dog", R)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*09\.png"):
        assert len(load_concept(folder, "sks", "dog", R, skip_bad=True).images) == 3
    monkeypatch.undo()
    locked.unlink()
    os.mkfifo(folder / "pipe.png")
    with pytest.raises(ConceptDataError, match=r"pipe\.png.*not a regular file"):
        load_image(folder / "pipe.png", R)


def test_a_dreambooth_list_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "prompts_and_classes.txt").write_bytes(b"subject_name,class\ndog,dog\n\xff\xfe\n")
    with pytest.raises(ConceptDataError, match=r"prompts_and_classes\.txt': not UTF-8 text .* at byte"):
        load_dreambooth(tmp_path)


def test_a_16_bit_image_is_converted_without_float64_copies(tmp_path):
    """16-bit and float images went through several float64 copies (~27 bytes a pixel: 3.9 GB for a 144 MP scan);
    one float32 working copy, changed in place, keeps the conversion under ~10 bytes a pixel."""
    import tracemalloc

    from prkit.images import _to_rgb

    side = 1000
    grey = Image.fromarray((np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side))
    tracemalloc.start()
    try:
        out = _to_rgb(grey)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((side - 1, side - 1))[0] > 0
    assert peak < 10 * side * side, peak / side ** 2


@pytest.mark.parametrize("meta, given, match", [
    ({"token": 123, "class_word": "dog"}, {}, r"token must be a non-empty string, got 123"),
    ({"token": "two words", "class_word": "dog"}, {}, r"token 'two words' contains whitespace"),
    ({"token": "sks", "class_word": "sks dog"}, {}, r"the class word 'sks dog' contains it"),
    ({"token": "sks", "class_word": "dog", "prompt_template": "a {class_word}"}, {}, r"prompt_template 'a "),
    # a word given explicitly meets one read from the file: the file is named too
    ({"class_word": "sks dog"}, {"token": "sks"}, r"the class word 'sks dog' contains it"),
])
def test_bad_words_read_from_concept_json_name_the_file(tmp_path, meta, given, match):
    """Words read from concept.json that fail the checks were refused as if they had been passed ("token must be a
    non-empty string, got 123"), naming neither the file nor how to fix it."""
    folder = make_folder(tmp_path)
    (folder / "concept.json").write_text(json.dumps(meta))
    with pytest.raises(ConceptDataError, match=match) as info:
        load_concept(folder, given.get("token"), given.get("class_word"), R)
    message = str(info.value)
    assert f"read from '{folder / 'concept.json'}'" in message and "fix or delete it there" in message
    with pytest.raises(ConceptDataError) as info:  # words given explicitly: no concept.json to blame
        load_concept(folder, "two words", "dog", R)
    assert "concept.json" not in str(info.value)


def test_images_only_in_a_subfolder_say_to_pass_that_folder(tmp_path):
    """A folder whose photos sit one level down (an unzipped dog.zip: dog/dog/*.jpg) was refused as 'no images ...
    found 1 other file(s) or folder(s) (dog/)', not saying that subfolders are not searched nor which to pass."""
    make_folder(tmp_path / "dog")
    make_folder(tmp_path / "cat")
    (tmp_path / "notes").mkdir()  # a subfolder without images is not suggested
    with pytest.raises(ConceptDataError, match=r"Subfolders are not searched: pass the folder that holds the images") as info:
        load_concept(tmp_path, "sks", "dog", R)
    message = str(info.value)
    assert f"'{tmp_path / 'cat'}'" in message and f"'{tmp_path / 'dog'}'" in message
    assert f"'{tmp_path / 'notes'}'" not in message


def test_a_tiff_pillow_cannot_decode_is_named_as_one_with_what_to_do(tmp_path):
    """A floating-point RGB TIFF (an HDR or raw export) is a TIFF Pillow has no mode for: it was refused as 'cannot
    identify image file', advice to remove it, as if it were no image at all."""
    import struct

    h = w = 8
    data = np.full((h, w, 3), 0.5, "<f4").tobytes()
    bps, fmt = struct.pack("<3H", 32, 32, 32), struct.pack("<3H", 3, 3, 3)  # 32 bits, IEEE float, per channel
    data_at, ifd_at = 8 + 12, 8 + 12 + len(data)
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, 8), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, data_at),
            (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1), (339, 3, 3, 14)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0)
    path = tmp_path / "hdr.tif"
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_at) + bps + fmt + data + ifd)
    with pytest.raises(ConceptDataError, match=r"hdr\.tif.*a TIFF whose pixel format Pillow cannot decode .*"
                                               r"convert it to an 8- or 16-bit"):
        load_image(path, R)
    with pytest.raises(ConceptDataError, match=r"hdr\.tif.*a TIFF whose pixel format"):
        load_concept(tmp_path, "sks", "dog", R)


@pytest.mark.parametrize("token, match", [(None, "token is required"), ("", "token must be a non-empty string"),
                                          ("two words", "token 'two words' contains whitespace"),
                                          ("dog", "token and class_word are both 'dog'")])
def test_dreambooth_prompts_refuse_a_token_that_the_concept_would_refuse(dreambooth_root, token, match):
    """DreamBoothDataset.prompts formatted any token: token=None gave 'a None dog in the jungle', '' gave 'a  dog in
    the jungle', while the subject's concept (load_concept) refused the same token only when its images loaded."""
    ds = load_dreambooth(dreambooth_root)
    with pytest.raises(ConceptDataError, match=match):
        ds.prompts("dog", token=token)


def test_a_word_passed_and_refused_does_not_blame_the_words_read_from_concept_json(tmp_path):
    """`prkit train --token ''` with the class word in concept.json said '(class_word read from ...concept.json:
    fix or delete it there ...)', pointing at a file that holds nothing wrong."""
    import json

    from PIL import Image

    from prkit.data import ConceptDataError, load_concept

    folder = tmp_path / "dog"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"{i}.png")
    (folder / "concept.json").write_text(json.dumps({"class_word": "dog"}))
    with pytest.raises(ConceptDataError) as refused:
        load_concept(folder, token="")
    assert "token must be a non-empty string" in str(refused.value) and "concept.json" not in str(refused.value)
    with pytest.raises(ConceptDataError, match=r"class_word read from .*concept.json"):
        load_concept(folder, token="dog")  # the token meets the class word read from the file: named


@pytest.mark.parametrize("token,class_word,template", [
    ("<sks>", "dog", "a photo of {token} {class_word}, sks style"),
    ("sks!", "sks dog", None),
    ("photo", "dog", "a sks photo of {token} {class_word}"),
])
def test_a_token_refused_for_another_word_is_not_told_to_use_a_word_the_prompt_holds(tmp_path, token, class_word,
                                                                                      template):
    """The refusal suggested 'a rare identifier such as 'sks'' unless the token was 'sks' itself: for '<sks>' or 'sks!',
    refused because the prompt holds 'sks', that suggestion is refused the same way."""
    make_folder(tmp_path)
    with pytest.raises(ConceptDataError) as err:
        load_concept(tmp_path, token, class_word, R, prompt_template=template)
    assert "Choose another token (a rare identifier), or " in str(err.value)
    with pytest.raises(ConceptDataError) as err:
        load_concept(tmp_path, "sks", class_word, R, prompt_template=template)  # what it suggested
    assert "is also another word of the training prompt" in str(err.value)
