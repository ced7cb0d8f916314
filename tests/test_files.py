"""Residual files: round trip, metadata, architecture checks, clear errors, kohya LoRA export."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import prkit
from conftest import ARCHS, load_lora_file, make_pipe, randomize, run_unet, unet_inputs
from prkit.files import FORMAT, export_lora, kohya_key, read_metadata
from prkit.residual_layer import ResidualProjection
from tiny import tiny_unet

ARCH_NAME = {"conv": "sd1", "linear": "sd2", "sdxl": "sd2"}  # the tiny SDXL-like UNet has no text_time embedding


def _trained(unet, rank=2):
    residuals = prkit.add_residuals(unet, rank=rank, token="sks", class_word="dog")
    randomize(residuals)
    return residuals


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn, "fp16"])
def test_saving_refuses_a_dtype_that_loading_would_refuse(tmp_path, dtype):
    residuals = _trained(tiny_unet())
    kind = "not a torch dtype" if isinstance(dtype, str) else "a dtype loading refuses"
    with pytest.raises(TypeError, match=rf"save_residuals: dtype={re.escape(repr(dtype))} is {kind}; "
                                        "pass torch.float32, torch.float16 or torch.bfloat16"):
        prkit.save_residuals(residuals, tmp_path / "r.safetensors", dtype=dtype)
    assert not (tmp_path / "r.safetensors").exists()


def test_saving_records_a_config_as_a_json_object(tmp_path):
    """A dataclass (a TrainConfig) is recorded as its fields, a mapping as itself; anything else is refused before a
    file is written (loading refuses a header whose config is not an object)."""
    from prkit.train import TrainConfig

    residuals = _trained(tiny_unet())
    path = prkit.save_residuals(residuals, tmp_path / "a.safetensors", config=TrainConfig(steps=7))
    assert read_metadata(path)["config"]["steps"] == 7
    path = prkit.save_residuals(residuals, tmp_path / "b.safetensors", config={"steps": 9})
    assert read_metadata(path)["config"] == {"steps": 9}
    from prkit.data import Concept

    prior = Concept(images=[Image.new("RGB", (16, 16))], token="sks", class_word="dog", paths=[])
    path = prkit.save_residuals(residuals, tmp_path / "p.safetensors", config=TrainConfig(prior_images=prior))
    assert read_metadata(path)["config"]["prior_images"] == "given"  # not the images' text (memory addresses)
    residuals.meta["config"] = None  # a set whose training recorded none: nothing given records an empty object
    assert read_metadata(prkit.save_residuals(residuals, tmp_path / "n.safetensors"))["config"] == {}
    for bad in (["steps", 9], "steps=9", 3):
        with pytest.raises(TypeError, match=r"save_residuals: config= is a \w+, not a mapping of training settings"):
            prkit.save_residuals(residuals, tmp_path / "c.safetensors", config=bad)
    assert not (tmp_path / "c.safetensors").exists()


def test_save_load_round_trip_is_exact(arch, tmp_path):
    unet = tiny_unet(**ARCHS[arch])
    residuals = _trained(unet)
    residuals.scale = 0.75
    inputs = unet_inputs()
    expected = run_unet(unet, inputs)
    path = residuals.save(tmp_path / "dog.safetensors")
    assert path == tmp_path / "dog.safetensors" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["dog.safetensors"]  # atomic write: no .tmp left behind
    fresh = tiny_unet(**ARCHS[arch])
    loaded = prkit.load_residuals(fresh, path)
    assert (loaded.token, loaded.class_word, loaded.scale) == ("sks", "dog", 0.75)
    assert loaded.ranks() == residuals.ranks()
    assert torch.equal(run_unet(fresh, inputs), expected)
    again = prkit.load_residuals(fresh, path)  # a second copy gets a unique name
    assert again.name == "default_2"
    residuals.meta["seconds"] = 12.5  # a trained set's wall time survives a load and a save again
    resaved = prkit.load_residuals(tiny_unet(**ARCHS[arch]), residuals.save(tmp_path / "timed.safetensors"))
    assert read_metadata(resaved.save(tmp_path / "again.safetensors"))["seconds"] == "12.500"
    state = torch.random.get_rng_state()
    prkit.load_residuals(tiny_unet(**ARCHS[arch]), path)  # the caller's generator is left as it was: seeding before
    assert torch.equal(torch.random.get_rng_state(), state)  # a load samples what seeding after it does


def test_metadata_describes_the_set(arch, tmp_path):
    unet = tiny_unet(**ARCHS[arch])
    residuals = _trained(unet)
    path = residuals.save(tmp_path / "dog.safetensors", base_model="tiny/base", config={"steps": 3})
    meta = read_metadata(path)
    assert meta["format"] == FORMAT and meta["prkit_version"] == prkit.__version__
    assert (meta["token"], meta["class_word"], meta["name"]) == ("sks", "dog", "default")
    assert meta["architecture"] == ARCH_NAME[arch]
    assert meta["base_model"] == "tiny/base" and meta["config"] == {"steps": 3}
    assert meta["layers"] == {b: {"channels": 32 if b in ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0",
                                                          "up_blocks.1.attentions.1") else 64, "rank": 2}
                              for b in residuals.ranks()}
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(residuals.state_dict())
        assert f.get_tensor("mid_block.attentions.0.up").dtype == torch.float32


def test_a_base_model_given_as_a_path_is_recorded_as_its_text(tmp_path):
    """save(path, base_model=Path(folder)) failed in safetensors with "argument 'metadata': 'PosixPath' object is not
    an instance of 'str'" (a model folder is naturally a Path, as load_pipeline takes it)."""
    folder = tmp_path / "models" / "sd15"
    folder.mkdir(parents=True)
    residuals = _trained(tiny_unet())
    path = residuals.save(tmp_path / "dog.safetensors", base_model=folder)
    assert read_metadata(path)["base_model"] == str(folder)
    residuals.meta["base_model"] = folder  # (as a caller may set it) recorded the same way
    path = residuals.save(tmp_path / "cat.safetensors")
    assert read_metadata(path)["base_model"] == str(folder)


