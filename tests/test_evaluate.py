"""The evaluation harness: shards, atomic rows and merges, intervals, protocols, and end-to-end runs on the
tiny pipeline (two methods, an interrupted run resumed, the world's grading) and on the world model."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prkit.evaluate as ev
from prkit.evaluate import EvalConfig
from tiny import tiny_clip, tiny_pipeline, tiny_vit

DB_PROMPTS = """Classes

subject_name,class
dog,dog
teapot,teapot

Prompts

Object Prompts

prompt_list = [
'a {0} {1} on the beach'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} on the beach'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]
"""
WORLD_MODEL = Path(__file__).resolve().parents[1] / "prkit" / "world" / "model" / "model_index.json"
QUICK = {"residuals": {"steps": 3}, "textual_inversion": {"steps": 3}, "lora": {"steps": 3}}


def _images(folder: Path, n: int = 3, size: int = 24) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A DreamBooth-layout dataset of two subjects, a tiny CLIP and a tiny ViT folder."""
    root = tmp_path_factory.mktemp("assets")
    data = root / "dreambooth"
    data.mkdir()
    (data / "prompts_and_classes.txt").write_text(DB_PROMPTS)
    _images(data / "dog")
    _images(data / "teapot")
    return {"data": data, "clip": tiny_clip(root / "clip"), "dino": tiny_vit(root / "dino")}


def _config(assets, out: Path, **kw) -> EvalConfig:
    base = dict(protocol="dreambooth", data=str(assets["data"]), methods=("residuals", "textual_inversion"),
                subjects=("dog",), images_per_prompt=2, sample_steps=2, train=QUICK, clip=str(assets["clip"]),
                dino=str(assets["dino"]), out=str(out), device="cpu")
    return EvalConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ units

