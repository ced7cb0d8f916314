"""Tests of the world renderer, captions, tokenizer and shipped concept folders."""

import json
import re

import numpy as np
import pytest

from prkit.world.concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS, concept_folder, render_concept
from prkit.world.render import Obj, Scene, caption, render, sample_scene
from prkit.world.vocab import BACKGROUNDS, CLASSES, COLORS, IDENTIFIERS, PATTERNS, PLAIN, SCENES, world_words


def test_render_is_deterministic_from_seed():
    scene = sample_scene(np.random.default_rng(0), n_objects=2, patterns=True)
    a, ma = render(scene, seed=3)
    b, mb = render(scene, seed=3)
    c, _ = render(scene, seed=4)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and ma.shape == (2, 64, 64) and ma.dtype == bool
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)


def test_sample_scene_is_deterministic_and_ordered():
    s1 = sample_scene(np.random.default_rng(5), n_objects=2)
    s2 = sample_scene(np.random.default_rng(5), n_objects=2)
    assert s1 == s2 and s1.objects[0].x < s1.objects[1].x


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_masks_cover_drawn_pixels(background):
    rng = np.random.default_rng(1)
    for seed in range(6):
        scene = sample_scene(rng, n_objects=1 + seed % 2, patterns=seed % 3 == 0, background=background)
        img, masks = render(scene, seed=seed)
        bg, _ = render(Scene(background, []), seed=seed)
        diff = np.abs(img.astype(int) - bg.astype(int)).max(-1)
        for m in masks:
            assert m.sum() > 50
            assert (diff[m] > 12).mean() > 0.9  # visible on every background (AA edges excepted)
        outside = ~masks.any(0)
        assert (diff[outside] > 12).mean() < 0.05
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any()


def test_every_class_color_pattern_renders():
    for i, cls in enumerate(CLASSES):
        for j, pattern in enumerate((None, *PATTERNS)):
            color, color2 = list(COLORS)[(i + j) % 8], list(COLORS)[(i + j + 3) % 8]
            img, masks = render(Scene(PLAIN, [Obj(cls, color, 32, 32, 9.0, pattern, color2)]))
            assert masks[0].sum() > 100
            if pattern is not None:  # both colours appear
                pix = img[masks[0]].astype(float)
                for c in (color, color2):
                    assert (np.linalg.norm(pix - COLORS[c], axis=1) < 60).sum() >= 4, (cls, pattern, c)


def test_captions():
    scene = Scene("grass", [Obj("box", "blue", 50, 30, 9), Obj("ball", "red", 12, 30, 9)])
    assert caption(scene) == "a photo of a red ball next to a blue box on the grass"
    assert caption(Scene(PLAIN, [Obj("ball", "orange", 30, 30, 9)])) == "a photo of an orange ball"
    single = Scene("grass", [Obj("ball", "red", 30, 30, 9, "stripes", "white")])
    assert caption(single, identifier="sks") == "a photo of a sks ball on the grass"
    rng = np.random.default_rng(0)
    words = set(world_words())
    for _ in range(300):
        text = caption(sample_scene(rng, patterns=True), rng)
        assert set(text.split()) <= words
        assert not set(text.split()) & (set(IDENTIFIERS) | set(PATTERNS))
    patterned = Scene(PLAIN, [Obj("box", "orange", 30, 30, 9, "dots", "blue")])
    assert caption(patterned) == "a photo of an orange and blue dotted box"


def test_captions_drop_colors():
    from prkit.world.vocab import COLOR_NAMES

    two = Scene(PLAIN, [Obj("box", "orange", 20, 30, 9, "dots", "blue"), Obj("ball", "red", 50, 30, 9)])
    assert caption(two, np.random.default_rng(0), drop_colors=1.0).endswith("a dotted box next to a ball")
    # off (the default), captions and the generator's later draws are exactly those of run 3
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [caption(two, a) for _ in range(20)] == [caption(two, b, drop_colors=0.0) for _ in range(20)]
    assert a.random() == b.random()
    rng = np.random.default_rng(1)
    texts = [caption(sample_scene(rng, n_objects=1), rng, drop_colors=0.3) for _ in range(400)]
    colorless = sum(not set(t.split()) & set(COLOR_NAMES) for t in texts) / len(texts)
    assert 0.22 < colorless < 0.38  # about 30% of single objects lose their colour words