def test_every_handle_on_a_set_saves_what_its_file_recorded(tmp_path):
    """A set saved again through another handle on it (prkit.get_residuals(pipe.unet, name), as train's and sample's
    messages show it) lost the base model, the training settings and the wall time its file recorded: each handle
    had a metadata dict of its own (the words, kept on the UNet, survived). A set added again under a removed set's
    name starts with none of the old set's."""
    residuals = _trained(tiny_unet())
    residuals.meta["seconds"] = 3.0
    path = residuals.save(tmp_path / "dog.safetensors", base_model="tiny/base", config={"steps": 3})
    unet = tiny_unet()
    loaded = prkit.load_residuals(unet, path, name="dog")
    handle = prkit.get_residuals(unet, "dog")
    assert handle.meta["base_model"] == "tiny/base" and handle.meta is loaded.meta
    again = read_metadata(handle.save(tmp_path / "again.safetensors"))
    first = read_metadata(path)
    assert {k: again[k] for k in ("base_model", "config", "seconds", "token")} == \
        {k: first[k] for k in ("base_model", "config", "seconds", "token")} == \
        {"base_model": "tiny/base", "config": {"steps": 3}, "seconds": "3.000", "token": "sks"}
    prkit.remove_residuals(unet, "dog")
    fresh = prkit.add_residuals(unet, rank=2, name="dog")
    assert fresh.meta == {"rank_rule": 2} and fresh.token is None
    assert read_metadata(fresh.save(tmp_path / "fresh.safetensors"))["base_model"] == ""


@pytest.mark.parametrize("source, target", [("conv", "linear"), ("linear", "conv")])
def test_loading_into_another_architecture_raises(tmp_path, source, target):
    path = _trained(tiny_unet(**ARCHS[source])).save(tmp_path / "dog.safetensors")
    other = tiny_unet(**ARCHS[target])
    with pytest.raises(ValueError) as err:
        prkit.load_residuals(other, path)
    message = str(err.value)
    assert "dog.safetensors" in message
    assert ARCH_NAME[source] in message and ARCH_NAME[target] in message
    assert not prkit.residual_names(other) and not any(isinstance(m, ResidualProjection) for m in other.modules())  # nothing was added


def test_loading_into_other_channels_raises(tmp_path):
    from diffusers import UNet2DConditionModel

    path = _trained(tiny_unet()).save(tmp_path / "dog.safetensors")
    torch.manual_seed(0)
    wider = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 96), norm_num_groups=8,
                                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                 cross_attention_dim=32, attention_head_dim=8)
    with pytest.raises(ValueError) as err:
        prkit.load_residuals(wider, path)
    message = str(err.value)
    assert "dog.safetensors" in message and "channel mismatch" in message
    assert "file 64, model 96" in message and message.count("sd1") == 2


def test_non_prkit_file_raises_clearly(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ValueError, match=r"lora\.safetensors.*not a prkit residual file.*load_lora_weights"):
        prkit.load_residuals(tiny_unet(), lora)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"^residual file '.*junk\.safetensors' is not a readable \.safetensors"):
        prkit.load_residuals(tiny_unet(), junk)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        prkit.load_residuals(tiny_unet(), tmp_path / "nowhere.safetensors")


@pytest.mark.parametrize("read", ["load_residuals", "read_metadata"])
def test_a_models_weights_given_as_residuals_are_not_taken_for_a_lora(tmp_path, read):
    """A UNet's diffusion_pytorch_model.safetensors given as a residual file was answered "LoRA files load with
    pipe.load_lora_weights instead", which refuses it too: what it holds is said, and what to give."""
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError) as err:
        prkit.load_residuals(unet, weights) if read == "load_residuals" else read_metadata(weights)
    message = str(err.value)
    assert message.startswith(f"{str(weights)!r} is not a prkit residual file (format='pt'); it holds ")
    assert "tensors and no LoRA (" in message and "a model's weights?" in message
    assert message.endswith("give a .safetensors file written by Residuals.save or prkit train")
    assert "load_lora_weights" not in message and not prkit.residual_names(unet)


def test_kohya_export_keys_and_alpha(tmp_path):
    residuals = _trained(tiny_unet(), rank=3)
    path = export_lora(residuals, tmp_path / "dog_lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        down = f.get_tensor("lora_unet_mid_block_attentions_0_proj_out.lora_down.weight")
        alpha = f.get_tensor("lora_unet_mid_block_attentions_0_proj_out.alpha")
        meta = f.metadata()
    assert kohya_key("down_blocks.0.attentions.1") == "lora_unet_down_blocks_0_attentions_1_proj_out"
    assert len(keys) == 3 * 7
    assert down.shape == (3, 64, 1, 1) and down.dtype == torch.float16  # conv LoRA for conv proj_out
    assert alpha.item() == 3.0  # alpha = rank: no extra scaling
    assert meta["prkit_token"] == "sks"
    assert [p.name for p in tmp_path.iterdir()] == ["dog_lora.safetensors"]


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn, "fp16"])
def test_export_refuses_a_dtype_that_is_no_lora_s(tmp_path, dtype):
    """export_lora wrote integer, bool or float8 factors without a word (a LoRA of zeros and ones, or rounded to
    nothing, that diffusers loads and applies); a string gave torch's AttributeError."""
    residuals = _trained(tiny_unet())
    kind = "not a torch dtype" if isinstance(dtype, str) else "no dtype of a LoRA's factors"
    with pytest.raises(TypeError, match=rf"export_lora: dtype={re.escape(repr(dtype))} is {kind}; "
                                        "pass torch.float16, torch.float32 or torch.bfloat16"):
        export_lora(residuals, tmp_path / "l.safetensors", dtype=dtype)
    assert not (tmp_path / "l.safetensors").exists()


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_exported_lora_reproduces_residual_outputs_in_diffusers(tmp_path, linear):
    pytest.importorskip("peft")
    pipe = make_pipe(tmp_path / "a", linear=linear)
    residuals = _trained(pipe.unet)
    residuals.scale = 0.5
    inputs = unet_inputs()
    ours = run_unet(pipe.unet, inputs)
    path = export_lora(residuals, tmp_path / "lora.safetensors", dtype=torch.float32)
    fresh = make_pipe(tmp_path / "b", linear=linear)
    base = run_unet(fresh.unet, inputs)
    assert (ours - base).abs().max() > 1e-3
    load_lora_file(fresh, path)
    theirs = run_unet(fresh.unet, inputs)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_sd15_residuals_do_not_load_into_sd21():
    """Same block names and channels: only the architecture tells SD1.5 and SD2.1 apart."""
    from prkit.arch import build_unet
    from prkit.files import check_compatible, layer_table

    sd15, sd21 = build_unet("sd15", device="meta"), build_unet("sd21", device="meta")
    assert layer_table(sd15) == layer_table(sd21)
    meta = {"architecture": "sd1", "base_model": "sd15",
            "layers": {b: {"channels": c, "rank": 16} for b, c in layer_table(sd15).items()}}
    check_compatible(meta, sd15, "dog.safetensors")  # fits its own base
    with pytest.raises(ValueError, match=r"dog\.safetensors.*sd1.*sd2"):
        check_compatible(meta, sd21, "dog.safetensors")