def test_shard_round_robin_and_balanced():
    jobs = [(m, s) for m in ("a", "b", "c") for s in ("x", "y", "z")]
    shards = [ev.shard(jobs, r, 2) for r in range(2)]
    assert shards[0] == jobs[0::2] and sorted(shards[0] + shards[1]) == sorted(jobs)
    cost = {"a": 1.0, "b": 10.0, "c": 3.0}
    parts = [ev.shard(jobs, r, 3, cost=lambda j: cost[j[0]]) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(jobs) and all(p == sorted(p, key=jobs.index) for p in parts)
    loads = [sum(cost[j[0]] for j in p) for p in parts]
    assert max(loads) - min(loads) <= 3.0  # LPT: the three 10s on three ranks, then the rest evens out
    assert parts == [ev.shard(jobs, r, 3, cost=lambda j: cost[j[0]]) for r in range(3)]  # deterministic
    assert ev.shard(jobs[:1], 1, 2) == []
    with pytest.raises(ValueError):
        ev.shard(jobs, 2, 2)


def test_job_queue_hands_each_job_to_exactly_one_rank(tmp_path):
    jobs = [(m, s) for m in ("a", "b", "c") for s in ("x", "y/z", "w w")]  # odd subject names are fine
    cost = {"a": 1.0, "b": 10.0, "c": 3.0}
    queues = [iter(ev.JobQueue(tmp_path / "claims", jobs, lambda j: cost[j[0]], rank=r)) for r in range(2)]
    got: list[list] = [[], []]
    pending = [0, 1]
    turn = 0
    while pending:  # the two ranks ask in turn, as if each job took as long as the other rank's
        r = pending[turn % len(pending)]
        job = next(queues[r], None)
        if job is None:
            pending.remove(r)
        else:
            got[r].append(job)
            turn += 1
    assert sorted(got[0] + got[1]) == sorted(jobs) and not set(got[0]) & set(got[1])
    assert got[0][0][0] == "b" and got[1][0][0] == "b"  # costliest first
    claimed = [json.loads(p.read_text()) for p in (tmp_path / "claims").iterdir()]
    assert sorted(c["rank"] for c in claimed) == sorted([0] * len(got[0]) + [1] * len(got[1]))
    # a slow rank takes fewer jobs: rank 1 takes one job, rank 0 then takes all the rest
    ev.JobQueue.reset(tmp_path / "claims")
    assert not (tmp_path / "claims").exists()
    queue_slow, queue_fast = ev.JobQueue(tmp_path / "claims", jobs, rank=1), ev.JobQueue(tmp_path / "claims", jobs)
    slow, fast = iter(queue_slow), iter(queue_fast)
    first = next(slow)
    assert queue_slow.taken == 1 and len(queue_slow) == len(jobs)  # what the progress bar shows
    assert first == jobs[0] and list(fast) == jobs[1:] and queue_fast.taken == len(jobs) and next(slow, None) is None


def _row(target, subject, prompt_index=0, seed=0, method=None, **metrics):
    return {"protocol": "p", "target": target, "method": method or target, "subject": subject,
            "prompt_index": prompt_index, "prompt": "a sks dog", "seed": seed, "parameters": 10,
            "train_seconds": 1.5, "train_steps": 3, **metrics}


def test_results_files_get_a_new_files_usual_mode(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = ev.write_rows(tmp_path / "results.csv", [])
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # was 0600 (mkstemp's), unreadable to others on a shared folder


def test_atomic_rows_finished_pairs_and_merge(tmp_path):
    out = tmp_path / "out"
    ev.append_rows(out / ev.RESULTS, [_row("lora", "dog", clip_i=0.5, identity=True)])
    ev.append_rows(out / "parts" / "rank000-of-002.csv", [_row("residuals", "dog", seed=s) for s in range(2)])
    ev.append_rows(out / "parts" / "rank001-of-002.csv", [_row("base", "cat"), _row("lora", "dog", clip_i=0.7)])
    assert ev.finished_pairs(out) == {("lora", "dog"), ("residuals", "dog"), ("base", "cat")}
    assert not list(out.rglob("*.tmp"))
    rows = ev.merge(out)
    assert not list((out / "parts").iterdir())
    assert [(r["target"], r["subject"], r["seed"]) for r in rows] == \
        [("base", "cat", "0"), ("residuals", "dog", "0"), ("residuals", "dog", "1"), ("lora", "dog", "0")]
    lora = rows[-1]
    assert lora["clip_i"] == "0.7" and lora["identity"] == "" and list(lora) == ev.COLUMNS  # one row per key
    assert ev.read_rows(out / ev.RESULTS) == rows


def test_mean_ci_and_summary_by_hand():
    mean, ci = ev.mean_ci([1.0, 2.0, 3.0, float("nan")])
    assert mean == 2.0 and ci == pytest.approx(4.302653 * 1.0 / math.sqrt(3))
    assert math.isnan(ev.mean_ci([5.0])[1]) and math.isnan(ev.mean_ci([])[0])
    rows = [_row("residuals", s, seed=k, clip_i=str(v)) for s, vals in (("a", (0.2, 0.4)), ("b", (0.6, 0.8)))
            for k, v in enumerate(vals)]
    rows += [_row("residuals", "a", method="residuals+lag", clip_i="0.9")]
    by_image = {s["method"]: s for s in ev.summarize(rows)}
    assert by_image["residuals"]["clip_i"] == pytest.approx(0.5) and by_image["residuals"]["images"] == 4
    assert by_image["residuals"]["clip_i_ci95"] == pytest.approx(3.182446 * np.std([.2, .4, .6, .8], ddof=1) / 2)
    assert math.isnan(by_image["residuals"]["dino"]) and by_image["residuals+lag"]["subjects"] == 1
    by_subject = {s["method"]: s for s in ev.summarize(rows, ci_over="subject")}
    assert by_subject["residuals"]["clip_i_ci95"] == pytest.approx(12.706205 * np.std([.3, .7], ddof=1) / math.sqrt(2))
    table = ev.format_table(list(by_image.values()), {"DINO": "no weights here"})
    assert "CLIP-I" in table and "DINO unavailable: no weights here" in table and "| DINO |" not in table


@pytest.mark.parametrize("df, quantile", [(1, 12.706205), (2, 4.302653), (3, 3.182446), (13, 2.160369),
                                          (29, 2.045230), (30, 2.042272), (59, 2.000995), (119, 1.980100),
                                          (159, 1.974996), (200, 1.971896), (1000, 1.962339), (2999, 1.960755)])
def test_the_t_quantile_is_students_at_every_df(df, quantile):
    """A table looked up at the next smaller df, 1.96 beyond 120: the intervals of the world's default run (160
    images a method, df 159) were 0.8% too narrow (1.96 for 1.975), those over 30 DreamBooth subjects 0.7% too
    wide (2.060 for 2.045). Reference: Student's t 0.975 quantiles (scipy.stats.t.ppf)."""
    assert ev.t975(df) == pytest.approx(quantile, abs=2e-6)
    assert math.isnan(ev.t975(0))


def test_proportions_get_a_wilson_interval_inside_0_1():
    """identity, scene, class are 0/1 per image, but got the t-interval: 3 of 4 images right read 0.75 ± 0.7955,
    [-0.05, 1.55], and 4 of 4 read 1.0 ± 0, as if certain."""
    rows = [_row("lora", "a", seed=k, identity=v, scene="1", clip_i=str(c))
            for k, (v, c) in enumerate([("1", .2), ("1", .4), ("1", .6), ("0", .8)])]
    s = ev.summarize(rows)[0]
    # Wilson, z = 1.96: 3/4 -> [0.3006, 0.9544], 4/4 -> [0.5101, 1] (the roots x of (p - x)^2 = z^2 x(1-x)/n)
    assert (s["identity"], s["identity_ci95_low"], s["identity_ci95_high"]) == pytest.approx((0.75, 0.30064, 0.95441),
                                                                                             abs=1e-5)
    assert (s["scene"], s["scene_ci95_low"], s["scene_ci95_high"]) == pytest.approx((1.0, 0.51010, 1.0), abs=1e-5)
    assert math.isnan(s["identity_ci95"]) and s["scene_ci95_high"] == 1.0  # no half-width: the interval is uneven
    half = 3.182446 * np.std([.2, .4, .6, .8], ddof=1) / 2  # a continuous metric keeps its t-interval
    assert (s["clip_i_ci95"], s["clip_i_ci95_low"], s["clip_i_ci95_high"]) == pytest.approx((half, .5 - half,
                                                                                              .5 + half))
    assert ev.wilson_ci([0] * 10) == pytest.approx((0.0, 0.0, 0.27753), abs=1e-5) and ev.wilson_ci([])[0] != 0
    with pytest.raises(ValueError, match=r"must be 0 or 1, got \[0.5\]"):
        ev.wilson_ci([1, 0.5])
    table = ev.format_table([s])
    assert "| 0.7500 [0.3006, 0.9544] |" in table and "| 1.0000 [0.5101, 1.0000] |" in table
    assert "| 0.5000 ± 0.4109 |" in table and "proportion (identity, prompt (scene)): 95% Wilson score" in table
    # over subjects: the t-interval of per-subject proportions (0.75 and 0.5: 0.625 ± 1.588), clipped to [0, 1]
    rows += [_row("lora", "b", seed=k, identity=v) for k, v in enumerate("10")]
    s = ev.summarize(rows, ci_over="subject")[0]
    assert (s["identity"], s["identity_ci95_low"], s["identity_ci95_high"]) == (0.625, 0.0, 1.0)
    assert "clipped to [0, 1]" in ev.format_table([s], ci_over="subject")
    # one subject, or a proportion no row has (the oracle's outside the world): no interval, not [0, 1]
    one = ev.summarize([r for r in rows if r["subject"] == "a"], ci_over="subject")[0]
    assert one["identity"] == 0.75 and math.isnan(one["identity_ci95_low"]) and math.isnan(one["identity_ci95_high"])
    assert all(math.isnan(s[f"class{end}"]) for end in ("", "_ci95_low", "_ci95_high"))
    assert "| 0.7500 |" in ev.format_table([one], ci_over="subject")


def test_customconcept101_layout(tmp_path):
    from prkit.data import ConceptDataError

    root = tmp_path / "cc101"
    _images(root / "benchmark_dataset" / "pet_dog1")
    (root / "prompts").mkdir()
    (root / "prompts" / "dog.txt").write_text("Photo of a {}.\n{} swimming in a pool.\n\n")
    (root / "dataset.json").write_text('[{"instance_prompt": "photo of a <new1> dog", "class_prompt": "dog", '
                                       '"instance_data_dir": "./benchmark_dataset/pet_dog1", '
                                       '"prompt_filename": "prompts/dog.txt"}]')
    (subject,) = ev.load_customconcept101(root, token="sks")
    assert subject.name == "pet_dog1" and subject.class_word == "dog"
    assert subject.prompts == ["Photo of a sks dog.", "sks dog swimming in a pool."]
    assert len(subject.load(16).images) == 3
    assert ev.strip_token(subject.prompts[1], "sks") == "dog swimming in a pool."
    assert ev.strip_token("a photo of a sks dog", "sks") == "a photo of a dog"
    assert ev.strip_token("a photo of a <new1> dog", "<new1>") == "a photo of a dog"  # CustomConcept101's own
    assert ev.strip_token("a V* dog", "V*") == "a dog" and ev.strip_token("asks dog", "sks") == "asks dog"
    for token, match in [("", "non-empty"), (None, "token is required"), ("my tok", "whitespace"),
                         ("Dog", "distinct from the class word")]:  # as DreamBooth's prompts refuse them
        with pytest.raises(ConceptDataError, match=match):
            ev.load_customconcept101(root, token=token)  # was 'Photo of a  dog.', refused at the first job


def test_unknown_names_are_clear(assets, tmp_path):
    with pytest.raises(ValueError, match="unknown subjects"):
        ev.load_subjects(_config(assets, tmp_path, subjects=("cat7",)))
    with pytest.raises(ValueError, match="unknown method"):
        ev.job_list(["vico"], ["dog"])
    with pytest.raises(ValueError, match="needs --data"):
        ev.load_subjects(EvalConfig(protocol="dreambooth"))


def test_a_data_folder_that_is_no_dreambooth_dataset_is_said_with_the_flag(tmp_path, capsys):
    """`prkit eval --protocol dreambooth --data my_photos` told the user to "point load_dreambooth at" the dataset,
    a function the command line user never called: the command says --data."""
    from prkit.cli import main

    (tmp_path / "my_photos").mkdir()
    assert main(["eval", "--protocol", "dreambooth", "--data", str(tmp_path / "my_photos"), "--out",
                 str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"prkit eval: error: '{tmp_path / 'my_photos' / 'prompts_and_classes.txt'}' not found; point --data at the "
        "DreamBooth dataset folder (the one holding prompts_and_classes.txt).\n")


# ------------------------------------------------------------------------------------------ end to end

def test_end_to_end_two_methods_then_skip(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = _config(assets, out)
    summary = ev.evaluate(config, tiny_pipeline(tmp_path / "pipe"), progress=False)
    rows = ev.read_rows(out / ev.RESULTS)
    # dog is a live subject: 2 prompts x 2 seeds, for residuals, residuals+lag and textual_inversion
    assert len(rows) == 3 * 2 * 2 and {r["method"] for r in rows} == {"residuals", "residuals+lag",
                                                                       "textual_inversion"}
    assert {r["prompt"] for r in rows} == {"a sks dog on the beach", "a red sks dog"}
    for r in rows:
        for m in ("clip_i", "clip_t_dreambooth", "clip_t_clipscore", "dino"):
            assert math.isfinite(float(r[m]))
        assert 0 <= float(r["clip_t_clipscore"]) <= 2.5 and r["identity"] == ""  # no oracle outside the world
        assert int(r["train_steps"]) == 3 and int(r["parameters"]) > 0
    assert [s["method"] for s in summary] == ["residuals", "residuals+lag", "textual_inversion"]
    table = (out / "summary.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + 3 and (out / ev.SUMMARY).is_file()
    monkeypatch.setattr(ev, "run_job", lambda *a, **k: pytest.fail("a finished pair ran again"))
    ev.evaluate(config, tiny_pipeline(tmp_path / "pipe2"), progress=False)
    assert ev.read_rows(out / ev.RESULTS) == rows
    # the same folder with other settings: refused before anything runs (before, it kept the old rows, printed their
    # table and wrote the new settings into run.json)
    other = replace(config, images_per_prompt=3, train={**config.train, "residuals": {"steps": 50}})
    with pytest.raises(ValueError, match=r"other settings: images_per_prompt \(2 there, 3 now\); train"):
        ev.evaluate(other, tiny_pipeline(tmp_path / "pipe3"), progress=False)
    assert ev.read_rows(out / ev.RESULTS) == rows and json.loads((out / "settings.json").read_text())["images_per_prompt"] == 2
    done = ev.finished_pairs(out)
    # what a rerun may change: methods not run yet (with their own overrides), the model folder's spelling
    more = replace(config, methods=(*config.methods, "lora"), train={**config.train, "lora": {"steps": 7}})
    ev.check_settings(out, more, done)
    # overrides that restate the recipe or TrainConfig's default are the run without them (learning_rate is not:
    # an explicit rate beats the model folder's own)
    restated = {m: {**v, "mixed_precision": "auto"} for m, v in config.train.items()}
    restated["residuals"] = {**restated["residuals"], "rank": 0.05}
    ev.check_settings(out, replace(config, train=restated), done)
    # where a run keeps its checkpoints changes nothing it trains: another folder is no other setting
    kept = {m: {**v, "checkpoint_dir": str(tmp_path / "ck2"), "checkpoint_every": 1, "resume": False}
            for m, v in config.train.items()}
    ev.check_settings(out, replace(config, train=kept), done)
    with pytest.raises(ValueError, match="train"):
        ev.check_settings(out, replace(config, train={**restated, "residuals": {**restated["residuals"],
                                                                              "rank": 0.1}}), done)
    (tmp_path / "m").mkdir()
    ev.write_settings(out, ev.check_settings(out, replace(config, model=str(tmp_path / "m")), set()))
    ev.check_settings(out, replace(config, model=str(tmp_path / "m" / ".." / "m")), done)
    (out / "settings.json").unlink()  # an older version's folder: its run.json says what it ran
    (out / "run.json").write_text(json.dumps({"config": {**vars(config), "model": str(tmp_path / "m")}}))
    with pytest.raises(ValueError, match="images_per_prompt"):
        ev.check_settings(out, replace(config, model=str(tmp_path / "m"), images_per_prompt=4), done)


def test_interrupted_run_loses_nothing(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = _config(assets, out, methods=("base", "textual_inversion"), subjects=(), dino=None)
    real, calls = ev.run_job, []

    def interrupt_third(pipe, subject, method, *args, **kw):
        calls.append((method, subject.name))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(pipe, subject, method, *args, **kw)

    monkeypatch.setattr(ev, "run_job", interrupt_third)
    pipe = tiny_pipeline(tmp_path / "pipe")
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(config, pipe, progress=False)
    assert ev.finished_pairs(out) == {("base", "dog"), ("base", "teapot")}
    calls.clear()
    ev.evaluate(config, pipe, progress=False)
    assert calls == [("textual_inversion", "dog"), ("textual_inversion", "teapot")]
    rows = ev.read_rows(out / ev.RESULTS)
    assert len(rows) == 4 * 2 * 2 and {r["dino"] for r in rows} == {""}
    assert "DINO unavailable: switched off" in (out / "summary.md").read_text()


def test_world_protocol_grades_with_the_oracle(tmp_path):
    """The world path (oracle grading, background vs the base images) on the tiny pipeline with a random oracle."""
    from prkit.world.oracle import Oracle, OracleConfig

    out = tmp_path / "out"
    config = EvalConfig(protocol="world", methods=("base", "residuals"), subjects=("striped_ball",), max_prompts=2,
                        images_per_prompt=2, sample_steps=2, train=QUICK, clip=None, dino=None, out=str(out),
                        device="cpu")
    ev.evaluate(config, tiny_pipeline(tmp_path / "pipe"), oracle=Oracle(OracleConfig()), progress=False)
    rows = ev.read_rows(out / ev.RESULTS)
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        assert r["identity"] in ("0", "1") and r["scene"] in ("0", "1")
        assert 0 <= float(r["background_change"]) <= 1
    assert {float(r["background_change"]) for r in rows if r["method"] == "base"} == {0.0}
    assert rows[0]["prompt"].startswith("a photo of a sks ball")


def test_world_grading_by_hand_colours_in_the_order_the_oracle_reads_them():
    """identity + colours: stripes and checks are read in COLORS order (their order is unreadable), but dots and a
    face have a body and a pattern colour, which the oracle reads apart: a yellow box with blue dots is not the blue
    box with yellow dots (it counted as the concept's colours when both were compared as a set)."""
    from prkit.world.bench import grade, identity
    from prkit.world.concepts import EXAMPLE_CONCEPTS

    def reading(*objects, background="plain", mask=None):
        return {"background": background, "mask": np.zeros((4, 4), bool) if mask is None else mask,
                "objects": [dict(zip(("cls", "pattern", "color", "color2"), o)) for o in objects]}

    box, ball = EXAMPLE_CONCEPTS["dotted_box"], EXAMPLE_CONCEPTS["striped_ball"]  # blue/yellow dots; red/white stripes
    assert identity(reading(("box", "dots", "blue", "yellow")), box) == (True, True)
    assert identity(reading(("box", "dots", "yellow", "blue")), box) == (True, False)  # swapped: was (True, True)
    assert identity(reading(("box", "stripes", "blue", "yellow")), box) == (False, False)
    assert identity(reading(("ball", "stripes", "red", "white")), ball) == (True, True)  # COLORS order: red, white
    assert identity(reading(("ball", "stripes", "white", "red")), ball) == (True, True)  # symmetric either way
    heart = EXAMPLE_CONCEPTS["face_heart"]
    assert identity(reading(("heart", "face", "white", "purple"), ("heart", "face", "purple", "white")), heart) == \
        (True, True)  # the second object is the concept
    # scene, class and background change of one image by hand
    image, base = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)
    image[0, 0] = 255  # one changed pixel of 16, far from the mask
    mask = np.zeros((4, 4), bool)
    (row,) = grade([image], [base], [reading(("box", "dots", "blue", "yellow"), background="snow", mask=mask)],
                   [reading(("box", None, "red", None), mask=mask)], box, ["a photo of a zwx box in the snow"], 1)
    assert row["identity"] and row["identity_colors"] and row["scene"] and row["class"] and row["seed"] == 0
    assert row["background_change"] == pytest.approx(1 / 16)


@pytest.mark.skipif(not WORLD_MODEL.exists(), reason="the world model's weights are not trained yet")
def test_world_model_end_to_end(tmp_path):
    config = EvalConfig(protocol="world", methods=("residuals", "lora"), subjects=("striped_ball",), max_prompts=2,
                        images_per_prompt=2, sample_steps=5, train=QUICK, out=str(tmp_path / "out"), device="cpu")
    summary = ev.evaluate(config, progress=False)
    assert {s["method"] for s in summary} == {"residuals", "residuals+lag", "lora"}
    assert all(0 <= s["identity"] <= 1 and s["background_change"] >= 0 for s in summary)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert set(run["unavailable"]) == {"CLIP-I/CLIP-T", "DINO"}  # a reason, or None where the backbone loaded
    assert run["unavailable"]["CLIP-I/CLIP-T"] is None and run["unavailable"]["DINO"]  # the world ships a CLIP
    assert run["model_defaults"] == {"residuals": {"learning_rate": 0.01}} and run["missing_jobs"] == []
    assert run["ranks"][0]["rank"] == 0 and len(run["ranks"][0]["jobs"]) == 2
    rows = ev.read_rows(tmp_path / "out" / ev.RESULTS)
    assert all(0 < float(r["clip_t_clipscore"]) <= 2.5 and -1 <= float(r["clip_i"]) <= 1 for r in rows)


def test_cli_arguments_make_the_config():
    from prkit.cli import build_parser

    args = build_parser().parse_args(["eval", "--protocol", "dreambooth", "--data", "db", "--methods", "residuals",
                                      "dreambooth", "--set", "dreambooth.steps=200",
                                      "dreambooth.prior_images=cls/{subject}", "--dino", "none", "--max-prompts", "3"])
    config = ev.config_from_args(args)
    assert config.methods == ("residuals", "dreambooth") and config.dino is None and config.clip == "auto"
    assert config.train == {"dreambooth": {"steps": 200, "prior_images": "cls/{subject}"}} and config.max_prompts == 3
    with pytest.raises(ValueError, match="METHOD.FIELD=VALUE"):
        ev._parse_set(["steps=3"])
    with pytest.raises(ValueError, match="'stepz' is not a recipe field"):
        ev._parse_set(["residuals.stepz=3"])
    with pytest.raises(ValueError, match="'residual' is not a method"):
        ev._parse_set(["residual.steps=3"])
    # numbers are checked by the parser (before any model loads), naming the flag; the config checks them too
    for flag, value in [("--max-prompts", "0"), ("--max-prompts", "-1"), ("--images-per-prompt", "0"),
                        ("--sample-steps", "0"), ("--guidance-scale", "nan"), ("--dtype", "float64")]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["eval", flag, value])
    for field_name, value in [("max_prompts", 0), ("images_per_prompt", 0), ("sample_steps", -2), ("dtype", "fp8")]:
        with pytest.raises(ValueError, match=f"EvalConfig.{field_name}"):
            ev.EvalConfig(**{field_name: value})


def test_set_true_and_false_written_in_lowercase_are_booleans():
    """--set custom_diffusion.scale_lr=false stayed the string 'false', which is truthy: the learning rate was
    scaled by the batch size anyway, silently; --set residuals.resume=true was refused with a hint about papermill."""
    from prkit.targets import recipe

    train = ev._parse_set(["custom_diffusion.scale_lr=false", "residuals.resume=true", "lora.flip=FALSE"])
    assert train == {"custom_diffusion": {"scale_lr": False}, "residuals": {"resume": True}, "lora": {"flip": False}}
    assert recipe("custom_diffusion", **train["custom_diffusion"])["learning_rate"] == 1e-5  # not 2e-5
    assert ev.EvalConfig(methods=("residuals", "lora", "custom_diffusion"), train=train).train == train
    with pytest.raises(ValueError, match=r"scale_lr must be True or False, got 'false'"):  # the Python API's string
        ev.EvalConfig(methods=("custom_diffusion",), train={"custom_diffusion": {"scale_lr": "false"}})


def test_recipe_overrides_and_prior_folder(assets, tmp_path):
    (subject,) = ev.load_subjects(_config(assets, tmp_path))
    prior = str(assets["data"] / "{subject}")  # class images per subject (here: its own folder)
    config = _config(assets, tmp_path, train={"dreambooth": {"steps": 7, "prior_images": prior}})
    train = ev._train_config("dreambooth", subject, config, 16)
    assert train.target == "dreambooth" and train.steps == 7 and train.learning_rate == 5e-6 and train.batch_size == 1
    assert len(train.prior_images.images) == 3 and train.prior_images.images[0].size == (16, 16)
    assert ev._train_config("custom_diffusion", subject, config, 16).learning_rate == pytest.approx(2e-5)
    # a model folder's own rate replaces the recipe's, as given (not batch-scaled); --set still wins
    own = {"learning_rate": 0.01}
    assert ev._train_config("residuals", subject, config, 16, own).learning_rate == 0.01
    assert ev._train_config("custom_diffusion", subject, config, 16, own).learning_rate == 0.01
    config = _config(assets, tmp_path, train={"residuals": {"learning_rate": 3e-3}})
    assert ev._train_config("residuals", subject, config, 16, own).learning_rate == 3e-3
    assert ev._train_config("residuals", subject, config, 16, {}).learning_rate == 3e-3


def test_a_prior_folder_given_as_a_path_is_a_folder(assets, tmp_path):
    """train={'dreambooth': {'prior_images': Path('class_images/{subject}')}} was refused ("must be a prkit Concept
    of class images"), where the same folder as a str loads: only a str was read as a folder."""
    (subject,) = ev.load_subjects(_config(assets, tmp_path))
    config = _config(assets, tmp_path, train={"dreambooth": {"prior_images": assets["data"] / "{subject}"}})
    prior = ev._train_config("dreambooth", subject, config, 16).prior_images
    assert len(prior.images) == 3 and prior.images[0].size == (16, 16)


def test_overrides_that_restate_the_recipe_are_no_overrides_but_seed_is(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = {("residuals", "dog")}
    config = ev.EvalConfig(protocol="world", out=str(out), seed=5)
    ev.write_settings(out, ev.check_settings(out, config, set()))
    ev.check_settings(out, replace(config, train={"residuals": {"steps": 150}}), done)  # the recipe's own: same run
    with pytest.raises(ValueError, match="train"):  # the harness trains at --seed 5: seed=0 is another run
        ev.check_settings(out, replace(config, train={"residuals": {"seed": 0}}), done)
    assert ev.EvalConfig(dtype=torch.float16).dtype == torch.float16  # a torch dtype, as load_pipeline takes


def test_module_command_line_errors_are_messages_and_expands_home(tmp_path, monkeypatch, capsys):
    """``python -m prkit.evaluate`` ended a --set typo, an unknown subject or a file as --out in a traceback (``prkit
    eval`` said them in one line), and made a folder named '~' of ``--out=~/x``."""
    tiny = ["--protocol", "world", "--methods", "base", "--max-prompts", "1", "--images-per-prompt", "1",
            "--sample-steps", "1", "--device", "cpu", "--dino", "none"]
    (tmp_path / "file").write_text("mine")
    for extra, said in [(["--set", "residuals.steps"], "--set wants METHOD.FIELD=VALUE"),
                        (["--subjects", "bogus"], "unknown subjects ['bogus']"),
                        (["--out", str(tmp_path / "file")], "is a file")]:
        assert ev.main([*tiny, "--out", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m prkit.evaluate: error: ") and said in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "mine"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(ev, "evaluate", lambda config, progress: seen.setdefault("out", config.out) and [])
    assert ev.main([*tiny, "--out=~/runs"]) == 0
    assert seen["out"] == str(tmp_path / "home" / "runs") and not (tmp_path / "~").exists()


def test_each_method_and_subject_checkpoints_in_a_folder_of_its_own(assets, tmp_path):
    """A --set METHOD.checkpoint_dir is shared by every subject (and maybe by other methods): each run keeps its
    checkpoint in <dir>/<method>/<subject> (one folder for all made every subject's run after the first refuse the
    first one's checkpoint), or where the folder's name holds "{subject}" (and "{method}"), there."""
    from pathlib import Path

    (subject,) = ev.load_subjects(_config(assets, tmp_path))
    config = _config(assets, tmp_path, train={m: {"checkpoint_dir": str(tmp_path / "ck")} for m in ("residuals", "lora")})
    assert Path(ev._train_config("residuals", subject, config, 16).checkpoint_dir) == tmp_path / "ck" / "residuals" / \
        subject.name
    assert Path(ev._train_config("lora", subject, config, 16).checkpoint_dir) == tmp_path / "ck" / "lora" / subject.name
    config = _config(assets, tmp_path, train={"residuals": {"checkpoint_dir": str(tmp_path / "{method}-{subject}")}})
    assert Path(ev._train_config("residuals", subject, config, 16).checkpoint_dir) == \
        tmp_path / f"residuals-{subject.name}"
    assert ev._train_config("residuals", subject, _config(assets, tmp_path), 16).checkpoint_dir is None
    assert ev.checkpoint_folder("~/ck/{method}", "lora", "dog") == str(Path("~/ck/lora").expanduser())
    # other braces are refused when the config is made, before any model loads, naming the setting
    for folder, said in [("ck/{subject}/{0}", "names {0}"), ("ck/{x}", "names {x}"), ("ck/{ subject}", "{ subject}"),
                         ("ck/{subject:s}", "names {subject:s}"), ("ck/{subject}{", "Single '{'")]:
        with pytest.raises(ValueError, match=re.escape(f"residuals.checkpoint_dir={folder!r}") + ".*" + re.escape(said)):
            _config(assets, tmp_path, train={"residuals": {"checkpoint_dir": folder}})


def _cli_dataset(assets, tmp_path) -> list[str]:
    """A tiny model folder and a copy of the dreambooth dataset under tmp_path: prkit eval's arguments for them (one
    prompt, one image of one step each, no CLIP or DINO, on the CPU)."""
    import shutil

    model, data = tmp_path / "model", tmp_path / "data"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    shutil.copytree(assets["data"], data)
    return ["--protocol", "dreambooth", "--data", str(data), "--model", str(model), "--max-prompts", "1",
            "--images-per-prompt", "1", "--sample-steps", "1", "--clip", "none", "--dino", "none", "--device", "cpu"]


def _error_line(capsys) -> str:  # the error line alone (a logging handler a test before left on its closed stderr
    return next(line for line in capsys.readouterr().err.splitlines() if ": error: " in line)  # says more)


def test_command_line_advice_names_evals_own_flags(assets, tmp_path, capsys):
    """prkit eval passed on advice meant for Python callers or prkit train: a checkpoint folder set with --set that
    a run with other settings had written was to be fixed with "resume=False (CLI: --no-resume)", a flag eval does not
    have, an unreadable image of the dataset with "skip_bad=True", and a --set mixed_precision in the other half
    precision than --dtype with prkit.load_pipeline(..., dtype=...). Said now with --set's fields and --dtype (the
    library's words are unchanged for Python callers)."""
    from prkit import checkpoints
    from prkit.cli import main
    from prkit.cli_output import _cli_words
    from prkit.data import ConceptDataError, load_concept
    from prkit.train import TrainConfig, diverged_message

    run = [*_cli_dataset(assets, tmp_path), "--methods", "residuals", "--set", "residuals.steps=2",
           f"residuals.checkpoint_dir={tmp_path / 'ckpt'}"]
    data = tmp_path / "data"

    def error() -> str:
        return _error_line(capsys)

    assert main(["eval", *run, "--subjects", "dog", "--out", str(tmp_path / "a")]) == 0
    # the same subject's checkpoint, for a run with other settings
    assert main(["eval", *run, "residuals.seed=5", "residuals.steps=3", "--subjects", "dog", "--out",
                 str(tmp_path / "a2")]) == 2
    err = error()
    assert "belongs to another run" in err and "--no-resume" not in err and "resume=False (CLI" not in err
    assert err.endswith("To keep both, pass another --set METHOD.checkpoint_dir; to start over, delete it, pass "
                        "another --set METHOD.checkpoint_dir, or pass --set METHOD.resume=False.")
    assert main(["eval", *run, "residuals.steps=1", "--subjects", "dog", "--out", str(tmp_path / "b")]) == 2
    assert "is at step 2, past this run's --set METHOD.steps=1: ask for at least 2" in error()
    with pytest.warns(UserWarning, match="bfloat16 on the CPU"):  # (a UNet in bf16, as on a GPU)
        assert main(["eval", *run[:-1], "residuals.mixed_precision=fp16", "--dtype", "bf16", "--out",
                     str(tmp_path / "c")]) == 2
    err = error()
    assert ("error: residuals on 'dog': --set METHOD.mixed_precision=fp16 on a UNet loaded in bf16: the two half "
            "precisions cannot mix in one step. Use --set METHOD.mixed_precision=auto or bf16, or pass --dtype "
            "fp16") in err
    assert "load_pipeline" not in err and "dtype=" not in err
    (data / "dog" / "9.png").write_bytes(b"not a png")
    for command in (lambda argv: main(["eval", *argv]), ev.main):  # `python -m prkit.evaluate` says it alike
        assert command([*run[:-5], "--methods", "base", "--out", str(tmp_path / "d")]) == 2
        err = error()
        assert "9.png" in err and "Remove or replace the file (prkit eval has no --skip-bad)." in err
        assert "skip_bad" not in err
    with pytest.raises(ConceptDataError, match=r"9\.png.*or pass skip_bad=True to skip it"):  # Python: as it was
        load_concept(data / "dog", "sks", "dog", 16)
    # what training says on its way (an interrupted run's log line, a divergence), in eval's words
    assert _cli_words(checkpoints.resume_hint(TrainConfig(resume=False)), "eval") == (
        "run the command again with --set METHOD.resume=True to resume; with METHOD.resume=False it would start "
        "over again")
    diverged = diverged_message(float("nan"), 3, None, TrainConfig(learning_rate=0.01), torch.bfloat16)
    assert "Lower learning_rate (now 0.01) or use mixed_precision='no'." in diverged
    assert _cli_words(diverged, "eval").endswith("Lower --set METHOD.learning_rate (now 0.01) or use --set "
                                                 "METHOD.mixed_precision='no'.")


def test_a_rerun_with_other_settings_names_the_flags_that_differ(assets, tmp_path, capsys):
    """prkit eval refused a rerun into one --out with other settings in EvalConfig's field names ("images_per_prompt
    (1 there, 2 now); sample_steps ..."): the flags to change back (--images-per-prompt, --sample-steps) went unsaid.
    Python callers keep the field names."""
    from prkit.cli import main

    run = ["eval", *_cli_dataset(assets, tmp_path), "--methods", "base", "--subjects", "dog", "--out",
           str(tmp_path / "out")]
    assert main(run) == 0
    capsys.readouterr()
    assert main([*run, "--images-per-prompt", "2", "--sample-steps", "2", "--guidance-scale", "5"]) == 2
    assert _error_line(capsys) == (
        f"prkit eval: error: {str(tmp_path / 'out')!r} holds results of a run with other settings: "
        "--images-per-prompt (1 there, 2 now); --sample-steps (1 there, 2 now); --guidance-scale (7.5 there, 5.0 now). "
        "Rerunning would mix them; pass another --out, or delete that folder to start over")
    config = EvalConfig(protocol="dreambooth", data=str(tmp_path / "data"), model=str(tmp_path / "model"),
                        methods=("base",), subjects=("dog",), max_prompts=1, images_per_prompt=2, sample_steps=1,
                        clip=None, dino=None, out=str(tmp_path / "out"), device="cpu")
    with pytest.raises(ValueError, match=r"other settings: images_per_prompt \(1 there, 2 now\)"):  # Python: fields
        ev.evaluate(config, progress=False)


def test_an_error_in_one_job_names_its_method_and_subject(assets, tmp_path, capsys):
    """An error raised inside one (method, subject) job (a divergence, an unreadable image of one subject, a
    checkpoint another run wrote) reached the command line as the library's message alone: which of the jobs failed
    went unsaid. The error line names them now; Python callers get the same exception, its words unchanged."""
    from prkit.cli import main
    from prkit.data import ConceptDataError

    run = _cli_dataset(assets, tmp_path)
    data = tmp_path / "data"

    def error() -> str:
        return _error_line(capsys)

    for prog, command in (("prkit eval", lambda argv: main(["eval", *argv])), ("python -m prkit.evaluate", ev.main)):
        out = tmp_path / prog.replace(" ", "_")
        assert command([*run, "--methods", "residuals", "--subjects", "teapot", "--set", "residuals.steps=3",
                        "residuals.learning_rate=1e30", "--out", str(out / "a")]) == 2  # a divergence
        assert error().startswith(f"{prog}: error: residuals on 'teapot': the loss became nan at step ")
        assert command([*run, "--methods", "residuals", "--subjects", "dog", "--set", "residuals.steps=2",
                        f"residuals.checkpoint_dir={out / 'ckpt'}", "--out", str(out / "b")]) == 0
        assert command([*run, "--methods", "residuals", "--subjects", "dog", "--set", "residuals.steps=3",
                        "residuals.seed=5", f"residuals.checkpoint_dir={out / 'ckpt'}", "--out", str(out / "c")]) == 2
        err = error()
        assert err.startswith(f"{prog}: error: residuals on 'dog': '{out / 'ckpt' / 'residuals' / 'dog'}")
        assert "belongs to another run" in err
    (data / "teapot" / "9.png").write_bytes(b"not a png")
    assert main(["eval", *run, "--methods", "base", "--out", str(tmp_path / "d")]) == 2  # dog's job ran first
    assert error().startswith(f"prkit eval: error: base on 'teapot': cannot read image '{data / 'teapot' / '9.png'}'")
    assert ev.read_rows(tmp_path / "d" / ev.RESULTS)  # the job before it finished, its rows kept
    config = EvalConfig(protocol="dreambooth", data=str(data), model=str(tmp_path / "model"), methods=("base",),
                        max_prompts=1, images_per_prompt=1, sample_steps=1, clip=None, dino=None,
                        out=str(tmp_path / "e"), device="cpu")
    with pytest.raises(ConceptDataError) as err:  # Python: the same exception as before, its message as it was
        ev.evaluate(config, progress=False)
    assert type(err.value) is ConceptDataError and str(err.value).startswith("cannot read image '")


def test_a_checkpoint_the_disk_refuses_says_what_an_eval_user_can_do(assets, tmp_path, monkeypatch, capsys, caplog):
    """A --set METHOD.checkpoint_dir on a full disk: prkit eval passed on train_residuals' advice for Python callers,
    to save the set left on the model with prkit.save_residuals(...) before calling train_residuals again; the
    command's model ends with it. It says now what happens: the jobs finished before keep their rows, and the same
    command run again runs the jobs left, the failed one resuming from its last checkpoint (or starting over)."""
    import errno
    import logging
    import shutil

    from conftest import full_disk
    from prkit import checkpoints
    from prkit.cli import main

    ckpt = tmp_path / "ckpt"
    run = ["eval", *_cli_dataset(assets, tmp_path), "--methods", "residuals", "--set", "residuals.steps=3",
           "residuals.checkpoint_every=1", f"residuals.checkpoint_dir={ckpt}", "--out", str(tmp_path / "out")]
    real, writes = checkpoints.writing, []

    def full_from(nth: int):  # the disk is full from the nth checkpoint on (dog's three, then teapot's)
        def counted(path):
            writes.append(path)
            if len(writes) == nth:
                full_disk(monkeypatch, free_mib=3)
            return real(path)
        monkeypatch.setattr(checkpoints, "writing", counted)

    for nth, again in ((5, f"resuming from {ckpt / 'residuals' / 'teapot' / 'checkpoint.pt'}, the last checkpoint "
                           "written"), (1, "starting over: no checkpoint holds this run")):
        writes.clear()
        full_from(nth)
        assert main(run) == 2
        err = _error_line(capsys)
        monkeypatch.undo()
        subject = "teapot" if nth == 5 else "dog"
        assert err.startswith(f"prkit eval: error: residuals on '{subject}': [Errno {errno.ENOSPC}] could not write "
                              f"{ckpt / 'residuals' / subject / 'checkpoint.pt'}: No space left on device (3 MiB "
                              "free there)")
        assert "prkit.save_residuals" not in err and "train_residuals" not in err and "pipe.unet" not in err
        assert err.endswith("The residuals this job trained end with the command; the jobs finished before it keep "
                            "their rows in --out. Once the checkpoint can be written there, run the same command "
                            f"again: it runs the jobs left, this one {again}")
        if nth == 5:  # as it says: dog's rows are kept, and the same command resumes teapot from its step 1
            assert {r["subject"] for r in ev.read_rows(tmp_path / "out" / ev.RESULTS)} == {"dog"}
            with caplog.at_level(logging.WARNING, logger="prkit.checkpoints"):
                assert main(run) == 0
            assert f"resuming from {ckpt / 'residuals' / 'teapot' / 'checkpoint.pt'} at step 1" in caplog.text
            rows = ev.read_rows(tmp_path / "out" / ev.RESULTS)
            assert {(r["subject"], int(r["train_steps"])) for r in rows} == {("dog", 3), ("teapot", 3)}
            shutil.rmtree(ckpt)
            shutil.rmtree(tmp_path / "out")


@pytest.mark.parametrize("spec, match", [
    ('{"a": 1}', r"dataset\.json' must hold a list of concepts"),
    ('[{"class_prompt": "dog", "prompt_filename": "prompts/dog.txt"}]', r"entry 0 has no 'instance_data_dir'"),
    ('[{oops', r"cannot read .*dataset\.json"),
    (None, r"concept\.json': the concept has no 'class_word'"),
    ("empty prompts", r"dog\.txt' of concept 'pet_dog1' has no prompts"),
    ("a prompt without {}", r"dog\.txt' of concept 'pet_dog1': the prompt 'a photo of a dog at the beach' has no \{\}"),
])
def test_a_customconcept101_folder_laid_out_wrongly_is_named(tmp_path, spec, match):
    """A bare KeyError, 'string indices must be integers', an unnamed JSON error, an IndexError after the model
    had loaded (an empty prompts file), and a prompt without {} (residuals trained, then LAG refused the prompt
    without the token): each now names the file and what is missing, before any work."""
    root = tmp_path / "cc101"
    _images(root / "benchmark_dataset" / "pet_dog1")
    (root / "prompts").mkdir()
    (root / "prompts" / "dog.txt").write_text({"empty prompts": "\n\n", "a prompt without {}": "{} in a pool\na photo "
                                               "of a dog at the beach\n"}.get(spec, "Photo of a {}.\n"))
    good = ('[{"class_prompt": "dog", "instance_data_dir": "./benchmark_dataset/pet_dog1", '
            '"prompt_filename": "prompts/dog.txt"}]')
    if spec is None:  # the folder layout: concept folders with prompts.txt and concept.json
        folder = root / "benchmark_dataset" / "pet_dog1"
        (folder / "prompts.txt").write_text("Photo of a {}.\n")
        (folder / "concept.json").write_text('{"token": "sks"}')
        root = root / "benchmark_dataset"
    else:
        (root / "dataset.json").write_text(good if spec in ("empty prompts", "a prompt without {}") else spec)
    from prkit.data import ConceptDataError

    with pytest.raises(ConceptDataError, match=match):
        ev.load_customconcept101(root, token="sks")


def test_a_method_or_subject_named_twice_runs_once_and_ci_over_is_checked_first():
    assert ev.job_list(["lora", "residuals", "lora"], ["dog", "dog", "cat"]) == [
        ("lora", "dog"), ("lora", "cat"), ("residuals", "dog"), ("residuals", "cat")]
    with pytest.raises(ValueError, match="EvalConfig.ci_over must be 'image' or 'subject', got 'subjects'"):
        EvalConfig(ci_over="subjects")


def test_one_method_or_subject_given_as_a_string_is_one_name_not_its_letters(assets, tmp_path):
    """EvalConfig(methods="residuals") was refused as "unknown method 'r'", subjects="dog" as unknown subjects
    ['d', 'o', 'g']; methods=() ran nothing and wrote an empty table."""
    config = _config(assets, tmp_path, methods="residuals", subjects="dog")
    assert config.methods == ("residuals",) and config.subjects == ("dog",)
    assert [s.name for s in ev.load_subjects(config)] == ["dog"]
    assert _config(assets, tmp_path, methods=["base", "lora"]).methods == ("base", "lora")
    assert _config(assets, tmp_path, subjects=None).subjects == ()  # all, as before
    with pytest.raises(ValueError, match="EvalConfig.methods is empty: name one or more of base, residuals"):
        _config(assets, tmp_path, methods=())


def test_recipe_overrides_training_would_refuse_are_refused_before_any_job(assets, tmp_path, monkeypatch, capsys):
    """--methods base residuals --set residuals.steps=0 ran every base job, then stopped at residuals' first:
    TrainConfig checked the overrides only when the method's first job built it."""
    from prkit.cli import main

    monkeypatch.setattr(ev, "run_job", lambda *a, **k: pytest.fail("a job ran"))
    for train, match in [({"residuals": {"steps": 0}}, r"TrainConfig\.steps must be a whole number >= 1, got 0"),
                         ({"lora": {"learning_rate": "fast"}}, "learning_rate must be a positive number"),
                         ({"residuals": {"stepz": 3}}, "unexpected keyword argument 'stepz'"),
                         ({"vico": {}}, "no recipe for target 'vico'; known: residuals"),
                         ({"lora": 5}, r"EvalConfig\.train\['lora'\] must be a dict")]:
        with pytest.raises(ValueError, match=match):
            _config(assets, tmp_path, methods=("base", "residuals"), train=train)
    assert main(["eval", *_cli_dataset(assets, tmp_path), "--methods", "base", "residuals", "--set",
                 "residuals.rank=2.5", "--out", str(tmp_path / "out")]) == 2
    assert "the residuals recipe's overrides (EvalConfig.train['residuals'], --set residuals.FIELD=VALUE): " \
           "TrainConfig.rank 2.5 is neither" in _error_line(capsys)
    assert not (tmp_path / "out").exists()
    # what the jobs fill in is no error here: a prior-images folder per subject, base's (unused) overrides
    _config(assets, tmp_path, train={"dreambooth": {"prior_images": "class/{subject}"}, "base": {"steps": 0}})


def test_results_and_summaries_are_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """Under an ASCII locale a subject or prompt such as 'café' raised UnicodeEncodeError after the job had trained:
    the CSVs were opened in the locale's encoding. (Here: every text open without an encoding reads as ASCII.)"""
    import builtins

    import prkit.eval_results as results

    def ascii_open(file, mode="r", *args, **kwargs):
        if "b" not in mode and len(args) < 2:
            kwargs.setdefault("encoding", "ascii")
        return builtins.open(file, mode, *args, **kwargs)
    monkeypatch.setattr(results, "open", ascii_open, raising=False)
    path = tmp_path / "out" / ev.RESULTS
    ev.append_rows(path, [_row("lora", "café", prompt="a sks dog in a café")])
    assert ev.read_rows(path)[0]["subject"] == "café"
    assert "café".encode("utf-8") in path.read_bytes()


def test_settings_hold_the_folders_and_dtype_as_they_ran(tmp_path, monkeypatch):
    """settings.json kept paths as typed and the dtype as None: the same '--model m' from another folder (another
    model) was accepted into the same --out, and '--dtype fp32' against the default on a CPU refused as different."""
    out, a, b = tmp_path / "out", tmp_path / "a", tmp_path / "b"
    for folder in (a / "m", b / "m"):
        folder.mkdir(parents=True)
    done = {("residuals", "dog")}
    monkeypatch.chdir(a)
    first = ev.check_settings(out, EvalConfig(model="m", data="m"), set(), dtype="float32")
    assert first["model"] == str(a / "m") and first["dtype"] == "float32"
    out.mkdir()
    ev.write_settings(out, first)
    assert ev.check_settings(out, EvalConfig(model="m", data="m", dtype="fp32"), done, dtype="float32")
    monkeypatch.chdir(b)
    with pytest.raises(ValueError, match=r"model \(.*a/m.* there, .*b/m.* now\)"):
        ev.check_settings(out, EvalConfig(model="m", data="m"), done, dtype="float32")
    monkeypatch.chdir(a)
    with pytest.raises(ValueError, match=r"dtype \('float32' there, 'bfloat16' now\)"):  # a CPU run resumed on a GPU
        ev.check_settings(out, EvalConfig(model="m", data="m"), done, dtype="bfloat16")


def test_a_rerun_scored_with_other_backbones_is_refused(assets, tmp_path):
    """settings.json did not say which metric backbones scored: a rerun where DINO ('auto', or a folder) no longer
    loaded added rows without DINO to rows with it, and the summary gave the one subject's DINO for both."""
    import shutil

    dino = Path(shutil.copytree(assets["dino"], tmp_path / "dino"))
    out = tmp_path / "out"
    config = _config(assets, out, methods=("base",), dino=str(dino))
    ev.evaluate(config, tiny_pipeline(tmp_path / "pipe"), progress=False)
    assert json.loads((out / "settings.json").read_text())["backbones"] == {
        "clip": str(Path(assets["clip"]).resolve()), "dino": str(dino.resolve())}
    rows, there = ev.read_rows(out / ev.RESULTS), re.escape(repr(str(dino.resolve())))
    (dino / "config.json").rename(tmp_path / "config.json")  # DINO is no longer loadable here
    ev.evaluate(config, tiny_pipeline(tmp_path / "pipe"), progress=False)  # nothing left to score: summarized again
    assert ev.read_rows(out / ev.RESULTS) == rows and json.loads((out / "settings.json").read_text())["backbones"] == {
        "clip": str(Path(assets["clip"]).resolve()), "dino": str(dino.resolve())}  # the rows' backbones stay said
    more = replace(config, subjects=("dog", "teapot"))
    with pytest.raises(ValueError, match=rf"other metric backbones: DINO \({there} there, none \(off, or "
                                         r"not loadable: see the warning above\) now\).*or pass another --out"):
        ev.evaluate(more, tiny_pipeline(tmp_path / "pipe"), progress=False)
    assert ev.read_rows(out / ev.RESULTS) == rows  # nothing ran
    (tmp_path / "config.json").rename(dino / "config.json")
    ev.evaluate(more, tiny_pipeline(tmp_path / "pipe"), progress=False)
    scored = {r["subject"] for r in ev.read_rows(out / ev.RESULTS) if math.isfinite(float(r["dino"]))}
    assert scored == {"dog", "teapot"}
    # the other way round: rows without a metric are not topped up with rows that have it
    done, settings = ev.finished_pairs(out), json.loads((out / "settings.json").read_text())
    ev.write_settings(out, {**settings, "backbones": {**settings["backbones"], "dino": None}})
    with pytest.raises(ValueError, match=rf"DINO \(none \(off, .*\) there, {there} now\)"):
        ev.check_settings(out, more, done, "float32", settings["backbones"])
    assert ev.check_settings(out, more, done, "float32")  # a caller that does not say: not compared


def test_ranks_with_other_backbones_are_refused():
    """Each rank loaded its own backbones: a rank on a machine without the CLIP cache wrote rows without CLIP into
    the same table as the others."""
    class TwoRanks:
        def __init__(self, other):
            self.other = other

        def get_world_size(self):
            return 2

        def all_gather_object(self, every, mine):
            every[:] = [mine, self.other]

    mine = {"clip": "/m/clip", "dino": None}
    assert ev.same_backbones(None, mine) is mine and ev.same_backbones(TwoRanks(dict(mine)), mine) == mine
    with pytest.raises(ValueError, match=r"rank 0 \{'clip': '/m/clip', 'dino': None\}, rank 1 \{'clip': None, "
                                         r"'dino': None\}.*reachable from every rank"):
        ev.same_backbones(TwoRanks({"clip": None, "dino": None}), mine)


def test_run_json_records_the_revisions_of_the_model_and_backbones(assets, tmp_path):
    """run.json named the base model and the backbones as typed: a hub repo or a folder that changed between two
    runs gave results that could not be told apart. It records what each name stood for (prkit.revisions)."""
    from prkit.revisions import model_revision

    model, out = tmp_path / "model", tmp_path / "out"
    tiny_pipeline(tmp_path / "build").save_pretrained(str(model))
    config = _config(assets, out, methods=("base",), model=str(model))
    ev.evaluate(config, progress=False)  # the runner loads the model itself
    run = json.loads((out / "run.json").read_text())
    want = {"model": model_revision(model), "clip": model_revision(assets["clip"]),
            "dino": model_revision(assets["dino"])}
    assert run["revisions"] == want and want["model"]["kind"] == "folder" and want["dino"]["fingerprint"]
    assert run["ranks"][0]["model_revision"] == want["model"]
    # nothing left to run (a pipeline given, unused): the record of the run that made the rows stays
    ev.evaluate(config, tiny_pipeline(tmp_path / "unused"), progress=False)
    assert json.loads((out / "run.json").read_text())["revisions"] == want
    # ... also where a backbone's revision is not known this time (it scored the rows: its record stays)
    real_init = ev.Scorer.__init__

    def unknown(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.revisions = {"clip": None, "dino": None}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ev.Scorer, "__init__", unknown)
        ev.evaluate(config, tiny_pipeline(tmp_path / "unused2"), progress=False)
    assert json.loads((out / "run.json").read_text())["revisions"] == want
    ev.evaluate(replace(config, subjects=("dog", "teapot")), tiny_pipeline(tmp_path / "built"), progress=False)
    assert json.loads((out / "run.json").read_text())["revisions"]["model"] is None  # new rows, by a model unknown
    ev.evaluate(_config(assets, tmp_path / "mem", methods=("base",), dino=None), tiny_pipeline(tmp_path / "pipe"),
                progress=False)  # a pipeline built in memory, DINO off: unknown, not a failure
    assert json.loads((tmp_path / "mem" / "run.json").read_text())["revisions"] == {
        "model": None, "clip": want["clip"], "dino": None}


@pytest.mark.parametrize("name", ["download_backbones", "save_images"])
def test_switches_that_are_no_bool_are_refused(name):
    """papermill's -p download_backbones false (notebook 06) gives the string 'false', which is truthy: the scorer
    fetched CLIP and DINO from the hub although the user had said no. Refused, naming the field."""
    with pytest.raises(ValueError, match=rf"EvalConfig.{name} must be True or False, got 'false' "
                                         rf"\(papermill: -p {name} False\)"):
        EvalConfig(**{name: "false"})
    assert getattr(EvalConfig(**{name: True}), name) is True


def test_notebook_06s_download_switch_as_a_string_loads_nothing(monkeypatch):
    from types import SimpleNamespace

    import prkit.metrics
    from prkit.run_metrics import score_residuals

    monkeypatch.setattr(prkit.metrics, "try_load_clip", lambda *a, **k: pytest.fail("a backbone was loaded"))
    pipe = SimpleNamespace(unet=SimpleNamespace(device=torch.device("cpu")))
    residuals = SimpleNamespace(token="sks", class_word="dog", name="dog")
    with pytest.raises(ValueError, match="EvalConfig.download_backbones must be True or False, got 'false'"):
        score_residuals(pipe, residuals, None, download="false")


def test_settings_record_the_dtype_of_the_pipeline_given(assets, tmp_path, monkeypatch):
    """evaluate(config, pipe) recorded the dtype the config would load at (float32 on a CPU), not the given pipeline's:
    rows a bfloat16 pipeline made were taken for float32 ones, and a float32 rerun into the same --out was let in."""
    out = tmp_path / "out"
    pipe = tiny_pipeline(tmp_path / "pipe").to(torch.bfloat16)
    monkeypatch.setattr(ev, "run_job", lambda pipe, subject, method, *a, **k: [
        _row(method, subject.name, clip_i=0.5)])
    ev.evaluate(_config(assets, out, methods=("base",), clip=None, dino=None), pipe, progress=False)
    assert json.loads((out / "settings.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"dtype \('bfloat16' there, 'float32' now\)"):
        ev.evaluate(_config(assets, out, methods=("base",), clip=None, dino=None), tiny_pipeline(tmp_path / "p2"),
                    progress=False)


def test_reference_photos_with_transparency_or_16_bits_are_scored_as_training_loads_them(tmp_path):
    """The scorer's full-size reference photos go to RGB as ``load_concept`` takes them (transparency on white, a
    16-bit photo scaled): Pillow's convert('RGB') made a cut-out's background black and a 16-bit photo almost all
    white, so CLIP-I and DINO compared the samples with other images than the ones trained on."""
    from prkit.data import load_concept
    from prkit.eval_scorer import _reference_images
    from prkit.images import _to_rgb

    cutout = Image.new("RGBA", (40, 48), (0, 0, 0, 0))
    cutout.paste((200, 10, 10, 255), (10, 10, 30, 30))
    cutout.save(tmp_path / "a.png")
    Image.fromarray(np.linspace(0, 65535, 40 * 48).reshape(48, 40).astype(np.uint16)).save(tmp_path / "b.png")
    with pytest.warns(UserWarning, match="2 usable image"):
        concept = load_concept(tmp_path, "sks", "dog", 32)
    refs = _reference_images(concept)
    assert [im.mode for im in refs] == ["RGB", "RGB"] and refs[0].size == (40, 48)
    for path, im in zip(sorted(tmp_path.glob("*.png")), refs):
        with Image.open(path) as original:
            assert np.array_equal(np.asarray(im), np.asarray(_to_rgb(original, original.format))), path.name
    assert np.asarray(refs[0])[0, 0].tolist() == [255, 255, 255]  # the transparent corner: white, not black


def test_customconcept101_concepts_of_one_name_or_without_their_folder_are_refused_up_front(tmp_path):
    """Two concept folders of one name (a/dog1, b/dog1) ran as one subject: the harness keys subjects by name, so
    one concept was silently never evaluated and the table said 1 subject. A missing image folder was refused only
    at that concept's first job, after the jobs before it had run."""
    from prkit.data import ConceptDataError

    root = tmp_path / "cc101"
    _images(root / "a" / "dog1")
    _images(root / "b" / "dog1")
    (root / "prompts").mkdir()
    (root / "prompts" / "dog.txt").write_text("Photo of a {}.\n")

    def entries(*folders):
        (root / "dataset.json").write_text(json.dumps([{"instance_data_dir": f, "class_prompt": "dog",
                                                         "prompt_filename": "prompts/dog.txt"} for f in folders]))
        return ev.load_customconcept101(root, token="sks")

    assert [s.name for s in entries("a/dog1")] == ["dog1"]
    with pytest.raises(ConceptDataError, match=r"two concepts are named 'dog1'.*a/dog1' and '.*b/dog1'"):
        entries("a/dog1", "b/dog1")
    with pytest.raises(ConceptDataError, match="two concepts are named 'dog1'"):
        entries("a/dog1", "./a/dog1")  # one folder listed twice
    entries("a/dog1", "a/dog2")  # a folder not there: refused for the subjects run, before any job
    config = EvalConfig(protocol="customconcept101", data=str(root))
    with pytest.raises(ConceptDataError, match=r"image folder '.*a/dog2' of subject 'dog2' does not exist; fix the "
                                               r"path .*instance_data_dir in dataset\.json.*--subjects"):
        ev.load_subjects(config)
    assert [s.name for s in ev.load_subjects(replace(config, subjects=("dog1",)))] == ["dog1"]  # a partial dataset


def test_world_protocol_grades_a_mirrored_striped_concept_as_the_concept():
    """prkit eval's world grading, as python -m prkit.world.bench's: the residuals train on flipped references and
    draw the stripes mirrored too, which the oracle read as another pattern (an identity failure)."""
    from types import SimpleNamespace

    from prkit.eval_scorer import Scorer
    from prkit.eval_subjects import Subject
    from prkit.world.concepts import EXAMPLE_CONCEPTS, render_concept
    from prkit.world.oracle import load_oracle

    mirrored = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in render_concept("striped_ball", 2, seed=4)]
    config = EvalConfig(protocol="world", clip=None, dino=None, device="cpu")
    subject = Subject("striped_ball", "sks", "ball", ["a photo of a sks ball"], None,
                      world=EXAMPLE_CONCEPTS["striped_ball"])
    concept = SimpleNamespace(paths=[], images=[])
    rows = Scorer(config, "cpu", oracle=load_oracle()).score(subject, concept, [mirrored], [mirrored])
    assert [(r["identity"], r["identity_colors"]) for r in rows] == [(True, True), (True, True)]