def test_tokenizer_single_tokens():
    transformers = pytest.importorskip("transformers")
    from prkit.world.build_tokenizer import TOKENIZER_DIR

    tok = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert tok.model_max_length == 32 and tok.pad_token == "<|endoftext|>"
    for word in world_words():
        assert len(tok(word).input_ids) == 3, word
    rng = np.random.default_rng(0)
    for i in range(50):
        text = caption(sample_scene(rng), rng, identifier=IDENTIFIERS[i % 5] if i % 2 else None)
        assert len(tok(text).input_ids) == len(text.split()) + 2
    assert len(tok("a xylophone?").input_ids) > 3  # unknown words fall back to pieces


def test_concept_folders_and_prompts():
    assert len(EXAMPLE_CONCEPTS) >= 4 and len({c.class_word for c in EXAMPLE_CONCEPTS.values()}) >= 4
    for name, concept in EXAMPLE_CONCEPTS.items():
        folder = concept_folder(name)
        assert len(sorted(folder.glob("*.png"))) == 5
        meta = json.loads((folder / "concept.json").read_text())
        assert meta["token"] == concept.token and meta["class_word"] == concept.class_word
        assert concept.token in IDENTIFIERS and concept.pattern in PATTERNS
    assert render_concept(EXAMPLE_CONCEPTS["striped_ball"], 2)[0].size == (64, 64)
    assert len(BENCH_PROMPTS) == len(SCENES) + 1
    assert all("{token} {class_word}" in p for p in BENCH_PROMPTS)


def test_the_notebooks_grade_and_ablate_the_runs_own_concept(tmp_path, caplog):
    """06 graded the images of a run made on dotted_box (01's concept_folder) against striped_ball's answer key, 05
    ablated striped_ball whatever the run's concept, and 04 trained dotted_box twice as its second concept."""
    from prkit.world.concepts import another_concept, concept_named, run_concept

    assert concept_named("", "zwx", "box") == "dotted_box" and concept_named("dotted_box", "zwx", "box") == "dotted_box"
    with pytest.raises(ValueError, match="concept_name='striped_ball' is 'sks ball', but the residuals are 'zwx box'"):
        concept_named("striped_ball", "zwx", "box")
    with pytest.raises(ValueError, match="'sks dog' is none of the world's shipped concepts.*prkit eval"):
        concept_named("", "sks", "dog")
    with pytest.raises(ValueError, match="'ball' is not a shipped world concept; these are: striped_ball"):
        concept_named("ball")
    assert run_concept(tmp_path) == "striped_ball"  # no run yet: the default
    (tmp_path / "concept").mkdir()
    (tmp_path / "concept" / "concept.json").write_text(json.dumps({"token": "qrv", "class_word": "star"}))
    assert run_concept(tmp_path) == "checked_star" and run_concept(tmp_path, "face_heart") == "face_heart"
    assert another_concept("dotted_box", "sks") == "dotted_box"
    assert another_concept("dotted_box", "zwx") == "striped_ball" and "using striped_ball instead" in caplog.text


def test_pattern_scale_stretches_periods_and_defaults_to_the_shipped_world():
    import importlib

    R = importlib.import_module("prkit.world.render")  # the module (prkit.world.render is also a function)

    assert R.PATTERN_SCALE == 1.0  # the shipped world (PRKIT_WORLD_PATTERN_SCALE unset)
    u, v = np.meshgrid(np.linspace(-12, 12, 49), np.linspace(-12, 12, 49))
    for pattern in ("stripes", "dots", "checks"):
        one = R._sd_pattern(pattern, "box", u, v, 10.0)
        assert np.array_equal(one, R._sd_pattern(pattern, "box", u, v, 10.0, scale=1.0))
        two = R._sd_pattern(pattern, "box", 2 * u, 2 * v, 20.0, scale=2.0)
        assert np.allclose(two, 2 * one)  # the same pattern, twice as large
    face = R._sd_pattern("face", "heart", u, v, 10.0)
    assert np.array_equal(face, R._sd_pattern("face", "heart", u, v, 10.0, scale=2.0))  # faces follow the object