def _rewrite(path, change):
    """Rewrite a residual file with ``change(tensors, meta)`` applied (a damaged or tampered copy)."""
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def test_damaged_files_are_refused_and_leave_nothing_on_the_unet(tmp_path):
    unet = tiny_unet()
    path = _trained(unet).save(tmp_path / "r.safetensors")
    target = tiny_unet()
    nan = tmp_path / "nan.safetensors"
    nan.write_bytes(path.read_bytes())
    _rewrite(nan, lambda t, m: t[next(iter(t))].fill_(float("nan")))
    with pytest.raises(ValueError, match=r"nan\.safetensors' holds NaN or infinite values.*black images"):
        prkit.load_residuals(target, nan)
    short = tmp_path / "short.safetensors"
    short.write_bytes(path.read_bytes())
    _rewrite(short, lambda t, m: t.pop(next(iter(t))))
    with pytest.raises(ValueError, match=r"short\.safetensors' does not hold what its header describes"):
        prkit.load_residuals(target, short)
    bad_header = tmp_path / "header.safetensors"
    bad_header.write_bytes(path.read_bytes())
    _rewrite(bad_header, lambda t, m: m.update(layers="[1, 2"))
    with pytest.raises(ValueError, match=r"header\.safetensors' has a damaged prkit header"):
        prkit.load_residuals(target, bad_header)
    assert prkit.residual_names(target) == []  # nothing half-loaded stayed
    assert prkit.load_residuals(target, path).name == "default"


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    mask, previous = 0o027, os.umask(0o027)  # not the usual 0o022: the file follows the umask in force
    try:
        path = _trained(tiny_unet()).save(tmp_path / "r.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # mkstemp's files are 0600
    with pytest.raises(IsADirectoryError, match="is a directory"):
        _trained(tiny_unet()).save(tmp_path)


@pytest.mark.parametrize("write", ["save", "export"])
def test_a_file_where_a_folder_of_the_path_should_be_is_named(tmp_path, write):
    """save/export to 'dog.safetensors/x.safetensors' (a file where a folder of the path should be) said "could not
    write ...: File exists (... MiB free there); check that the folder is writable and has room": neither the file in
    the way nor what to do."""
    residuals = _trained(tiny_unet())
    blocker = residuals.save(tmp_path / "dog.safetensors")
    before = blocker.read_bytes()
    target = blocker / "sub" / "x.safetensors"
    with pytest.raises(NotADirectoryError, match=rf"^cannot write {re.escape(repr(str(target)))}: "
                                                 rf"{re.escape(repr(str(blocker)))} is a file, not a folder; choose "
                                                 "another path$"):
        residuals.save(target) if write == "save" else export_lora(residuals, target)
    assert blocker.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["dog.safetensors"]


def test_a_dangling_link_where_a_folder_of_the_path_should_be_is_named(tmp_path):
    """An output folder that is a link to a disk not mounted (runs -> /mnt/gone/runs) failed with a raw "[Errno 17]
    File exists: 'runs'", in both the writers and the up-front folder check: the link is now named with its target."""
    from prkit.atomic import atomic_path
    from prkit.checks import writable_folder

    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone" / "runs")
    said = rf"{re.escape(repr(str(link)))} is a symbolic link to {re.escape(repr(str(tmp_path / 'gone' / 'runs')))}, "
    with pytest.raises(NotADirectoryError, match=rf"^cannot write .*: {said}which does not exist"):
        with atomic_path(link / "eval" / "results.csv"):
            pass
    with pytest.raises(ValueError, match=rf"^--out: {said}which does not exist"):
        writable_folder(link / "eval", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and link.is_symlink()


def test_atomic_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    """Only the rename was atomic: without an fsync of the file first, a power loss can leave the new name on an
    empty file (and the old one gone); without one of the folder after, the rename itself may be lost."""
    import os

    import prkit.files as files

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    target = tmp_path / "out.bin"
    with files.atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"data")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"] and events[0][1].endswith(".tmp")
    assert events[2][1] == str(tmp_path) and target.read_bytes() == b"data"


def test_atomic_path_without_replace_keeps_a_file_that_appeared_meanwhile(tmp_path):
    import os

    from prkit import files

    target = tmp_path / "000.png"
    with pytest.raises(FileExistsError):
        with files.atomic_path(target, replace=False) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"mine")
            target.write_bytes(b"theirs")  # another process, between this one's listing and its rename
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["000.png"]  # no temporary file left
    with files.atomic_path(tmp_path / "001.png", replace=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"mine")
    assert (tmp_path / "001.png").read_bytes() == b"mine" and sorted(os.listdir(tmp_path)) == ["000.png", "001.png"]


