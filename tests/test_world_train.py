"""CPU smoke test of the world recipe (prkit.world.train) with tiny settings; CI never retrains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prkit.world import train as W


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Every stage once on the CPU: 48 + 16 renders, 2 steps per training stage, 3 eval prompts."""
    out = tmp_path_factory.mktemp("world_recipe")
    cfg = W.RecipeConfig.smoke(seed=0)
    results = W.run(list(W.STAGES), out, cfg, torch.device("cpu"))
    return out, cfg, results


def test_render_pool_is_deterministic_and_chunked():
    a, ca = W.render_pool(3, 0, 10, chunk=4, patterns=False, workers=0)
    b, cb = W.render_pool(3, 0, 10, chunk=4, patterns=False, workers=0)
    assert a.shape == (10, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ca == cb
    c, _ = W.render_pool(3, 0, 4, chunk=4, patterns=False, workers=0)  # first chunk does not depend on n
    assert np.array_equal(a[:4], c)
    d, _ = W.render_pool(4, 0, 4, chunk=4, patterns=False, workers=0)
    assert not np.array_equal(c, d)


def test_architecture_contract():
    from diffusers import UNet2DConditionModel

    cfg = W.unet_config()
    unet = UNet2DConditionModel(**cfg)
    blocks = [n for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
    convs = [m.proj_out for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
    assert all(isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1) for c in convs)
    widths = {c.in_channels for c in convs}
    assert len(widths) >= 2  # cross-attention at two or more resolutions
    assert cfg["cross_attention_dim"] == 128 and not cfg["use_linear_projection"]
    assert len(blocks) == 7
    tok = W.load_tokenizer()
    te = W.build_text_encoder(tok)
    assert te.config.vocab_size == len(tok) and te.config.hidden_size == 128
    assert te.config.max_position_embeddings == tok.model_max_length == 32


def test_caption_tokenization_dedup_matches_tokenizer():
    tok = W.load_tokenizer()
    caps = ["a photo of a red ball on the grass", "", "a blue box next to a green star in the snow",
            "a photo of a red ball on the grass"]
    ids = W.tokenize(tok, caps)
    ref = tok(caps, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ref)


def test_recipe_end_to_end(recipe):
    out, cfg, results = recipe
    assert set(results) == set(W.STAGES)
    for stage in W.STAGES:
        assert json.loads((out / "metrics" / f"{stage}.json").read_text())["wall_seconds"] >= 0
    assert results["data"]["n_images"] == cfg.n_images
    assert np.isfinite(results["vae"]["scaling_factor"]) and results["vae"]["scaling_factor"] > 0
    assert np.isfinite(results["unet"]["loss_last"])
    base = results["eval"]["base"]
    assert 0 <= base["single"]["scene"] <= 1 and "two" in base
    assert results["export"]["total_mb"] <= W.SIZE_LIMIT_MB
    # oracle_vae keeps the render-trained oracle and writes the fine-tuned one
    assert (out / "oracle_renders.safetensors").exists() and (out / "oracle.safetensors").exists()
    assert "after_vae" in results["oracle_vae"]


def test_exported_folder_is_a_standard_fp16_pipeline(recipe):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from safetensors import safe_open

    out, _, _ = recipe
    folder = out / "model"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for sub in ("unet", "vae", "text_encoder"):
        files = list((folder / sub).glob("*.safetensors"))
        assert len(files) == 1 and "fp16" not in files[0].name  # variant-less
        with safe_open(str(files[0]), "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    assert (folder / "tokenizer" / "vocab.json").exists() and (folder / "tokenizer" / "merges.txt").exists()
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.vae.config.scaling_factor != 1.0
    img = pipe("a photo of a red ball on the grass", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)
    # text encoder stored under SD's key names, and loaded back exactly (not re-initialised)
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
        emb = f.get_tensor("text_model.embeddings.token_embedding.weight").float()
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, emb)


def test_resume_continues_the_schedule(recipe):
    out, cfg, _ = recipe
    info = W.stage_unet(cfg, out, torch.device("cpu"), resume=True)
    assert info["resumed"] and info["step_total"] == 2 * cfg.unet_steps


def test_identifier_embeddings_are_untouched_by_training(recipe, tmp_path):
    out, cfg, _ = recipe
    tok = W.load_tokenizer()
    ckpt = torch.load(out / "ckpt" / "unet_train.pt", map_location="cpu")
    torch.manual_seed(cfg.seed)
    W.build_unet()  # the recipe builds the UNet first, then the text encoder, from the same seed
    key = next(k for k in ckpt["te"] if k.endswith("embeddings.token_embedding.weight"))
    init = W.build_text_encoder(tok).state_dict()[key]
    trained = ckpt["te"][key]
    sks = tok.convert_tokens_to_ids("sks</w>")
    red = tok.convert_tokens_to_ids("red</w>")
    assert torch.equal(trained[sks], init[sks])
    assert not torch.equal(trained[red], init[red])


def test_diffusion_pool_names_patterns_and_never_shows_an_example_concept():
    from prkit.world.concepts import EXAMPLE_CONCEPTS
    from prkit.world.render import sample_scene
    from prkit.world.vocab import PATTERN_WORDS

    _, caps = W.render_pool(0, 0, 200, chunk=100, patterns=0.5, workers=0)
    named = [c for c in caps if any(w in c.split() for w in PATTERN_WORDS.values())]
    assert 0.3 < len(named) / len(caps) < 0.8
    rng = np.random.default_rng(0)
    held_out = {(c.class_word, c.pattern, frozenset(c.colors)) for c in EXAMPLE_CONCEPTS.values()}
    seen = set()
    for _ in range(3000):
        obj = sample_scene(rng, n_objects=1).objects[0]
        obj.cls, obj.color = "ball", "red"
        W._random_pattern(obj, rng)
        seen.add((obj.cls, obj.pattern, frozenset((obj.color, obj.color2))))
    assert not seen & held_out and len(seen) > 20


def test_summary_dropout_replaces_only_the_end_token_of_dropped_rows():
    cond = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    empty = torch.full((1, 3, 2), -1.0)
    out = W.summary_dropout(cond, empty, torch.tensor([True, False]))
    assert torch.equal(out[0, -1], torch.tensor([-1.0, -1.0])) and torch.equal(out[0, :-1], cond[0, :-1])
    assert torch.equal(out[1], cond[1])


def test_eos_dropout_needs_left_padding(recipe):
    from dataclasses import replace

    out, cfg, _ = recipe
    with pytest.raises(ValueError, match="pad_side='left'"):
        W.stage_unet(replace(cfg, eos_dropout=0.5), out, torch.device("cpu"))


def test_left_padded_recipe_ships_a_tokenizer_whose_pads_carry_nothing(recipe, tmp_path, monkeypatch):
    """pad_side='left': the UNet stage tokenizes on the left and drops end tokens, and the exported folder pads on
    the left, so the text encoder's pad outputs (causal attention sees only pads before them) are the same for every
    caption; the words sit at the end, after them. A warm start from that folder keeps the side."""
    import shutil
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline

    from prkit.world import train_unet

    out, cfg, _ = recipe
    work = tmp_path / "w"
    shutil.copytree(out, work, ignore=shutil.ignore_patterns("model", "ckpt"))
    sides, drops = [], []
    tokenize, dropout = train_unet.tokenize, train_unet.summary_dropout
    monkeypatch.setattr(train_unet, "tokenize", lambda tok, caps: (sides.append(tok.padding_side), tokenize(tok, caps))[1])
    monkeypatch.setattr(train_unet, "summary_dropout", lambda c, e, d: (drops.append(d.clone()), dropout(c, e, d))[1])
    W.run(["unet", "export"], work, replace(cfg, pad_side="left", eos_dropout=0.5), torch.device("cpu"))
    assert sides and set(sides) == {"left"}
    assert len(drops) == cfg.unet_steps and all(d.shape == (cfg.unet_batch,) for d in drops)
    pipe = StableDiffusionPipeline.from_pretrained(work / "model", torch_dtype=torch.float32)
    tok = pipe.tokenizer
    assert tok.padding_side == "left"
    prompts = ["a photo of a red ball", "a photo of a blue box on the grass"]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    assert (ids[:, -1] == tok.eos_token_id).all() and (ids[:, 0] == tok.pad_token_id).all()
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    n_pads = int((ids[1] == tok.pad_token_id).sum()) - 1  # the longer caption's pads (its end token excluded)
    torch.testing.assert_close(emb[0, :n_pads], emb[1, :n_pads])
    assert not torch.allclose(emb[0, -1], emb[1, -1])  # the end token still reads its caption
    img = pipe(prompts[0], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    # continuing that model without naming a side keeps it (a right-padded export would break its text encoder)
    sides.clear()
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("model", "ckpt"))
    W.run(["unet", "export"], again, cfg, torch.device("cpu"), init_from=work / "model")
    assert set(sides) == {"left"}
    assert StableDiffusionPipeline.from_pretrained(again / "model").tokenizer.padding_side == "left"


def test_pad_side_follows_what_a_run_continues(tmp_path):
    assert W.resolve_pad_side(None, None, None) == "right"  # runs 1-5
    assert W.resolve_pad_side("left", None, None) == "left"
    folder = tmp_path / "model"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"padding_side": "left"}))
    assert W.resolve_pad_side(None, None, folder) == "left"
    assert W.resolve_pad_side("right", None, folder) == "right"  # a warm start may switch, when asked
    state = {"config": {"pad_side": "left"}}
    assert W.resolve_pad_side(None, state, None) == "left"
    with pytest.raises(ValueError, match="pad_side='left', not 'right'"):
        W.resolve_pad_side("right", state, None)  # a resumed run may not
    assert W.resolve_pad_side(None, {"config": {}}, None) == "right"  # checkpoints of runs 1-5