def test_captions_drop_attributes():
    """drop_attributes names an object by its class alone; patterned objects can have their own chance; zero
    chances draw nothing from rng, so earlier recipes' captions are unchanged."""
    two = Scene(PLAIN, [Obj("ball", "red", 20, 30, 9), Obj("box", "blue", 44, 30, 9, "dots", "yellow")])
    assert caption(two, np.random.default_rng(0), drop_attributes=1.0).endswith("a ball next to a box")
    assert caption(two, np.random.default_rng(0), drop_attributes=1.0, drop_attributes_patterned=0.0).endswith(
        "a ball next to a blue and yellow dotted box")
    assert caption(two, np.random.default_rng(0), identifier="sks", drop_attributes=1.0).endswith(
        "a ball next to a sks box")
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [caption(two, a) for _ in range(20)] == [caption(two, b, drop_attributes=0.0) for _ in range(20)]
    assert a.random() == b.random()
    rng = np.random.default_rng(1)
    bare = plain = 0
    for _ in range(2000):
        obj = Obj("ball", "red", 32, 32, 9, *(("dots", "yellow") if rng.random() < 0.5 else ()))
        text = caption(Scene(PLAIN, [obj]), rng, drop_attributes=0.3, drop_attributes_patterned=0.2)
        if text.split()[-2:] == ["a", "ball"]:
            bare += 1
            plain += obj.pattern is None
    assert 0.2 < bare / 2000 < 0.3 and 0.55 < plain / bare < 0.65  # 'a ball': 60% plain, 40% patterned


@pytest.mark.parametrize("scene, word", [
    (Scene("desert", []), "background 'desert'"),
    (Scene("grass", [Obj("cube", "red", 30, 30, 8)]), "class 'cube'"),
    (Scene("grass", [Obj("ball", "pink", 30, 30, 8)]), "colour 'pink'"),
    (Scene("grass", [Obj("ball", "red", 30, 30, 8, "zigzag", "white")]), "pattern 'zigzag'"),
])
def test_render_and_caption_name_what_the_world_lacks(scene, word):
    for call in (lambda: render(scene), lambda: caption(scene)):
        with pytest.raises(ValueError, match=word):
            call()
    with pytest.raises(ValueError, match="background 'desert'"):
        sample_scene(np.random.default_rng(0), background="desert")


def test_captions_say_what_render_draws():
    ball = Obj("ball", "red", 30, 30, 8, "stripes")  # no second colour: render draws white
    assert caption(Scene("grass", [ball])) == "a photo of a red and white striped ball on the grass"
    with pytest.raises(ValueError, match="at least one object"):
        caption(Scene("grass", []))


def test_concepts_command_writes_where_asked_and_nothing_on_help(tmp_path, monkeypatch):
    from prkit.world import concepts as C

    shipped = {p: p.stat().st_mtime_ns for p in concept_folder("striped_ball").glob("*.png")}
    with pytest.raises(SystemExit):
        C.main(["--help"])
    assert {p: p.stat().st_mtime_ns for p in concept_folder("striped_ball").glob("*.png")} == shipped
    assert C.main(["--out", str(tmp_path), "--concepts", "dotted_box", "--n", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "dotted_box").glob("*.png")) == ["00.png", "01.png", "02.png"]
    C.main(["--out", str(tmp_path), "--concepts", "dotted_box", "--n", "2"])  # fewer: the third one goes
    assert sorted(p.name for p in (tmp_path / "dotted_box").glob("*.png")) == ["00.png", "01.png"]
    with pytest.raises(SystemExit):
        C.main(["--out", str(tmp_path), "--concepts", "dotted-box"])


def test_concepts_command_renders_a_concept_named_twice_once(tmp_path, monkeypatch):
    """--concepts dotted_box striped_ball dotted_box rendered dotted_box twice over its own folder."""
    from prkit.world import concepts as C

    written = []
    monkeypatch.setattr(C, "write_concept_folder", lambda concept, folder, n, seed: written.append(folder) or folder)
    assert C.main(["--out", str(tmp_path), "--concepts", "dotted_box", "striped_ball", "dotted_box"]) == 0
    assert written == [tmp_path / "dotted_box", tmp_path / "striped_ball"]


def test_world_bench_refuses_unknown_concepts_before_training(capsys):
    from prkit.world import bench

    for args in (["--concepts", "striped_ball", "dotted-box"], ["--concepts"]):
        with pytest.raises(SystemExit):
            bench.main(args)
    with pytest.raises(ValueError, match="no rows"):
        bench.write_csv([], "x.csv")


