"""The command line's flags and words: -v after the command, --num-images' bounds, --lag-threshold without
--residuals, and messages that name flags (and leave eval --set's field names as the library spells them)."""

from __future__ import annotations

import pytest

from prkit.cli import build_parser

COMMANDS = (["train", "--images", "imgs", "--out", "x.safetensors"], ["sample", "--prompt", "a photo"],
            ["info", "x.safetensors"], ["export", "x.safetensors", "--out", "y.safetensors"], ["eval"])


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_verbose_goes_before_or_after_the_command(command):
    """`prkit train ... -v` was refused ("unrecognized arguments: -v"): only `prkit -v train ...` took it."""
    parser = build_parser()
    assert parser.parse_args(command).verbose is False
    for flag in ("-v", "--verbose"):
        assert parser.parse_args([flag, *command]).verbose is True  # the existing form
        assert parser.parse_args([*command, flag]).verbose is True
        assert parser.parse_args([flag, *command, flag]).verbose is True


def test_num_images_is_refused_past_its_bounds_before_any_model_loads(tmp_path, capsys):
    """--num-images had no upper bound: 10**9 passed the parser, loaded the model, then asked for one batch of a
    billion images."""
    from prkit.cli import main

    sample = ["sample", "--model", str(tmp_path / "never-loaded"), "--prompt", "a photo", "--out", str(tmp_path / "s")]
    for value, said in (("10001", "must be at most 10000 images per prompt (one batch), got 10001; "),
                        ("1000000000", "must be at most 10000 images per prompt (one batch), got 1000000000; "),
                        ("0", "must be at least 1 image per prompt, got 0; e.g. 4"),
                        ("-3", "must be at least 1 image per prompt, got -3; e.g. 4"),
                        ("many", "expected a whole number of images per prompt such as 4, got 'many'")):
        with pytest.raises(SystemExit) as err:
            main(sample + ["--num-images", value])
        message = capsys.readouterr().err
        assert err.value.code == 2 and f"argument --num-images: {said}" in message, message
    with pytest.raises(SystemExit):
        main(sample + ["--num-images", "10001"])
    assert "for more, run the command again with another --seed" in capsys.readouterr().err
    for value in ("1", "4", "10000"):  # the valid range is as before
        assert build_parser().parse_args(sample[:-2] + ["--num-images", value]).num_images == int(value)
    assert build_parser().parse_args(sample).num_images == 4


def test_all_prompts_images_together_are_capped_before_any_model_loads(tmp_path, capsys):
    """The cap is on one batch, and prkit sample makes every prompt's images in one: two prompts of 10000 each asked
    for 20000 at once."""
    from prkit.cli import main

    sample = ["sample", "--model", str(tmp_path / "never-loaded"), "--prompt", "a photo", "--prompt", "a dog",
              "--out", str(tmp_path / "s")]
    assert main(sample + ["--num-images", "5001"]) == 2
    err = capsys.readouterr().err
    assert "2 --prompt x --num-images 5001 asks for 10002 images in one batch, more than 10000" in err, err
    assert "never-loaded" not in err  # refused before the model (a missing folder) is looked at
    assert main(sample + ["--num-images", "5000"]) == 2  # within the cap: on to the model, which is missing
    assert "never-loaded" in capsys.readouterr().err


def test_lag_threshold_without_residuals_is_said_to_do_nothing(tmp_path, capsys):
    """--lag-threshold without --residuals samples the base model (LAG places residual sets only): the flag did
    nothing, without a word. Said before the model loads, naming both flags; the run goes on, as with --no-lag."""
    import prkit
    from prkit.cli import main
    from tiny import tiny_unet

    sample = ["sample", "--model", str(tmp_path / "never-loaded"), "--prompt", "a photo of a sks dog", "--out",
              str(tmp_path / "s")]
    note = "prkit sample: note: --lag-threshold otsu has no effect without --residuals"
    for extra in ([], ["--no-lag"], ["--lora", str(tmp_path / "style.safetensors")]):
        assert main(sample + ["--lag-threshold", "otsu", *extra]) == 2  # (the model is missing: it goes on to that)
        err = capsys.readouterr().err
        assert err.count("note:") == 1 and note in err, err
    residuals = prkit.add_residuals(tiny_unet(), rank=2, token="sks").save(tmp_path / "sks.safetensors")
    assert main(sample + ["--lag-threshold", "otsu", "--residuals", str(residuals)]) == 2
    assert "note:" not in capsys.readouterr().err
    assert main(sample) == 2  # the default threshold: nothing to say
    assert "note:" not in capsys.readouterr().err
    assert main(sample + ["--lag-threshold", "otsu", "--residuals", str(residuals), "--no-lag"]) == 2
    assert "note: --lag-threshold otsu has no effect with --no-lag" in capsys.readouterr().err  # as before