def test_set_values_of_fields_without_a_default_parse_as_numbers_or_words():
    assert W._parse_value("left", None) == "left"
    assert W._parse_value("12", None) == 12 and W._parse_value("1e-3", None) == 1e-3
    assert W._parse_value("None", "right") is None


def test_stage_names_are_checked_before_any_stage_runs(tmp_path):
    cfg = W.RecipeConfig.smoke(seed=0)
    with pytest.raises(ValueError, match="unknown stage 'evl'"):
        W.run(["data", "evl"], tmp_path / "w", cfg, torch.device("cpu"))
    assert not (tmp_path / "w" / "data").exists()  # 'data' did not run first
    assert W._stages(["data", "all"]) == ["data", *W.STAGES]  # 'all' anywhere in the list
    with pytest.raises(SystemExit):
        W.main(["--stage", "data", "evl", "--out", str(tmp_path / "w")])


def test_a_stage_without_what_an_earlier_one_writes_is_refused_before_any_stage_runs(tmp_path, capsys):
    """--stage vae (or unet, export, eval) in a fresh --out ended in a FileNotFoundError traceback from numpy or
    torch.load, after the stages listed before it had run."""
    cfg = W.RecipeConfig.smoke(seed=0)
    for stages, said in [(["vae"], "data/images.npy"), (["data", "unet"], "vae/config.json"),
                         (["export"], "ckpt/unet_train.pt"), (["oracle", "eval"], "model/model_index.json")]:
        with pytest.raises(ValueError, match=f"stage {stages[-1]} reads .*{said}.*: run --stage"):
            W.run(stages, tmp_path / "w", cfg, torch.device("cpu"))
        assert not (tmp_path / "w" / "data").exists() and not (tmp_path / "w" / "metrics").exists()
    with pytest.raises(SystemExit):
        W.main(["--stage", "export", "--smoke", "--device", "cpu", "--out", str(tmp_path / "w")])
    assert "stage export reads" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["pattern_all=ture", "no_such_field=1", "n_images", "unet_lr=fast"])
