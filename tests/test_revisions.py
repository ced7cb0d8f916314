"""Revision records: which exact base model and metric backbones a name stood for (a hub id's cached snapshot
commit, a folder's path and fingerprint, the world's prkit version), in residual file headers and `prkit info`;
unknown revisions are None, never a failure. The evaluation's run.json: test_evaluate.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import prkit
from conftest import make_concept
from tiny import tiny_clip, tiny_pipeline

COMMIT, OTHER = "0123456789abcdef0123456789abcdef01234567", "f" * 40


def _model_folder(folder: Path, big: int = 3 << 20) -> Path:
    """A folder shaped like a model: an index, a config and a 'weights' file larger than the whole-hash limit."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", '
                                             '"unet": ["diffusers", "UNet2DConditionModel"]}')
    (folder / "unet" / "config.json").write_text('{"sample_size": 8}')
    (folder / "unet" / "weights.safetensors").write_bytes(bytes(range(256)) * (big // 256))
    return folder


def _hub_cache(cache: Path, repo: str, save, *, commits=(COMMIT,), main: str = COMMIT) -> Path:
    """A Hugging Face cache layout under ``cache``: ``save(folder)`` writes each snapshot, refs/main names one."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(main)
    for commit in commits:
        save(root / "snapshots" / commit)
    return cache


def test_a_folder_is_its_resolved_path_and_a_fingerprint_that_copies_share(tmp_path, monkeypatch):
    from prkit.revisions import fingerprint, model_revision

    folder = _model_folder(tmp_path / "sd")
    monkeypatch.chdir(tmp_path)
    record = model_revision("sd")
    assert record == {"kind": "folder", "path": str(folder.resolve()), "fingerprint": fingerprint(folder),
                      "commit": None}
    assert record["fingerprint"].startswith("sha256:") and len(record["fingerprint"]) == 7 + 64
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))  # another path, other modification times: same files
    other = model_revision(copy)
    assert other["fingerprint"] == record["fingerprint"] and other["path"] == str(copy.resolve()) != record["path"]
    os.utime(copy / "unet" / "weights.safetensors", (0, 0))
    (copy / ".cache").mkdir()  # hidden files and folders (hf download's metadata, .git) are not the model
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert fingerprint(copy) == record["fingerprint"]
    (copy / "unet" / "config.json").write_text('{"sample_size": 16}')  # another config
    changed = fingerprint(copy)
    assert changed != record["fingerprint"]
    weights = copy / "unet" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[0] ^= 1  # other weights (their first bytes)
    weights.write_bytes(bytes(data))
    assert fingerprint(copy) not in (changed, record["fingerprint"])
    (copy / "unet" / "weights.safetensors").rename(copy / "unet" / "renamed.safetensors")
    assert fingerprint(copy) != fingerprint(folder)


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_name_has_no_fingerprint_or_record(tmp_path, monkeypatch, name):
    """fingerprint("") fingerprinted the current folder (Path("") is '.'), as model_revision("") never did."""
    from prkit.revisions import fingerprint, model_revision

    _model_folder(tmp_path / "sd")
    monkeypatch.chdir(tmp_path / "sd")
    assert fingerprint(name) is None and model_revision(name) is None
    assert fingerprint(".") is not None  # said so, it is read


def test_the_fingerprint_reads_the_indexed_components_through_links_and_sees_a_partial_change(tmp_path):
    """Components shared by symlink are read (os.walk did not enter linked folders: two models whose unet links
    to other weights shared a fingerprint); files beside the components (a training run's logs) are not the model;
    a change of 5% of a large file's middle is seen (16 slices missed it)."""
    from prkit.revisions import fingerprint

    a, b = _model_folder(tmp_path / "a"), _model_folder(tmp_path / "b", big=8 << 20)
    for name, folder in (("la", a), ("lb", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text((folder / "model_index.json").read_text())
        (tmp_path / name / "unet").symlink_to(folder / "unet", target_is_directory=True)
    assert fingerprint(tmp_path / "la") != fingerprint(tmp_path / "lb")
    before = fingerprint(b)
    (b / "logs").mkdir()
    (b / "logs" / "events.out").write_text("step 1")
    assert fingerprint(b) == before
    weights = b / "unet" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400_000] = bytes(400_000)
    weights.write_bytes(bytes(data))
    assert fingerprint(b) != before


def test_a_folder_hf_download_wrote_or_a_cache_snapshot_also_names_its_commit(tmp_path):
    from prkit.revisions import model_revision

    folder = _model_folder(tmp_path / "sd15")
    meta = folder / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "model_index.json.metadata").write_text(f"{COMMIT}\nsome-etag\n1700000000.0\n")
    assert model_revision(folder)["commit"] == COMMIT
    snapshot = _model_folder(tmp_path / "cache" / "models--o--m" / "snapshots" / OTHER)
    assert model_revision(snapshot)["commit"] == OTHER


def test_the_world_is_prkits_version_and_its_folders_fingerprint():
    from prkit.metrics import world_clip_path
    from prkit.pipeline import world_path
    from prkit.revisions import fingerprint, model_revision

    world = model_revision("world")
    assert world == {"kind": "world", "prkit_version": prkit.__version__, "fingerprint": fingerprint(world_path())}
    assert world["fingerprint"].startswith("sha256:")
    if (world_clip_path() / "config.json").is_file():
        assert model_revision("world", world_folder=world_clip_path())["fingerprint"] == \
            fingerprint(world_clip_path()) != world["fingerprint"]


def test_a_cached_hub_id_is_the_commit_of_the_snapshot_it_loaded_from(tmp_path, monkeypatch):
    """The snapshot load_pipeline loaded (refs/main, or a revision= given), read from the cache: no network."""
    from diffusers import DiffusionPipeline

    from prkit.revisions import cached_commit, model_revision, pipeline_revision

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = tiny_pipeline(tmp_path / "build")
    cache = _hub_cache(tmp_path / "cache", "prkit-tests/tiny", lambda f: tiny.save_pretrained(str(f)),
                       commits=(COMMIT, OTHER), main=OTHER)
    pipe = prkit.load_pipeline("prkit-tests/tiny", device="cpu", cache_dir=str(cache))
    assert pipe.prkit_revision == {"kind": "hub", "id": "prkit-tests/tiny", "commit": OTHER}
    assert pipeline_revision(pipe) == pipe.prkit_revision
    older = prkit.load_pipeline("prkit-tests/tiny", device="cpu", cache_dir=str(cache), revision=COMMIT)
    assert older.prkit_revision["commit"] == COMMIT
    # a pipeline diffusers loaded itself: where its UNet came from names the snapshot
    plain = DiffusionPipeline.from_pretrained("prkit-tests/tiny", cache_dir=str(cache), revision=COMMIT)
    assert pipeline_revision(plain) == {"kind": "hub", "id": "prkit-tests/tiny", "commit": COMMIT}
    assert cached_commit("prkit-tests/tiny", cache_dir=str(cache)) == OTHER
    assert cached_commit("prkit-tests/tiny", cache_dir=str(cache), revision=COMMIT) == COMMIT
    assert cached_commit("prkit-tests/absent", cache_dir=str(cache)) is None
    assert model_revision("prkit-tests/tiny") is None  # a hub id whose snapshot the caller does not know: unknown


def test_metric_backbones_record_their_revisions(tmp_path, monkeypatch):
    from prkit.metrics import try_load_clip
    from prkit.revisions import model_revision

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_clip(tmp_path / "clip")
    clip, reason = try_load_clip(str(folder))
    assert reason is None and clip.revision == model_revision(folder) and clip.revision["kind"] == "folder"
    cache = _hub_cache(tmp_path / "cache", "prkit-tests/clip", lambda f: shutil.copytree(folder, f))
    hub, reason = try_load_clip("prkit-tests/clip", cache_dir=str(cache))
    assert reason is None and hub.revision == {"kind": "hub", "id": "prkit-tests/clip", "commit": COMMIT}


def test_a_revision_that_cannot_be_known_is_none_and_fails_nothing(tmp_path, monkeypatch, pipe):
    import prkit.revisions as revisions

    assert revisions.pipeline_revision(pipe) is None  # built in memory: no name, no folder
    assert revisions.model_revision("") is None and revisions.model_revision("no/such-repo") is None
    folder = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(str(folder))

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(revisions, "fingerprint", broken)
    loaded = prkit.load_pipeline(folder, device="cpu")
    assert loaded.prkit_revision is None and revisions.model_revision(folder) is None
    monkeypatch.undo()
    monkeypatch.setattr(revisions, "WHOLE", -1)  # every file read in slices: a file shorter than one still hashes
    assert revisions.fingerprint(folder).startswith("sha256:")


def _saved_folder(tmp_path) -> Path:
    folder = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
def test_a_trained_set_records_its_base_models_revision_in_its_file(tmp_path, monkeypatch, fast):
    from prkit.files import load_residuals, read_metadata

    folder = _saved_folder(tmp_path)
    pipe = prkit.load_pipeline(folder, device="cpu")
    assert pipe.prkit_revision["kind"] == "folder" and pipe.prkit_revision["path"] == str(folder.resolve())
    result = prkit.train_residuals(pipe, make_concept(), steps=2, batch_size=2, progress=False, fast=fast)
    assert result.residuals.meta["base_model_revision"] == pipe.prkit_revision
    path = result.residuals.save(tmp_path / "dog.safetensors")
    meta = read_metadata(path)
    assert meta["base_model"] == str(folder.resolve()) and meta["base_model_revision"] == pipe.prkit_revision
    monkeypatch.chdir(tmp_path)  # the model named as `prkit train --model model` names it: the same model
    assert read_metadata(result.residuals.save(tmp_path / "b.safetensors", base_model="model"))[
        "base_model_revision"] == pipe.prkit_revision
    # saved as another model's: the trained-on model's revision is not that model's
    assert read_metadata(result.residuals.save(tmp_path / "c.safetensors", base_model="other/model"))[
        "base_model_revision"] is None
    result.residuals.remove()
    again = load_residuals(pipe, path)  # loaded and saved again: kept
    assert read_metadata(again.save(tmp_path / "d.safetensors"))["base_model_revision"] == pipe.prkit_revision


def test_files_without_a_revision_or_with_a_damaged_one_load(tmp_path, pipe):
    from prkit.files import atomic_save, load_residuals, read_metadata, safetensors_header

    residuals = prkit.add_residuals(pipe.unet, rank=2, token="sks", class_word="dog")
    path = residuals.save(tmp_path / "old.safetensors")  # no revision known: none written, as older files
    assert "base_model_revision" not in safetensors_header(path, "file")
    assert read_metadata(path)["base_model_revision"] is None
    header, tensors = safetensors_header(path, "file"), residuals.state_dict()
    for value in ("not json", "[1, 2]", "null"):
        atomic_save(tensors, tmp_path / "edited.safetensors", {**header, "base_model_revision": value})
        assert read_metadata(tmp_path / "edited.safetensors")["base_model_revision"] is None
    residuals.remove()
    assert load_residuals(pipe, tmp_path / "edited.safetensors").meta.get("base_model_revision") is None


def test_prkit_info_shows_the_revision_where_the_file_has_one(tmp_path, capsys):
    from prkit.cli import main
    from prkit.files import atomic_save, safetensors_header

    pipe = tiny_pipeline(tmp_path / "build")
    residuals = prkit.add_residuals(pipe.unet, rank=2, token="sks", class_word="dog")
    old = residuals.save(tmp_path / "old.safetensors")
    record = {"kind": "hub", "id": "owner/model", "commit": COMMIT}
    atomic_save(residuals.state_dict(), tmp_path / "new.safetensors",
                {**safetensors_header(old, "file"), "base_model_revision": json.dumps(record)})
    assert main(["info", str(tmp_path / "new.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert "base_revision" in shown and COMMIT in shown
    assert main(["info", str(old)]) == 0
    assert "base_revision" not in capsys.readouterr().out


def test_a_unet_given_in_place_of_the_models_own_records_no_revision(tmp_path):
    """load_pipeline(folder, unet=...) recorded the folder's revision (and a hub id's, its snapshot's, taken from
    the VAE or text encoder) for a UNet that came from elsewhere; residuals trained on it were saved claiming it."""
    from prkit.revisions import pipeline_revision
    from tiny import tiny_unet

    folder = tmp_path / "m"
    tiny_pipeline(tmp_path / "b").save_pretrained(folder)
    pipe = prkit.load_pipeline(str(folder), device="cpu")
    assert pipe.prkit_revision["kind"] == "folder"
    assert prkit.load_pipeline(str(folder), device="cpu", unet=tiny_unet()).prkit_revision is None
    del pipe.prkit_revision  # a pipeline load_pipeline did not record: its UNet's own place decides
    assert pipeline_revision(pipe)["kind"] == "folder"
    pipe.unet.register_to_config(_name_or_path=str(tmp_path / "elsewhere"))
    assert pipeline_revision(pipe) is None