def test_temporary_files_of_killed_writers_are_cleaned_up(tmp_path, monkeypatch):
    import os
    import time

    from prkit import files

    target = tmp_path / "r.safetensors"
    dead = subprocess_pid_that_exited()
    old = time.time() - files.ABANDONED_AFTER - 10
    left = {  # name -> should it be removed?
        f".r.safetensors.{dead}.0a1b2c3d.tmp": True,  # writer gone, untouched for long: abandoned
        f".r.safetensors.{os.getpid()}.0a1b2c3e.tmp": False,  # this process: maybe a write in progress
        f".r.safetensors.{dead}.0a1b2c3f.recent.tmp": False,  # not a pid field followed by the hex: unclear
        f".other.safetensors.{dead}.0a1b2c40.tmp": False,  # another file's
    }
    for name in left:
        (tmp_path / name).write_bytes(b"half")
        os.utime(tmp_path / name, (old, old))
    fresh = tmp_path / f".r.safetensors.{dead}.0a1b2c41.tmp"  # writer gone but changed a moment ago: left
    fresh.write_bytes(b"half")
    _trained(tiny_unet()).save(target)
    assert target.is_file() and fresh.exists()
    for name, removed in left.items():
        assert (tmp_path / name).exists() != removed, name


def test_long_names_and_links_are_written_whole(tmp_path):
    """A 242-byte file name failed (the temporary file's ~24 more bytes passed the file system's 255: "File name too
    long"); a symbolic link was replaced by a plain file, its target left as it was. A long name's temporary files
    carry a hash of it (and are still found when abandoned); a link is written through."""
    import os
    import time

    from prkit import atomic, files

    long = tmp_path / ("r" * 226 + ".safetensors")  # 238 bytes
    assert len(long.name) > atomic._LONG_NAME
    dead = subprocess_pid_that_exited()
    left = tmp_path / f".{atomic._stem(long.name)}.{dead}.0a1b2c3d.tmp"  # a killed writer's
    left.write_bytes(b"half")
    old = time.time() - files.ABANDONED_AFTER - 10
    os.utime(left, (old, old))
    _trained(tiny_unet()).save(long)
    assert long.is_file() and not left.exists() and os.listdir(tmp_path) == [long.name]
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "v1.safetensors"
    real.write_bytes(b"old")
    link = tmp_path / "latest.safetensors"
    link.symlink_to(real)
    _trained(tiny_unet()).save(link)
    assert link.is_symlink() and os.readlink(link) == str(real) and real.stat().st_size > 1000
    with safe_open(str(real), "pt") as f:
        assert len(list(f.keys())) > 0  # the link's target holds the new file


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_an_explicit_name_that_is_taken_raises(tmp_path):
    path = _trained(tiny_unet()).save(tmp_path / "dog.safetensors")
    unet = tiny_unet()
    assert prkit.load_residuals(unet, path, name="mine").name == "mine"
    with pytest.raises(ValueError, match=r"named 'mine' is already on this UNet.*remove_residuals"):
        prkit.load_residuals(unet, path, name="mine")
    assert prkit.residual_names(unet) == ["mine"]  # no silent 'mine_2'
    assert prkit.load_residuals(unet, path).name == "default"  # the file's name may still be made unique
    assert prkit.load_residuals(unet, path).name == "default_2"


def test_tensors_the_header_does_not_describe_are_refused(tmp_path):
    path = _trained(tiny_unet()).save(tmp_path / "r.safetensors")
    extra = tmp_path / "extra.safetensors"
    extra.write_bytes(path.read_bytes())
    _rewrite(extra, lambda t, m: t.update({"down_blocks.9.attentions.0.down": torch.ones(2, 32),
                                           "garbage": torch.ones(3)}))
    target = tiny_unet()
    with pytest.raises(ValueError, match=r"extra\.safetensors' holds 2 tensor\(s\) its header does not describe "
                                         r"\(down_blocks\.9\.attentions\.0\.down, garbage\)"):
        prkit.load_residuals(target, extra)
    assert prkit.residual_names(target) == []


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_tensors_that_are_not_floating_point_are_refused(tmp_path, dtype):
    """An integer copy of a set loaded: its factors were cast to float, silently (and rounded); a float8 one failed
    in the NaN check with NotImplementedError."""
    path = _trained(tiny_unet()).save(tmp_path / "int.safetensors")
    keys = []

    def cast(tensors, meta):
        keys.extend(sorted(tensors)[:2])
        tensors.update({k: tensors[k].to(dtype) for k in keys})

    _rewrite(path, cast)
    target = tiny_unet()
    with pytest.raises(ValueError) as err:
        prkit.load_residuals(target, path)
    kind = str(dtype).removeprefix("torch.")
    assert str(err.value) == (f"residual file {str(path)!r} holds 2 tensor(s) that are not float32, float16, bfloat16 "
                              f"or float64 ({keys[0]}: {kind}, {keys[1]}: {kind}); a residual set's factors are. Save "
                              "the residuals again with one of those (float32, float16 or bfloat16)")
    assert prkit.residual_names(target) == []


def test_a_folder_given_as_the_file_says_so(tmp_path):
    _trained(tiny_unet()).save(tmp_path / "dog.safetensors")
    for call in (read_metadata, lambda p: prkit.load_residuals(tiny_unet(), p)):
        with pytest.raises(IsADirectoryError) as err:
            call(tmp_path)
        assert str(err.value) == (f"residual file {str(tmp_path)!r} is a folder; give the .safetensors file inside it "
                                  "(it holds dog.safetensors)")


@pytest.mark.parametrize("layer", [{"channels": "64", "rank": 2}, {"channels": 64, "rank": 2.5},
                                   {"channels": 64, "rank": True}, {"channels": 64, "rank": 0}])
def test_header_channels_and_ranks_must_be_whole_numbers(tmp_path, layer):
    import json

    path = _trained(tiny_unet()).save(tmp_path / "r.safetensors")
    _rewrite(path, lambda t, m: m.update(layers=json.dumps({b: layer for b in json.loads(m["layers"])})))
    with pytest.raises(ValueError, match=r"r\.safetensors' has a damaged prkit header .*expected a positive whole"):
        read_metadata(path)