def test_set_refuses_what_it_cannot_parse(tmp_path, setting, capsys):
    with pytest.raises(SystemExit):
        W.main(["--stage", "data", "--smoke", "--out", str(tmp_path / "w"), "--set", setting])
    assert setting.split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert W._parse_value("false", True) is False and W._parse_value("Yes", False) is True


def test_unet_stage_keeps_checkpoints_and_reencodes_latents_the_vae_no_longer_gives(recipe, tmp_path, caplog,
                                                                                    monkeypatch):
    import shutil

    from prkit.world import train_unet

    out, cfg, _ = recipe
    work = tmp_path / "w"
    shutil.copytree(out, work)
    cpu = torch.device("cpu")
    encodes = []
    real_encode = train_unet.encode_pool
    monkeypatch.setattr(train_unet, "encode_pool", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    before = torch.load(work / "data" / "latents.pt")
    W.stage_vae(replace_cfg(cfg, seed=1), work, cpu)  # a new VAE, as after rerunning the vae stage
    W.stage_unet(cfg, work, cpu, resume=True)
    after = torch.load(work / "data" / "latents.pt")
    assert not torch.equal(before, after) and len(encodes) == 1  # encoded again with the new VAE, not the stale file
    moved = tmp_path / "moved"
    shutil.move(str(work), str(moved))  # nothing changed but the folder's name: the stored latents are reused
    work = moved
    W.stage_unet(cfg, work, cpu, resume=True)
    assert len(encodes) == 1 and torch.equal(torch.load(work / "data" / "latents.pt"), after)
    step = torch.load(work / "ckpt" / "unet_train.pt", map_location="cpu")["step"]
    info = W.stage_unet(cfg, work, cpu)  # a new run in the same folder keeps the checkpoint it replaces
    assert not info["resumed"]
    assert torch.load(work / "ckpt" / "unet_train.previous.pt", map_location="cpu")["step"] == step
    shutil.rmtree(work / "ckpt")
    with caplog.at_level("WARNING"):
        assert not W.stage_unet(cfg, work, cpu, resume=True)["resumed"]
    assert "no checkpoint" in caplog.text


def test_oracle_stage_writes_the_weights_oracle_vae_starts_from(recipe, tmp_path):
    import shutil

    from safetensors.torch import load_file

    out, cfg, _ = recipe
    work = tmp_path / "w"
    shutil.copytree(out, work)
    W.stage_oracle(replace_cfg(cfg, seed=1), work, torch.device("cpu"))  # the oracle retrained
    new, start = load_file(str(work / "oracle.safetensors")), load_file(str(work / "oracle_renders.safetensors"))
    assert new.keys() == start.keys() and all(torch.equal(new[k], start[k]) for k in new)


def replace_cfg(cfg, **changes):
    from dataclasses import replace

    return replace(cfg, **changes)


def test_vae_stage_resumed_without_a_vae_says_it_starts_a_new_one(recipe, tmp_path, caplog):
    """It built a new VAE without a word (the UNet stage warns in that case) and gave it a resumed run's warm-up."""
    import shutil

    out, cfg, _ = recipe
    work = tmp_path / "w"
    shutil.copytree(out, work)
    shutil.rmtree(work / "vae")
    with caplog.at_level("WARNING"):
        W.stage_vae(cfg, work, torch.device("cpu"), resume=True)
    assert f"vae: --resume but no VAE at {work / 'vae'}; the VAE stage starts from a new VAE" in caplog.text
    assert (work / "vae" / "config.json").is_file()


@pytest.mark.parametrize("setting,says", [
    ("workers=four", "--set workers=four: expected an int (or None)"),  # a word: '>' not supported, in stage data
    ("vae_steps=2.5", "--set vae_steps=2.5: expected an int (or None)"),
    ("n_images=None", "--set n_images=None: n_images takes an int, not None"),  # NoneType / int in stage data
    ("pad_side=middle", "--set pad_side=middle: expected one of left, right (or None)"),
])
def test_set_reads_a_value_as_its_field_declares_it(tmp_path, setting, says, capsys, monkeypatch):
    """Fields whose default is None took any word or number (workers=four, vae_steps=2.5), and every field took
    None: the stage that used them failed with a TypeError traceback, after the stages before it had run."""
    monkeypatch.setattr(W, "run", lambda *a, **k: pytest.fail("the recipe ran"))  # the full-size data stage
    with pytest.raises(SystemExit):
        W.main(["--stage", "data", "--out", str(tmp_path / "w"), "--set", setting])
    assert says in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert W._parse_value("3", None, "workers") == 3 and W._parse_value("None", 0, "workers") is None
    assert W._parse_value("1e-3", None, "caption_drop_attributes_patterned") == 1e-3
    assert W._parse_value("left", None, "pad_side") == "left" and W._parse_value("2", 2.0, "vae_minutes") == 2.0


@pytest.mark.parametrize("setting,says", [
    ("n_images=-5", "--set n_images=-5: n_images is a count and cannot be negative; give a number >= 0"),
    ("unet_steps=-1", "--set unet_steps=-1: unet_steps is a count and cannot be negative"),
    ("vae_minutes=-0.5", "--set vae_minutes=-0.5: vae_minutes is a time in minutes and cannot be negative"),
])
def test_set_refuses_a_negative_count_or_time(tmp_path, setting, says, capsys, monkeypatch):
    """n_images=-5 failed in stage data with numpy's "negative dimensions are not allowed"; minutes=-1 trained the
    probe steps alone, without a word."""
    monkeypatch.setattr(W, "run", lambda *a, **k: pytest.fail("the recipe ran"))
    with pytest.raises(SystemExit):
        W.main(["--stage", "data", "--smoke", "--out", str(tmp_path / "w"), "--set", setting])
    assert says in capsys.readouterr().err and not (tmp_path / "w").exists()
    assert W._parse_value("0", 5, "unet_warmup") == 0 and W._parse_value("0", 2.0, "ckpt_minutes") == 0.0
    assert W._parse_value("-1", 5e-4, "unet_lr") == -1.0  # not a count or a time: as before



@pytest.mark.parametrize("minutes,says", [
    ("-1", "argument --minutes: a time in minutes cannot be negative; give a number >= 0, got '-1'"),
    ("soon", "argument --minutes: expected a number of minutes such as 30, got 'soon'"),
])
def test_minutes_refuses_a_negative_time_as_set_does(tmp_path, minutes, says, capsys, monkeypatch):
    """--set vae_minutes=-1 was refused, --minutes -1 was taken: both stages ran as a spent budget (the probe steps
    alone, without a word). 0 is still a time (as in --set)."""
    ran = []
    monkeypatch.setattr(W, "run", lambda stages, out, cfg, *a, **k: ran.append(cfg) or {})
    with pytest.raises(SystemExit):
        W.main(["--stage", "data", "--smoke", "--out", str(tmp_path / "w"), "--minutes", minutes])
    assert says in capsys.readouterr().err and not ran
    assert W.main(["--stage", "data", "--smoke", "--out", str(tmp_path / "w"), "--minutes", "0"]) == 0
    assert (ran[0].vae_minutes, ran[0].unet_minutes) == (0.0, 0.0)


@pytest.mark.parametrize("args,says", [
    (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),  # numpy's 'expected non-negative integer'
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    # nan passed the negative check (nan < 0 is False) and every budget comparison after it: a stage without end
    (["--set", "unet_minutes=nan"], "--set unet_minutes=nan: unet_minutes is a time in minutes; give a finite number"),
    (["--set", "vae_minutes=inf"], "--set vae_minutes=inf: vae_minutes is a time in minutes; give a finite number"),
    (["--minutes", "nan"], "argument --minutes: a time in minutes must be a finite number >= 0, got 'nan'"),
])
def test_seed_steps_and_times_are_checked_before_any_stage_runs(tmp_path, args, says, capsys, monkeypatch):
    monkeypatch.setattr(W, "run", lambda *a, **k: pytest.fail("the recipe ran"))
    with pytest.raises(SystemExit):
        W.main(["--stage", "data", "--smoke", "--out", str(tmp_path / "w"), *args])
    assert says in capsys.readouterr().err and not (tmp_path / "w").exists()