def test_world_bench_checks_out_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """--out was first written after every concept had trained: an existing CSV (the default is the shipped
    benchmarks/world_bench.csv) was replaced silently, and a folder failed with a traceback at the end."""
    from prkit import pipeline
    from prkit.world import bench

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    mine = tmp_path / "mine.csv"
    mine.write_text("concept,method\n")
    (tmp_path / "old_rows.csv").write_text("rows\n")
    for out, said in [(mine, "exists; pass --overwrite"), (tmp_path / "old.csv", "old_rows.csv' exists"),
                      (tmp_path, "is a folder"), (mine / "x.csv", "is a file, not a folder")]:
        with pytest.raises(SystemExit):
            bench.main(["--concepts", "striped_ball", "--out", str(out)])
        assert said in capsys.readouterr().err
    assert mine.read_text() == "concept,method\n" and (tmp_path / "old_rows.csv").read_text() == "rows\n"
    with pytest.raises(pytest.fail.Exception, match="the model loaded"):  # --overwrite: on to the model
        bench.main(["--concepts", "striped_ball", "--out", str(mine), "--overwrite"])


def test_world_bench_runs_a_concept_named_twice_once(tmp_path, monkeypatch, capsys):
    """--concepts striped_ball dotted_box striped_ball trained and graded striped_ball twice (its rows twice in the
    summary's 'all' means)."""
    from types import SimpleNamespace

    from prkit import pipeline
    from prkit.world import bench, oracle

    pipe = SimpleNamespace(set_progress_bar_config=lambda **k: None, unet=SimpleNamespace(device="cpu"))
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pipe)
    monkeypatch.setattr(oracle, "load_oracle", lambda *a, **k: None)
    benched = []
    row = dict(identity=1.0, identity_colors=1.0, scene=1.0, background_change=0.0, train_seconds=1.0, **{"class": 1})
    monkeypatch.setattr(bench, "bench_concept", lambda pipe, name, config, *a, **k: benched.append(name) or [
        {"concept": name, "method": m, **row} for m in bench.METHODS])
    out = tmp_path / "b.csv"
    assert bench.main(["--concepts", "striped_ball", "dotted_box", "striped_ball", "--out", str(out)]) == 0
    assert benched == ["striped_ball", "dotted_box"]
    assert [r.split(",")[:3] for r in out.read_text().splitlines()[1:]][-1] == ["all", "residuals+lag", "2"]


def test_another_concept_names_the_shipped_ones_for_an_unknown_name():
    """04's second_concept="bogus" ended in a raw KeyError: 'bogus', after all the sampling."""
    from prkit.world.concepts import another_concept

    with pytest.raises(ValueError, match="'bogus' is not a shipped world concept; these are: striped_ball, "
                                         "dotted_box, checked_star"):
        another_concept("bogus", "sks")


@pytest.mark.parametrize("kwargs,says", [
    (dict(size=0), "size must be a whole number of pixels >= 8"),  # was numpy's division by zero
    (dict(size=32.0), "size must be a whole number of pixels >= 8 (the world is drawn at 64), got 32.0"),
    (dict(seed=-1), "seed must be a whole number >= 0, got -1"),
])
def test_render_names_a_bad_size_or_seed(kwargs, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        render(Scene("grass", []), **kwargs)
    assert render(Scene("grass", []), seed=np.int64(3), size=np.int64(32))[0].shape == (32, 32, 3)


def test_render_concept_takes_a_shipped_name_and_refuses_no_images():
    from prkit.world.concepts import EXAMPLE_CONCEPTS, render_concept

    by_name = render_concept("striped_ball", 2, seed=1)  # an AttributeError before
    by_concept = render_concept(EXAMPLE_CONCEPTS["striped_ball"], 2, seed=1)
    assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(by_name, by_concept)] == [True, True]
    with pytest.raises(ValueError, match="'bogus' is not a shipped world concept; these are: striped_ball"):
        render_concept("bogus", 1)
    with pytest.raises(ValueError, match="n must be a whole number of images >= 1, got -1"):
        render_concept("striped_ball", -1)  # silently [] before


def test_world_bench_refuses_no_images_or_steps(capsys):
    from prkit.world import bench

    for flag in ("--images-per-prompt", "--steps", "--train-steps"):
        with pytest.raises(SystemExit):
            bench.main([flag, "0"])
        assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err