@pytest.mark.parametrize("config, kept", [("[1, 2]", {"recorded": [1, 2]}), ('"steps=400"', {"recorded": "steps=400"}),
                                          ("3", {"recorded": 3}), ("null", {}),
                                          ("steps=400, lr=1e-3", {"recorded": "steps=400, lr=1e-3"})])
def test_a_header_config_that_is_not_a_json_object_is_kept_as_recorded(tmp_path, config, kept, caplog):
    """A list, string, number or null loaded as the set's config as it was (a save before this check wrote a
    TrainConfig given as config= as its text); `prkit info` on a string failed with AttributeError: 'str' object has
    no attribute 'get'. The set loads, its config an object that keeps what the file says, with a warning. Text that
    is no JSON at all (a header edited by hand) too: the file was refused as damaged, 'save the residuals again',
    which needs it loaded."""
    path = _trained(tiny_unet()).save(tmp_path / "c.safetensors")
    _rewrite(path, lambda t, m: m.update(config=config))
    with caplog.at_level("WARNING", logger="prkit.files"):
        assert read_metadata(path)["config"] == kept
    assert ("not as a JSON object" in caplog.text) == (config != "null")
    target = tiny_unet()
    assert prkit.load_residuals(target, path).meta["config"] == kept
    assert prkit.residual_names(target) == ["default"]


@pytest.mark.parametrize("recorded, used", [("my.concept", "my_concept"), ("items", "residuals_items"),
                                            ("..", "__"), ("a/b", "a/b"), ("café", "café")])
def test_a_recorded_name_no_set_can_take_loads_under_a_usable_one(tmp_path, caplog, recorded, used):
    """A header whose set name no set can take (edited by hand, written by another tool) was refused with the bare
    set-name error, naming neither the file nor name=; `prkit export`, which has no name to give, could not read
    it at all. The set loads under a usable form of the name, said with the file and name=."""
    path = _trained(tiny_unet()).save(tmp_path / "n.safetensors")
    _rewrite(path, lambda t, m: m.update(name=recorded))
    with caplog.at_level("WARNING", logger="prkit.files"):
        assert prkit.load_residuals(tiny_unet(), path).name == used
    assert (f"n.safetensors' records the set name {recorded!r}" in caplog.text) == (recorded != used)
    assert prkit.load_residuals(tiny_unet(), path, name="mine").name == "mine"


def test_load_residuals_can_set_the_words(tmp_path, tokenizer):
    from prkit.lag import concept_weights

    path = prkit.add_residuals(tiny_unet(), rank=2).save(tmp_path / "plain.safetensors")  # a file without words
    unet = tiny_unet()
    plain = prkit.load_residuals(unet, path)
    assert (plain.token, plain.class_word) == (None, None)
    with pytest.raises(ValueError, match=r"has no token.*token=\.\.\. to add_residuals/load_residuals"):
        concept_weights(tokenizer, ["a photo of a sks dog"], [plain])
    named = prkit.load_residuals(unet, path, name="dog", token="sks", class_word="dog")
    assert (named.token, named.class_word) == ("sks", "dog")
    assert prkit.get_residuals(unet, "dog").token == "sks"
    weights = concept_weights(tokenizer, ["a photo of a sks dog"], [named])  # (P, T, S)
    assert weights[0, :, 0].tolist() == [0, 0, 0, 0, 0, 1, 1] + [0] * 9  # <bos> a photo of a [sks dog]
    worded = _trained(tiny_unet()).save(tmp_path / "dog.safetensors")  # the file's words, one overridden
    assert (lambda r: (r.token, r.class_word))(prkit.load_residuals(tiny_unet(), worded, token="zwx")) == ("zwx", "dog")


def test_residuals_on_a_compiled_unet_use_the_plain_block_names(tmp_path):
    unet = tiny_unet()
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    compiled = torch.compile(unet)  # lazy: nothing is compiled until it runs, and it does not run here
    trained = _trained(compiled)
    assert list(trained.ranks())[0] == "down_blocks.0.attentions.0"
    path = trained.save(tmp_path / "compiled.safetensors")
    assert "mid_block.attentions.0" in read_metadata(path)["layers"]
    expected = run_unet(unet, inputs)  # the set lives on the original module
    assert (expected - base).abs().max() > 1e-3
    plain = tiny_unet()
    prkit.load_residuals(plain, path)
    assert torch.equal(run_unet(plain, inputs), expected)
    other = tiny_unet()
    again = prkit.load_residuals(torch.compile(other), path)
    assert (again.token, again.class_word) == ("sks", "dog")
    assert torch.equal(run_unet(other, inputs), expected)
    with safe_open(str(export_lora(again, tmp_path / "lora.safetensors")), framework="pt") as f:
        assert all(k.startswith("lora_unet_") and "orig_mod" not in k for k in f.keys())