def test_eval_set_keeps_the_library_field_names_train_says_its_flags(tmp_path, capsys):
    """The command line's rewording of library words (checkpoint_dir -> --checkpoint-dir) also hit eval's --set,
    whose fields are the library's names: its list of fields said '--checkpoint-dir', which --set refuses."""
    from prkit.cli import main
    from prkit.cli_output import _cli_words
    from prkit.evaluate import _recipe_fields

    assert main(["eval", "--set", "dreambooth.nope=1", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "'nope' is not a recipe field; one of " in err
    fields = err.split("one of ")[1].split()
    assert [f.strip(",") for f in fields] == _recipe_fields()  # checkpoint_dir, mixed_precision, ... as --set takes
    assert main(["eval", "--set", "nomethod.resume=False", "--out", str(tmp_path / "e")]) == 2
    assert "--set 'nomethod.resume=False': 'nomethod' is not a method" in capsys.readouterr().err
    # prkit train has these flags: its messages still name them
    said = _cli_words("pass another checkpoint_dir, or pass resume=False (CLI: --no-resume)", "train")
    assert said == "pass another --checkpoint-dir, or pass --no-resume"


def test_messages_from_the_library_name_the_flags_that_do_the_same(tmp_path, capsys):
    """Messages the command line passes on from the library named Python calls where a flag does the same: train
    --resolution far from the model's told to call load_concept(..., resolution=N), a checkpoint past the run's
    steps said "steps=1", an interrupted --no-resume run "call again with resume=True", and sample --dtype bf16 on
    the CPU "dtype=None". The library's own messages, for Python users, are left as they were."""
    import numpy as np
    from PIL import Image

    import prkit
    from prkit import checkpoints
    from prkit.cli import main
    from prkit.cli_output import _cli_words
    from prkit.train_config import TrainConfig
    from tiny import tiny_pipeline

    model, images = tmp_path / "model", tmp_path / "images"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)  # 16px images
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    train = ["train", "--model", str(model), "--images", str(images), "--token", "sks", "--class-word", "dog",
             "--out", str(tmp_path / "x.safetensors"), "--resolution", "32", "--rank", "2", "--device", "cpu"]
    with pytest.warns(UserWarning, match="native resolution") as seen:
        assert main(train + ["--steps", "2"]) == 0
    warned = next(str(w.message) for w in seen if "native resolution" in str(w.message))
    assert "load_concept(..., resolution=16) (prkit.native_resolution(pipe))" in warned
    assert _cli_words(warned, "train").endswith("off the model's distribution; pass --resolution 16, the model's "
                                                "native size (or leave --resolution out)")
    capsys.readouterr()
    assert main(train + ["--steps", "1", "--overwrite"]) == 2  # its checkpoint holds 2 steps
    err = capsys.readouterr().err
    assert "past this run's --steps 1: ask for at least 2 steps to continue it" in err and "steps=" not in err
    hint = checkpoints.resume_hint(TrainConfig(resume=False))
    assert "resume=True" in hint
    assert _cli_words(hint, "train") == ("run the command again without --no-resume to resume; with --no-resume "
                                         "it would start over again")  # as prkit train's own line says it
    with pytest.warns(UserWarning, match="on the CPU") as seen:
        prkit.load_pipeline(model, device="cpu", dtype="bf16")
    warned = str(seen[0].message)
    assert "(the CPU default, dtype=None)" in warned
    for command in ("sample", "eval"):  # the commands with --dtype
        assert _cli_words(warned, command).endswith("slower than fp32 (the CPU default: leave --dtype out)")


def test_eval_images_per_prompt_is_capped_in_the_parser(tmp_path, capsys):
    """Each prompt's images are one batch; --images-per-prompt had no upper bound."""
    from prkit.cli import main

    with pytest.raises(SystemExit) as err:
        main(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "e"), "--images-per-prompt", "10001"])
    assert err.value.code == 2 and "argument --images-per-prompt: must be at most 10000, got 10001" in \
        capsys.readouterr().err


def test_a_negative_prompt_without_guidance_is_said_to_do_nothing(tmp_path, capsys, pipe):
    """diffusers uses the negative prompt only for classifier-free guidance, which is off at --guidance-scale 1 or
    less: `--negative-prompt blurry --guidance-scale 1` made the same images as without it, without a word."""
    import numpy as np

    import prkit
    from prkit.cli import main

    call = dict(steps=2, seed=0, guidance_scale=1.0, output_type="np")
    plain = prkit.generate(pipe, "a photo of a dog", **call)
    assert np.array_equal(prkit.generate(pipe, "a photo of a dog", negative_prompt="snow", **call), plain)
    assert not np.array_equal(prkit.generate(pipe, "a photo of a dog", negative_prompt="snow",
                                             **{**call, "guidance_scale": 2.0}),
                              prkit.generate(pipe, "a photo of a dog", **{**call, "guidance_scale": 2.0}))
    sample = ["sample", "--model", str(tmp_path / "never-loaded"), "--prompt", "a photo", "--out", str(tmp_path / "s")]
    for scale in ("1", "0", "0.5"):
        assert main(sample + ["--negative-prompt", "blurry", "--guidance-scale", scale]) == 2  # (the model: missing)
        err = capsys.readouterr().err
        assert (f"prkit sample: note: --negative-prompt has no effect with --guidance-scale {scale}: guidance, "
                "which uses it, is off at 1 or less") in err, err
    for extra in (["--negative-prompt", "blurry"], ["--negative-prompt", "blurry", "--guidance-scale", "1.5"],
                  ["--guidance-scale", "1"]):
        assert main(sample + extra) == 2
        assert "note:" not in capsys.readouterr().err


def test_every_option_with_a_default_says_it_in_its_help():
    """`prkit eval --help` listed --out, --methods, --protocol, --token, --device and --ci-over without a word (a
    run without --out wrote into runs/eval, nowhere said), export's --dtype fp16 and sample's --out samples
    likewise; train's --checkpoint-every 50, --model world and --mixed-precision auto were not said to be defaults."""
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    unsaid = []
    for name, command in commands.items():
        for action in command._actions:
            default = action.default
            if default in (None, [], argparse.SUPPRESS) or isinstance(default, bool):  # flags, and "not given"
                continue
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            if not ("default" in (action.help or "") and shown in action.help):
                unsaid.append(f"{name} {action.option_strings[0]}")
    assert unsaid == []
    help_text = " ".join(commands["eval"].format_help().split())
    assert "--out OUT results folder (default: runs/eval)" in help_text, help_text
    assert "(default: residuals lora custom_diffusion textual_inversion dreambooth" in help_text, help_text