_PIN_CODE = """
import hashlib
import numpy as np
from prkit.world.render import render, sample_scene
from prkit.world.vocab import BACKGROUNDS
h = hashlib.sha256()
rng = np.random.default_rng(2024)
for i, bg in enumerate(BACKGROUNDS):
    for k in range(3):
        img, m = render(sample_scene(rng, patterns=True, background=bg), seed=i * 10 + k, size=(64, 96, 40)[k])
        h.update(img.tobytes())
        h.update(np.packbits(m).tobytes())
print(h.hexdigest())
"""
_PIN = "63088fe6f2e5f59485ccb510cc21de05139491101e2eda2197d1947a71e55818"  # renders the shipped world was trained on


def test_renders_are_pinned_across_processes_threads_and_the_shipped_references():
    """The shipped model, oracle and concept folders were made from these very pixels: a change to the renderer
    must show here, not as a silently worse world."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    render_module = sys.modules["prkit.world.render"]  # the package re-exports the function under this name

    state = np.random.get_state()
    out = subprocess.run([sys.executable, "-c", _PIN_CODE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _PIN  # a fresh process, every background, three sizes, patterns, masks
    for name, concept in EXAMPLE_CONCEPTS.items():  # the shipped reference PNGs, pixel for pixel
        files = sorted(concept_folder(name).glob("*.png"))
        rendered = render_concept(concept, len(files), seed=0)
        assert [np.array_equal(np.asarray(a), np.asarray(Image.open(f).convert("RGB")))
                for a, f in zip(rendered, files)] == [True] * len(files), name
    scenes = [sample_scene(np.random.default_rng(i), patterns=True, background=bg) for i, bg in enumerate(BACKGROUNDS)]
    serial = [render(s, seed=i) for i, s in enumerate(scenes)]
    render_module._bank.cache_clear()  # threads build the texture banks at the same time
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda a: render(*a), [(s, i) for i, s in enumerate(scenes)]))
    for (a, ma), (b, mb) in zip(serial, threaded):
        assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert all(np.array_equal(x, y) for x, y in zip(state, np.random.get_state()))  # numpy's global RNG untouched


@pytest.mark.parametrize("obj,says", [
    (Obj("ball", "red", 200, 32, 9), "objects[1].x must be a number of pixels in [0, 64]"),  # drew nothing, empty mask
    (Obj("ball", "red", 32, -50, 9), "objects[1].y must be a number of pixels in [0, 64]"),
    (Obj("ball", "red", 32, 32, -5), "objects[1].size must be a number of pixels > 0"),  # drew nothing
    (Obj("ball", "red", 32, 32, 0), "objects[1].size must be a number of pixels > 0"),  # an outline, /0 warnings
    (Obj("ball", "red", 32, 32, float("nan")), "objects[1].size must be a number of pixels > 0"),  # 'cannot
    (Obj("ball", "red", float("inf"), 32, 9), "objects[1].x must be"),                   # convert float NaN ...'
    (Obj("ball", "red", "32", 32, 9), "objects[1].x must be"),  # was "can't multiply sequence by non-int"
])
def test_render_and_caption_refuse_an_object_off_the_canvas_or_of_no_size(obj, says):
    scene = Scene("grass", [Obj("box", "blue", 10, 10, 8), obj])
    for call in (lambda: render(scene), lambda: caption(scene)):
        with pytest.raises(ValueError, match=re.escape(says)):
            call()
    for edge in (Obj("ball", "red", 0, 64, 9), Obj("ball", "red", 64, 0, 0.5)):  # centre on the edge: still drawn
        assert render(Scene("grass", [edge]))[1].sum() > 0


def test_world_bench_lag_value_is_refused_without_the_fixed_threshold(tmp_path, monkeypatch, capsys):
    """--lag-value 0.3 with the default median threshold was accepted and ignored: the rows were median's."""
    from types import SimpleNamespace

    from prkit import pipeline
    from prkit.world import bench, oracle

    out = str(tmp_path / "b.csv")
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    for threshold in ([], ["--lag-threshold", "otsu"]):
        with pytest.raises(SystemExit):
            bench.main(["--lag-value", "0.3", "--out", out, *threshold])
        assert "--lag-value 0.3 is the cut of --lag-threshold fixed" in capsys.readouterr().err
    seen = []
    fake = SimpleNamespace(set_progress_bar_config=lambda **k: None, unet=SimpleNamespace(device="cpu"))
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: fake)
    monkeypatch.setattr(oracle, "load_oracle", lambda *a, **k: None)
    monkeypatch.setattr(bench, "bench_concept", lambda pipe, name, config, *a, **k: seen.append(config.lag) or [])
    monkeypatch.setattr(bench, "write_csv", lambda rows, path: path)
    monkeypatch.setattr(bench, "summarize", lambda rows: [])
    for args, cut in ((["--lag-threshold", "fixed", "--lag-value", "0.3"], ("fixed", 0.3)),
                      (["--lag-threshold", "fixed"], ("fixed", 0.5)), ([], ("median", 0.5))):
        seen.clear()
        assert bench.main(["--concepts", "striped_ball", "--out", out, *args]) == 0
        assert [(c.threshold, c.value) for c in seen] == [cut]