def test_a_file_saved_from_a_compiled_unet_before_the_plain_names_loads(tmp_path):
    """Saves from a torch.compile'd UNet before d84657a named blocks and tensors '_orig_mod.<block>': loading them was
    refused as "trained for a sd1 model ... Load it into the base model it was trained on" (the same model). The
    '_orig_mod' segment is dropped, that segment alone."""
    import json

    trained = _trained(tiny_unet())
    path = trained.save(tmp_path / "old.safetensors")

    def compiled_names(tensors, meta):
        for key in list(tensors):
            tensors[f"_orig_mod.{key}"] = tensors.pop(key)
        meta["layers"] = json.dumps({f"_orig_mod.{b}": v for b, v in json.loads(meta["layers"]).items()})

    _rewrite(path, compiled_names)
    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("_orig_mod.") for k in f.keys())
        assert "_orig_mod.mid_block.attentions.0" in json.loads(f.metadata()["layers"])
    plain = tiny_unet()
    loaded = prkit.load_residuals(plain, path)
    assert list(read_metadata(path)["layers"]) == list(trained.ranks())  # prkit info shows the plain names too
    inputs = unet_inputs()
    assert loaded.ranks() == trained.ranks() and (loaded.token, loaded.class_word) == ("sks", "dog")
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(run_unet(plain, inputs), run_unet(trained.unet, inputs))
    near = tmp_path / "near.safetensors"  # another segment is no compiled wrapper's: it names another model's block
    near.write_bytes(trained.save(tmp_path / "n.safetensors").read_bytes())
    _rewrite(near, lambda t, m: m.update(layers=json.dumps({f"_orig_modx.{b}": v
                                                            for b, v in json.loads(m["layers"]).items()})))
    with pytest.raises(ValueError, match=r"blocks missing from this UNet: \['_orig_modx\.down_blocks\.0"):
        prkit.load_residuals(tiny_unet(), near)
    both = tmp_path / "both.safetensors"  # the same factor under both names: not a file prkit wrote
    both.write_bytes(trained.save(tmp_path / "b.safetensors").read_bytes())
    _rewrite(both, lambda t, m: t.update({f"_orig_mod.{key}": t[key].clone() for key in ["mid_block.attentions.0.up"]}))
    with pytest.raises(ValueError, match=r"both\.safetensors' holds _orig_mod\.mid_block\.attentions\.0\.up and "
                                         r"mid_block\.attentions\.0\.up, one factor with and without "
                                         r"'_orig_mod'; it is not a file prkit wrote"):
        prkit.load_residuals(tiny_unet(), both)


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_a_lora_loaded_after_the_residuals_stacks_on_them(tmp_path, linear):
    """diffusers' load_lora_weights on proj_outs that hold residuals: both apply, LAG still masks the residuals, and
    unloading either one leaves the other exactly as it was."""
    pytest.importorskip("peft")
    donor = make_pipe(tmp_path / "d", linear=linear)
    style = prkit.add_residuals(donor.unet, rank=2, name="style")
    randomize(style, seed=5)
    lora = export_lora(style, tmp_path / "style.safetensors", dtype=torch.float32)  # stands for any proj_out LoRA
    reference = make_pipe(tmp_path / "r", linear=linear)  # both as residual sets: what the stack must give
    randomize(prkit.add_residuals(reference.unet, rank=2, name="dog"), seed=3)
    randomize(prkit.add_residuals(reference.unet, rank=2, name="style"), seed=5)
    inputs = unet_inputs()
    pipe = make_pipe(tmp_path / "p", linear=linear)
    base = run_unet(pipe.unet, inputs)
    dog = prkit.add_residuals(pipe.unet, rank=2, name="dog", token="sks", class_word="dog")
    randomize(dog, seed=3)
    with_dog = run_unet(pipe.unet, inputs)
    load_lora_file(pipe, lora, adapter_name="style")
    both = run_unet(pipe.unet, inputs)
    torch.testing.assert_close(both, run_unet(reference.unet, inputs), atol=1e-5, rtol=1e-5)
    assert (both - with_dog).abs().max() > 1e-3 and prkit.residual_names(pipe.unet) == ["dog"]
    lag = prkit.generate(pipe, "a photo of a sks dog", dog, lag=True, steps=2, output_type="np")
    plain = prkit.generate(pipe, "a photo of a sks dog", dog, lag=False, steps=2, output_type="np")
    assert lag[0].shape == plain[0].shape and abs(lag[0] - plain[0]).max() > 1e-4  # LAG masks the residuals
    pipe.unload_lora_weights()
    assert prkit.residual_names(pipe.unet) == ["dog"]
    torch.testing.assert_close(run_unet(pipe.unet, inputs), with_dog, atol=0, rtol=0)  # the residuals stay
    load_lora_file(pipe, lora, adapter_name="style")
    prkit.remove_residuals(pipe.unet, "dog")
    reference_style = make_pipe(tmp_path / "s", linear=linear)
    randomize(prkit.add_residuals(reference_style.unet, rank=2, name="style"), seed=5)
    torch.testing.assert_close(run_unet(pipe.unet, inputs), run_unet(reference_style.unet, inputs), atol=1e-5,
                               rtol=1e-5)  # the LoRA stays
    pipe.unload_lora_weights()
    assert not any(isinstance(m, ResidualProjection) or hasattr(m, "base_layer") for m in pipe.unet.modules())
    torch.testing.assert_close(run_unet(pipe.unet, inputs), base, atol=0, rtol=0)


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_residuals_loaded_under_a_lora_already_on_proj_out(tmp_path, linear):
    """The other order: a LoRA first, then residuals (also after the last set under a LoRA was removed): the residual
    layer goes beneath the LoRA's, both apply, and peft's fuse/unfuse and prkit's merge/unmerge in any order end where
    they should."""
    pytest.importorskip("peft")
    donor = make_pipe(tmp_path / "d", linear=linear)
    style = prkit.add_residuals(donor.unet, rank=2, name="style")
    randomize(style, seed=5)
    lora = export_lora(style, tmp_path / "style.safetensors", dtype=torch.float32)  # stands for any proj_out LoRA
    path = _trained(make_pipe(tmp_path / "m", linear=linear).unet).save(tmp_path / "dog.safetensors")
    reference = make_pipe(tmp_path / "r", linear=linear)  # the LoRA as a residual set beside the dog's
    prkit.load_residuals(reference, path)
    randomize(prkit.add_residuals(reference.unet, rank=2, name="style"), seed=5)
    inputs = unet_inputs()
    both = run_unet(reference.unet, inputs)
    pipe = make_pipe(tmp_path / "p", linear=linear)
    base = run_unet(pipe.unet, inputs)
    load_lora_file(pipe, lora, adapter_name="style")
    with_lora = run_unet(pipe.unet, inputs)
    for _ in range(2):  # the second time: after the last set under the LoRA was removed
        residuals = prkit.load_residuals(pipe, path)
        torch.testing.assert_close(run_unet(pipe.unet, inputs), both, atol=1e-5, rtol=1e-5)
        prkit.remove_residuals(pipe.unet, residuals.name)
        torch.testing.assert_close(run_unet(pipe.unet, inputs), with_lora, atol=0, rtol=0)  # the LoRA stays
    residuals = prkit.load_residuals(pipe, path)
    for order in (("merge", "fuse", "unmerge", "unfuse"), ("fuse", "merge", "unfuse", "unmerge"),
                  ("merge", "fuse", "unfuse", "unmerge")):
        for step in order:
            {"merge": residuals.merge, "unmerge": residuals.unmerge, "fuse": pipe.fuse_lora,
             "unfuse": pipe.unfuse_lora}[step]()
            torch.testing.assert_close(run_unet(pipe.unet, inputs), both, atol=1e-5, rtol=1e-5, msg=str(order))
    residuals.merge()
    pipe.fuse_lora()
    prkit.remove_residuals(pipe.unet)  # a merged set under a fused LoRA: the fused LoRA stays
    torch.testing.assert_close(run_unet(pipe.unet, inputs), with_lora, atol=1e-5, rtol=1e-5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(run_unet(pipe.unet, inputs), base, atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and LAG's fused masks (run on a GPU)")
def test_lag_under_a_lora_replays_as_it_runs_eagerly_on_cuda(tmp_path):
    pytest.importorskip("peft")
    donor = make_pipe(tmp_path / "d")
    style = prkit.add_residuals(donor.unet, rank=2, name="style")
    randomize(style, seed=5)
    lora = export_lora(style, tmp_path / "style.safetensors", dtype=torch.float32)
    pipe = make_pipe(tmp_path / "p").to("cuda")
    dog = prkit.add_residuals(pipe.unet, rank=2, name="dog", token="sks", class_word="dog")
    randomize(dog, seed=3)
    args = dict(steps=3, output_type="np", seed=0, num_images=2)
    without = prkit.generate(pipe, "a photo of a sks dog", dog, lag=True, fast=False, **args)
    load_lora_file(pipe, lora, adapter_name="style")
    eager = prkit.generate(pipe, "a photo of a sks dog", dog, lag=True, fast=False, **args)
    graph = prkit.generate(pipe, "a photo of a sks dog", dog, lag=True, fast=True, **args)
    assert abs(eager - graph).max() < 1e-4 and abs(eager - without).max() > 1e-3


def test_a_full_disk_names_the_file_and_the_space_left_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    from conftest import full_disk

    path = _trained(tiny_unet()).save(tmp_path / "r.safetensors")
    good = path.read_bytes()
    full_disk(monkeypatch, free_mib=5)
    with pytest.raises(OSError) as err:
        _trained(tiny_unet(seed=1)).save(path)
    assert err.value.errno == errno.ENOSPC
    assert str(err.value) == (f"[Errno 28] could not write {path}: No space left on device (5 MiB free there); free "
                              "some space or write to another disk, then try again. The file that was there is "
                              "unchanged")
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["r.safetensors"]  # no half temporary file
    with pytest.raises(OSError, match=r"new\.safetensors: No space left.*5 MiB free there.*Nothing was written"):
        _trained(tiny_unet()).save(tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == ["r.safetensors"]


def test_a_file_cut_short_says_so_and_a_scale_that_is_not_finite_is_refused(tmp_path):
    """A copy interrupted half way read as "not a readable .safetensors file (Error while deserializing header:
    incomplete metadata, file not fully covered)"; scale=nan loaded and painted NaN images."""
    path = _trained(tiny_unet()).save(tmp_path / "r.safetensors")
    data = path.read_bytes()
    short = tmp_path / "short.safetensors"
    for cut in (len(data) - 1, len(data) // 2, 20):  # in the tensors, in the header
        short.write_bytes(data[:cut])
        with pytest.raises(ValueError) as err:
            prkit.load_residuals(tiny_unet(), short)
        need = f"{len(data):,}" if cut > 20 else ""  # (the header itself cut: at least its own length)
        assert str(err.value).startswith(f"residual file {str(short)!r} is incomplete: it holds {cut:,} bytes where "
                                         f"its header needs {need}")
        assert str(err.value).endswith("(an interrupted copy, download or save leaves such a file); copy, download "
                                       "or write it again")
    target = tiny_unet()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"^load_residuals: scale must be a finite number \(1\.0: as trained, "
                                             rf"0: off\), got {bad}$"):
            prkit.load_residuals(target, path, scale=bad)
    assert prkit.residual_names(target) == []  # refused before anything was added
    residuals = prkit.load_residuals(target, path, scale=0.5)
    with pytest.raises(ValueError, match=r"^residual set 'default': scale must be a finite number .*got -inf$"):
        residuals.scale = float("-inf")
    assert residuals.scale == 0.5
    stored = tmp_path / "stored.safetensors"
    stored.write_bytes(data)
    _rewrite(stored, lambda t, m: m.update(scale="nan"))
    with pytest.raises(ValueError, match=r"stored\.safetensors' has a damaged prkit header \(ValueError: the header: "
                                         r"scale must be a finite number"):
        read_metadata(stored)



def test_a_scale_given_as_a_bool_or_text_is_refused_and_numpy_numbers_pass(tmp_path):
    """scale=True was taken as 1.0 (False as 0: the set silently off) and scale='2' as 2.0, by the setter and by
    load_residuals; the header's own scale, which safetensors keeps as text, still reads."""
    import numpy as np

    path = _trained(tiny_unet()).save(tmp_path / "r.safetensors")
    target = tiny_unet()
    for bad, said in ((True, "True; to switch a set on or off use enable() and disable()"),
                      (np.bool_(False), "np.False_; to switch"), ("2", "the text '2'; convert it first")):
        with pytest.raises(TypeError, match=rf"^load_residuals: scale must be a number \(1\.0: as trained, 0: off\), "
                                            rf"got {re.escape(said)}"):
            prkit.load_residuals(target, path, scale=bad)
    assert prkit.residual_names(target) == []  # refused before anything was added
    residuals = prkit.load_residuals(target, path, scale=np.float32(0.5))
    assert residuals.scale == 0.5 and type(residuals.scale) is float
    for bad in (False, "0.5", b"1", torch.tensor(True), np.array(False)):  # a bool tensor or array read as 1 or 0
        with pytest.raises(TypeError, match=r"^residual set 'default': scale must be a number"):
            residuals.scale = bad
    assert residuals.scale == 0.5
    for good, want in ((np.int64(2), 2.0), (np.float64(0.25), 0.25), (torch.tensor(0.75), 0.75), (0, 0.0)):
        residuals.scale = good
        assert residuals.scale == want and type(residuals.scale) is float
    residuals.scale = 1.5
    assert read_metadata(residuals.save(tmp_path / "s.safetensors"))["scale"] == "1.5"
    assert prkit.load_residuals(tiny_unet(), tmp_path / "s.safetensors").scale == 1.5


def test_load_residuals_names_its_arguments_when_given_something_else(tmp_path):
    """The file first and the UNet second (or no model) ended in a raw TypeError from pathlib or an AttributeError."""
    import prkit
    from tiny import tiny_unet

    unet = tiny_unet()
    path = prkit.add_residuals(tiny_unet(), rank=2, token="sks").save(tmp_path / "r.safetensors")
    with pytest.raises(TypeError, match=r"takes the pipeline \(or its UNet\) first and the file second; got PosixPath "
                                        r"and UNet2DConditionModel \(swapped\?\)"):
        prkit.load_residuals(path, unet)
    with pytest.raises(TypeError, match=r"got NoneType and str$"):
        prkit.load_residuals(None, str(path))
    assert prkit.load_residuals(unet, path).name == "default"


@pytest.mark.parametrize("write", ["save_residuals", "export_lora"])
def test_saving_and_exporting_name_their_arguments_when_given_something_else(tmp_path, write):
    """A UNet, a set's name, a list of sets or the arguments swapped ended in a raw AttributeError ("'str' object has
    no attribute 'meta'") and nothing said what to pass."""
    unet = tiny_unet()
    dog, cat = _trained(unet), prkit.add_residuals(unet, rank=2, name="cat")
    function = getattr(prkit.files, write)
    path = tmp_path / "r.safetensors"
    cases = [((path, dog), r"got PosixPath and Residuals \(swapped\?\)"),
             ((unet, path), r"got UNet2DConditionModel; prkit\.get_residuals\(unet, name\) gives the handle of a "
                            r"set on a UNet \(on this one: 'default', 'cat'\)"),
             (("cat", path), r"got str; prkit\.get_residuals\(unet, name\)"),
             (([dog, cat], path), r"got list; one set per file: write each set to a file of its own")]
    for args, said in cases:
        with pytest.raises(TypeError, match=rf"^{write}\(residuals, path\) takes a residual set's handle \(a "
                                            rf"Residuals\) first and the file second; {said}"):
            function(*args)
    assert list(tmp_path.iterdir()) == []
    assert function(dog, path) == path and function(cat, tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("between", ["safetensors_header", "check_compatible"])
def test_a_file_replaced_while_it_loads_loads_one_version_of_it(tmp_path, monkeypatch, between):
    """load_residuals opened the file twice, for its header and for its tensors: a save replacing it in between (a
    training writing its last file while a notebook loads it) was read as one version's header with the next one's
    tensors and refused as damage ("does not hold what its header describes"). One version loads, whole."""
    import prkit.files as files

    old, new = _trained(tiny_unet(), rank=2), _trained(tiny_unet(), rank=3)
    path = old.save(tmp_path / "r.safetensors")
    real, saved = getattr(files, between), []

    def then_replaced(*args):
        result = real(*args)
        if not saved:  # a save renames the new file over the old one
            saved.append(new.save(path))
        return result

    monkeypatch.setattr(files, between, then_replaced)
    target = tiny_unet()
    loaded = prkit.load_residuals(target, path)
    assert saved and read_metadata(path)["layers"]["mid_block.attentions.0"]["rank"] == 3  # it was replaced
    version = new if loaded.ranks()["mid_block.attentions.0"] == 3 else old
    assert loaded.ranks() == version.ranks() and set(loaded.state_dict()) == set(version.state_dict())
    assert all(torch.equal(v, version.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert prkit.residual_names(target) == ["default"]


def test_a_residual_file_is_not_held_in_memory_twice_while_it_loads(tmp_path):
    """Its header and tensors came from one read of all its bytes: the file's bytes and its tensors made from them were
    in memory together (a full-rank SDXL set: twice some 0.5 GB). One open of the file gives both, one version of it,
    the tensors copied from its mapping."""
    import tracemalloc

    from prkit.files import read_residual_file

    path = _trained(tiny_unet()).save(tmp_path / "r.safetensors")
    _rewrite(path, lambda tensors, meta: tensors.update(big=torch.ones(4 << 20)))  # 16 MB more
    tracemalloc.start()
    try:
        meta, tensors = read_residual_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert torch.equal(tensors["big"], torch.ones(4 << 20)) and meta["token"] == "sks"
    assert peak < path.stat().st_size // 4, peak  # Python's own allocations: no copy of the file's bytes


def test_a_sets_metadata_may_be_given_whole_as_before(tmp_path):
    """handle.meta = {...} (the documented free-form metadata, an attribute until it moved onto the UNet) failed with
    "property 'meta' of 'Residuals' object has no setter". Given whole, it is the set's, through every handle, and
    saved; anything but a dict is refused naming the attribute."""
    residuals = _trained(tiny_unet())
    residuals.meta = {"base_model": "tiny/given", "seconds": 2.0}
    assert prkit.get_residuals(residuals.unet, residuals.name).meta["base_model"] == "tiny/given"
    assert read_metadata(residuals.save(tmp_path / "dog.safetensors"))["base_model"] == "tiny/given"
    with pytest.raises(TypeError, match=r"meta must be a dict"):
        residuals.meta = ["base_model"]
    assert residuals.meta["seconds"] == 2.0