@pytest.mark.parametrize("args,says", [
    (["--learning-rate", "-1"], "--learning-rate: TrainConfig.learning_rate must be a positive number"),
    (["--learning-rate", "nan"], "--learning-rate: TrainConfig.learning_rate must be a positive number"),
    (["--lag-threshold", "fixed", "--lag-value", "2"], "--lag-value: LAGConfig.value must be a number in [0, 1]"),
])
def test_world_bench_checks_rates_and_cuts_before_the_model_loads(tmp_path, monkeypatch, capsys, args, says):
    """A bad --learning-rate or --lag-value was a traceback from TrainConfig/LAGConfig after the model had loaded."""
    from prkit import pipeline
    from prkit.world import bench

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "b.csv"), *args])
    assert says in capsys.readouterr().err


def test_world_bench_background_change_does_not_wrap_the_concept_region_around_the_edges():
    """The concept region was dilated with np.roll: an object at the left edge also hid a 2-pixel strip at the
    right edge (and one at the top the bottom rows), so a change there went unmeasured."""
    from prkit.world.bench import _dilate, grade

    mask = np.zeros((64, 64), bool)
    mask[30:34, 0:3] = True  # an object touching the left edge
    grown = _dilate(mask)
    assert np.array_equal(np.where(grown.any(0))[0], np.arange(0, 5))  # 2 px right of it, none wrapped to 62-63
    assert np.array_equal(np.where(grown.any(1))[0], np.arange(28, 36))
    inner = np.zeros((64, 64), bool)
    inner[10, 20] = True  # away from the edges: the 5x5 square around it, as before
    assert _dilate(inner).sum() == 25 and _dilate(inner)[8:13, 18:23].all()
    image, base = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)
    image[31, 63] = 255  # a change at the right edge, across from the object
    reading = {"background": PLAIN, "objects": [], "mask": mask}
    (row,) = grade([image], [base], [reading], [reading], EXAMPLE_CONCEPTS["striped_ball"],
                   ["a photo of a sks ball"], 1)
    assert row["background_change"] == pytest.approx(1 / (64 * 64 - grown.sum()))


def test_world_bench_grades_the_mirror_image_of_a_striped_concept_as_the_concept(monkeypatch):
    """Residuals train on flipped references (TrainConfig.flip, the METHOD default), so they draw the concept's
    stripes mirrored too; the world draws stripes one way only and the oracle read mirrored ones as another pattern:
    every mirrored striped_ball counted as an identity failure."""
    from types import SimpleNamespace

    from prkit import sample
    from prkit.world import bench

    mirrored = [np.ascontiguousarray(np.asarray(im)[:, ::-1]) for im in render_concept("striped_ball", 3, seed=4)]
    monkeypatch.setattr(sample, "generate", lambda pipe, prompts, *a, **k: list(mirrored))
    residuals = SimpleNamespace(token="sks", class_word="ball", meta={}, num_parameters=lambda: 10)
    config = bench.BenchConfig(images_per_prompt=3)
    rows = bench.grade_residuals(None, residuals, "striped_ball", config, prompts=[BENCH_PROMPTS[-1]])
    assert len(rows) == 9 and all(r["identity"] and r["identity_colors"] for r in rows)
    assert bench.mirrored_readings(mirrored, EXAMPLE_CONCEPTS["dotted_box"]) is None  # dots read alike both ways


@pytest.mark.parametrize("fields, says", [
    (dict(class_word="dog"), "WorldConcept.class_word 'dog' is not in the world; it has ball, box"),  # a KeyError
    (dict(pattern="zigzag"), "WorldConcept.pattern 'zigzag' is not in the world; it has stripes"),
    (dict(colors=("red",)), "WorldConcept.colors must be two of red, orange"),  # 'not enough values to unpack'
    (dict(colors=("red", "crimson")), "got ('red', 'crimson')"),
])
def test_a_world_concept_the_world_cannot_draw_is_refused_naming_the_field(fields, says):
    from prkit.world.concepts import WorldConcept

    words = {**dict(name="mine", token="sks", class_word="ball", pattern="stripes", colors=("red", "white")), **fields}
    with pytest.raises(ValueError, match=re.escape(says)):
        render_concept(WorldConcept(**words), 1)
    assert WorldConcept("mine", "sks", "ring", "dots", ["red", "blue"]).colors == ("red", "blue")
    with pytest.raises(ValueError, match="seed must be a whole number >= 0, got -1"):
        render_concept("striped_ball", 1, seed=-1)  # numpy's 'expected non-negative integer'


def test_concepts_command_checks_seed_and_out_before_rendering(tmp_path, monkeypatch, capsys):
    """--seed -1 and an --out that is a file ended in tracebacks (numpy's seeding, mkdir); --out ~/x made a folder
    named '~'."""
    from prkit.world import concepts as C

    written = []
    monkeypatch.setattr(C, "write_concept_folder", lambda concept, folder, n, seed: written.append(folder) or folder)
    (tmp_path / "file").write_text("")
    for args, says in ((["--seed", "-1"], "--seed: must be at least 0"), (["--out", str(tmp_path / "file")],
                                                                           "--out: '" + str(tmp_path / "file"))):
        with pytest.raises(SystemExit):
            C.main([*args, "--concepts", "dotted_box"])
        assert says in capsys.readouterr().err
    assert written == []
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert C.main(["--out", "~/refs", "--concepts", "dotted_box"]) == 0
    assert written == [tmp_path / "refs" / "dotted_box"]


def test_masks_of_overlapping_objects_hold_only_what_each_shows():
    """A ball drawn over a box: the box's mask still claimed the ball's pixels (456 of them), so its ground truth
    held blue pixels the box does not show."""
    scene = Scene(PLAIN, [Obj("box", "red", 30, 32, 14), Obj("ball", "blue", 40, 32, 14)])
    img, masks = render(scene, size=128)
    _, alone = render(Scene(PLAIN, scene.objects[:1]), size=128)
    assert not (masks[0] & masks[1]).any() and np.array_equal(masks[0] | masks[1], alone[0] | masks[1])
    assert not masks[0][64, 80] and masks[1][64, 80]  # the ball's centre
    blue = np.linalg.norm(img.astype(float) - COLORS["blue"], axis=-1) < 60
    assert blue[masks[1]].mean() > 0.5 and not blue[masks[0]].any()


def test_concepts_command_runs_without_a_module_loaded_twice():
    """`python -m prkit.world.concepts` warned on every run: prkit.world imported prkit.world.concepts before runpy
    ran it as __main__ (RuntimeWarning "found in sys.modules ... unpredictable behaviour")."""
    import subprocess
    import sys

    import prkit.world as world

    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "prkit.world.concepts", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "found in sys.modules" not in done.stderr, done.stderr
    assert world.render_concept is render_concept and world.EXAMPLE_CONCEPTS is EXAMPLE_CONCEPTS
    from prkit.world import BENCH_PROMPTS as prompts, WorldConcept  # noqa: F401 - the names still import
    assert prompts is BENCH_PROMPTS
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        world.nothing


def test_concept_folder_rewritten_with_fewer_images_keeps_no_three_digit_reference(tmp_path):
    """Only two-digit names were cleared: after n=101, n=2 left 100.png among the references."""
    from prkit.world.concepts import write_concept_folder

    concept = EXAMPLE_CONCEPTS["dotted_box"]
    write_concept_folder(concept, tmp_path, n=101)
    assert (tmp_path / "100.png").is_file()
    (tmp_path / "mine.png").write_bytes(b"")  # not one of ours: left alone
    write_concept_folder(concept, tmp_path, n=2)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00.png", "01.png", "mine.png"]


def test_attention_on_object_takes_a_map_at_the_size_of_an_image_other_than_64():
    """The oracle's mask is 64x64: a 128 px image's map (as AttentionStore.aggregate(size=128) gives) failed with
    IndexError."""
    from prkit.world.bench import attention_on_object

    scene = Scene(PLAIN, [Obj("ball", "red", 20, 40, 12, "stripes", "white")])
    image, masks = render(scene, size=128)
    inside, outside = attention_on_object(image, masks[0].astype(np.float32))
    assert inside > 0.9 and outside < 0.05
