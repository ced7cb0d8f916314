"""Loading base models: local folders, offline hub ids with a useful message, device/dtype choice, light import."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import prkit
from conftest import make_pipe, run_unet, unet_inputs
from prkit.pipeline import resolve_device, resolve_dtype
from prkit.train_config import TrainConfig, _precision


def test_load_pipeline_from_a_saved_folder(pipe, tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    pipe.save_pretrained(str(folder))
    loaded = prkit.load_pipeline(folder, device="cpu")
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert loaded.unet.device.type == "cpu" and loaded.unet.dtype == torch.float32
    assert loaded.name_or_path == str(folder)
    monkeypatch.chdir(tmp_path)  # a relative folder is recorded absolute: read from elsewhere it is no hub id
    assert prkit.load_pipeline("saved", device="cpu").name_or_path == str(folder.resolve())
    inputs = unet_inputs()
    assert torch.equal(run_unet(loaded.unet, inputs), run_unet(pipe.unet, inputs))
    half = prkit.load_pipeline(str(folder), device="cpu", dtype="bf16")
    assert half.unet.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16


def test_offline_hub_id_says_how_to_get_the_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "prkit-tests/no-such-model"
    with pytest.raises(RuntimeError) as err:
        prkit.load_pipeline(name, device="cpu")
    message = str(err.value)
    assert name in message and "download" in message and "HF_HUB_OFFLINE" in message


def test_a_file_given_as_the_model_is_named_as_a_file(tmp_path):
    photo = tmp_path / "dog.png"
    photo.write_bytes(b"not a pipeline")
    with pytest.raises(FileNotFoundError, match=r"dog\.png' is a file, not a diffusers pipeline folder"):
        prkit.load_pipeline(photo)


def test_folder_without_model_index_raises(tmp_path):
    folder = tmp_path / "not_a_pipeline"
    folder.mkdir()
    (folder / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not_a_pipeline.*model_index\.json"):
        prkit.load_pipeline(folder, device="cpu")


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cuda:1")) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_resolve_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, torch.device("mps")) == torch.float32
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    for text, dtype in [("fp32", torch.float32), ("float16", torch.float16), ("bf16", torch.bfloat16)]:
        assert resolve_dtype(text, cpu) == dtype
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    for capability, dtype in [((9, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((7, 5), torch.float16),
                              ((7, 0), torch.float16)]:  # H100, RTX 30xx; a T4 (Colab) and a V100 only emulate bf16
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_dtype(None, cuda) == dtype
        assert _precision(TrainConfig(), cuda) == dtype  # the training's "auto" too
        assert _precision(TrainConfig(), cuda, torch.float32) == dtype
        for stored in (torch.float16, torch.bfloat16):  # a UNet stored in a half precision trains in that one
            assert _precision(TrainConfig(), cuda, stored) == stored
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype("fp8", cpu)


def test_import_prkit_is_light():
    code = ("import sys, prkit; heavy = [m for m in ('diffusers', 'transformers', 'safetensors', 'prkit.train') "
            "if m in sys.modules]; assert not heavy, heavy; assert prkit.add_residuals.__module__ == "
            "'prkit.residuals'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _trained(pipe, **config):
    from conftest import make_concept

    from prkit.residuals import remove_residuals

    result = prkit.train_residuals(pipe, make_concept(), steps=3, progress=False, batch_size=2, **config)
    weights = {k: v.detach().clone() for k, v in result.residuals.state_dict().items()}
    remove_residuals(pipe.unet, result.residuals.name)
    return weights


def test_model_folder_defaults_set_the_learning_rate(pipe, tmp_path):
    """A folder's prkit_defaults.json is the learning rate when TrainConfig leaves it None; explicit values win."""
    import json

    from prkit.pipeline import model_defaults
    from prkit.train import default_learning_rate

    plain, own = tmp_path / "plain", tmp_path / "own"
    pipe.save_pretrained(str(plain))
    pipe.save_pretrained(str(own))
    (own / "prkit_defaults.json").write_text(json.dumps({"residuals": {"learning_rate": 0.02}}))
    p_plain, p_own = prkit.load_pipeline(plain, device="cpu"), prkit.load_pipeline(own, device="cpu")
    assert model_defaults(p_plain) == {} and model_defaults(p_own) == {"learning_rate": 0.02}
    assert default_learning_rate(p_plain) == 1e-3 and default_learning_rate(p_own) == 0.02  # METHOD's / the folder's
    assert default_learning_rate(p_own, "lora") == 1e-4  # other targets: their published recipe
    assert default_learning_rate(p_own, "custom_diffusion", batch_size=4) == pytest.approx(4e-5)  # lr x batch
    by_default = _trained(p_own)
    assert all(torch.equal(by_default[k], v) for k, v in _trained(p_own, learning_rate=0.02).items())
    assert not all(torch.equal(by_default[k], v) for k, v in _trained(p_own, learning_rate=1e-3).items())
    plain_default = _trained(p_plain)
    assert all(torch.equal(plain_default[k], v) for k, v in _trained(p_plain, learning_rate=1e-3).items())


def test_world_ships_its_learning_rate_and_bad_defaults_name_the_file(tmp_path):
    from prkit.pipeline import read_model_defaults, world_path

    assert read_model_defaults(world_path()) == {"residuals": {"learning_rate": 0.01}}
    (tmp_path / "prkit_defaults.json").write_text("{not json")
    with pytest.raises(ValueError, match="prkit_defaults.json"):
        read_model_defaults(tmp_path)
    (tmp_path / "prkit_defaults.json").write_text('{"learning_rate": 0.01}')
    with pytest.raises(ValueError, match="residuals"):
        read_model_defaults(tmp_path)
    (tmp_path / "prkit_defaults.json").write_text('{"residuals": {"steps": 300}}')
    with pytest.raises(ValueError, match="residuals.steps.*only learning_rate"):
        read_model_defaults(tmp_path)


def test_a_device_that_is_not_there_is_a_clear_error(monkeypatch):
    from prkit.pipeline import check_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda' was asked for, but this torch sees no CUDA GPU"):
        check_available(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:1' was asked for, but this machine has 1 CUDA GPU"):
        check_available(torch.device("cuda:1"))
    check_available(torch.device("cuda:0"))
    check_available(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"'gpu0' is not a device torch knows"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("mps", "xpu"):  # checked before any loading, not an AssertionError deep in torch
        with pytest.raises(ValueError, match=rf"'{name}' was asked for, but this torch .* cannot use it here"):
            check_available(torch.device(name))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    check_available(torch.device("mps"))


def _tiny_checker():
    """A StableDiffusionSafetyChecker and its feature extractor, tiny and seeded."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)).eval()
    return checker, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _with_checker(pipe):
    from diffusers import StableDiffusionPipeline

    checker, features = _tiny_checker()
    return StableDiffusionPipeline(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                   tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, safety_checker=checker,
                                   feature_extractor=features)


def _tiny_sdxl(folder, refiner: bool = False):
    """A tiny StableDiffusionXLPipeline (text_time embedding, two text encoders); ``refiner``: a refiner-style
    StableDiffusionXLImg2ImgPipeline (the second text encoder alone, aesthetic-score time ids)."""
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tiny import tiny_tokenizer, tiny_vae

    tokenizer, tokenizer_2 = tiny_tokenizer(folder / "tokenizer"), tiny_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                                cross_attention_dim=32 if refiner else 64, attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + (5 if refiner else 6) * 8).eval()
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=32)
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                                text_encoder_2=CLIPTextModelWithProjection(config).eval(),
                                                tokenizer_2=tokenizer_2, scheduler=EulerDiscreteScheduler(),
                                                requires_aesthetics_score=True)
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(config).eval(),
                                     text_encoder_2=CLIPTextModelWithProjection(config).eval(), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler())


@pytest.mark.parametrize("component", ["tokenizer", "vae"])
def test_a_missing_component_folder_is_named(pipe, tmp_path, component):
    import shutil

    folder = tmp_path / "model"
    pipe.save_pretrained(str(folder))
    shutil.rmtree(folder / component)
    with pytest.raises(ValueError) as err:
        prkit.load_pipeline(folder, device="cpu")
    kind = {"tokenizer": "transformers.CLIPTokenizer", "vae": "diffusers.AutoencoderKL"}[component]
    assert str(err.value).startswith(f"model folder {str(folder)!r} has no {component}/ ({kind}) subfolder, which "
                                     "its model_index.json lists")
    assert prkit.load_pipeline(folder, device="cpu", **{component: getattr(pipe, component)}).unet is not None


def test_optional_components_may_be_missing(pipe, tmp_path):
    """The safety checker prkit drops, and the feature extractor that only feeds it, need no folder."""
    import shutil

    folder = tmp_path / "model"
    _with_checker(pipe).save_pretrained(str(folder))
    shutil.rmtree(folder / "safety_checker")
    shutil.rmtree(folder / "feature_extractor")
    loaded = prkit.load_pipeline(folder, device="cpu")
    assert loaded.safety_checker is None and loaded.feature_extractor is None


def test_the_safety_checker_is_dropped_by_pipeline_class_not_by_name(pipe, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    for where in ("sd15", "pixl/sd15", "sd15-xlarge"):  # an SD1.x folder whose path happens to hold 'xl'
        _with_checker(pipe).save_pretrained(str(tmp_path / where))
        assert (tmp_path / where / "safety_checker").is_dir()
        assert prkit.load_pipeline(tmp_path / where, device="cpu").safety_checker is None, where
    _tiny_sdxl(tmp_path / "build").save_pretrained(str(tmp_path / "mymodel"))  # an SDXL folder without 'xl'
    calls, real = [], DiffusionPipeline.from_pretrained.__func__
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: calls.append(kwargs) or real(cls, *args, **kwargs)))
    loaded = prkit.load_pipeline(tmp_path / "mymodel", device="cpu")
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    assert "safety_checker" not in calls[0] and "feature_extractor" not in calls[0]
    assert prkit.load_pipeline(tmp_path / "sd15", device="cpu") is not None
    assert calls[1]["safety_checker"] is None


def test_the_diffusers_spellings_of_dtype_and_local_files_only_work(pipe, tmp_path):
    folder = tmp_path / "model"
    pipe.save_pretrained(str(folder))
    assert prkit.load_pipeline(folder, device="cpu", torch_dtype=torch.bfloat16).unet.dtype == torch.bfloat16
    assert prkit.load_pipeline(folder, device="cpu", dtype="bf16", torch_dtype=torch.bfloat16).unet.dtype \
        == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype='fp32' and torch_dtype=torch.bfloat16 disagree"):
        prkit.load_pipeline(folder, device="cpu", dtype="fp32", torch_dtype=torch.bfloat16)
    assert prkit.load_pipeline(folder, device="cpu", local_files_only=True).unet.dtype == torch.float32
    assert prkit.load_pipeline(folder, device="cpu", local_files_only=False).unet.dtype == torch.float32


def test_hub_ids_read_the_pipeline_class_from_their_model_index(pipe, tmp_path, monkeypatch):
    """A cached hub id: the class in its model_index.json, fetched alone first, decides about the safety checker."""
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache, revision = tmp_path / "cache", "0" * 40
    models = {"prkit-tests/sd-xl-like-name": _with_checker(pipe), "prkit-tests/big": _tiny_sdxl(tmp_path)}
    for repo, model in models.items():
        root = cache / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(revision)
        model.save_pretrained(str(root / "snapshots" / revision))
    calls, real = [], DiffusionPipeline.from_pretrained.__func__
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: calls.append(kwargs) or real(cls, *args, **kwargs)))
    sd = prkit.load_pipeline("prkit-tests/sd-xl-like-name", device="cpu", cache_dir=str(cache))
    assert type(sd).__name__ == "StableDiffusionPipeline" and sd.safety_checker is None
    xl = prkit.load_pipeline("prkit-tests/big", device="cpu", cache_dir=str(cache))
    assert type(xl).__name__ == "StableDiffusionXLPipeline" and "safety_checker" not in calls[1]


def test_the_unets_structure_is_built_from_its_config_alone(pipe, tmp_path, monkeypatch):
    """unet_structure: the UNet load_pipeline gives, its layers and config, on the meta device and from two JSON files
    (a folder's, a cached hub id's); None where it cannot say (load_pipeline then loads or refuses the model), and
    a name that is no model refused as load_pipeline refuses it."""
    import json

    from diffusers import ModelMixin

    from prkit.files import architecture, layer_table
    from prkit.pipeline import unet_structure

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, cache, revision = tmp_path / "model", tmp_path / "cache", "0" * 40
    _tiny_sdxl(tmp_path / "xl").save_pretrained(str(folder))
    root = cache / "models--prkit-tests--xl"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    pipe.save_pretrained(str(root / "snapshots" / revision))
    loaded = {"folder": prkit.load_pipeline(folder, device="cpu").unet,
              "hub": prkit.load_pipeline("prkit-tests/xl", device="cpu", cache_dir=str(cache)).unet}
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("weights")))
    built = {"folder": unet_structure(folder), "hub": unet_structure("prkit-tests/xl", cache_dir=str(cache))}
    for where, unet in built.items():
        assert {p.device.type for p in unet.parameters()} == {"meta"}
        assert dict(unet.config) == {k: v for k, v in loaded[where].config.items() if k != "_name_or_path"}
        assert layer_table(unet) == layer_table(loaded[where]) and architecture(unet) == architecture(loaded[where])
    assert architecture(built["folder"]) == "sdxl" and architecture(built["hub"]) == "sd1"
    assert unet_structure("world") is not None
    with pytest.raises(RuntimeError, match="could not load model 'prkit-tests/not-cached': this machine is offline"):
        unet_structure("prkit-tests/not-cached", cache_dir=str(cache))  # as load_pipeline says it (asked once: the
    # export's fallback to load_pipeline would ask the hub again, and wait as long again where it is unreachable)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNetSpatioTemporal"]}))
    assert unet_structure(folder) is None
    with pytest.raises(RuntimeError, match="spelt 'world'"):
        unet_structure("World")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        unet_structure(tmp_path)


def test_lag_looks_for_the_concept_in_sdxls_second_prompt_too(tmp_path, monkeypatch):
    """SDXL joins its two text encoders' outputs position by position; with a prompt_2 of its own the concept's
    words there sit elsewhere, and LAG's weights cover both places (the identifier is required in prompt only)."""
    from conftest import randomize
    from prkit.lag import lag_sampling

    pipe = _tiny_sdxl(tmp_path)
    dog = prkit.add_residuals(pipe.unet, rank=2, name="dog", token="sks", class_word="dog", seed=0)
    randomize(dog)
    prompt, prompt_2 = "a photo of a sks dog", "the beach next to the cat next to a sks dog"

    def marked(weights):
        return weights[0, :, 0].nonzero().flatten().tolist()

    def positions(tokenizer, text):
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length).input_ids
        words = {tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("sks", "dog")}
        return [i for i, t in enumerate(ids) if t in words]

    first, second = positions(pipe.tokenizer, prompt), positions(pipe.tokenizer_2, prompt_2)
    assert first == [5, 6] and second and not set(first) & set(second)
    with lag_sampling(pipe, dog, prompt) as state:
        assert marked(state.concept_weights) == first
    with lag_sampling(pipe, dog, prompt, prompts_2=prompt_2) as state:
        assert marked(state.concept_weights) == sorted(first + second)
    with lag_sampling(pipe, dog, prompt, prompts_2="a photo of the beach") as state:  # no concept there: nothing added
        assert marked(state.concept_weights) == first
    with pytest.raises(ValueError, match="prompt_2 has 2 prompts for 1 prompts"):
        with lag_sampling(pipe, dog, prompt, prompts_2=[prompt_2, prompt_2]):
            pass
    import prkit.sample as sample

    seen = []
    real = sample.lag_sampling
    monkeypatch.setattr(sample, "lag_sampling", lambda *a, **k: (seen.append(k.get("prompts_2")), real(*a, **k))[1])
    images = prkit.generate(pipe, prompt, dog, prompt_2=prompt_2, steps=2, output_type="np", height=32, width=32)
    assert seen == [[prompt_2]] and images.shape == (1, 32, 32, 3)
    # one prompt_2 (and negative_prompt_2) for several prompts, as generate takes one negative prompt: the pipeline
    # itself wants one per prompt (a size mismatch inside diffusers before)
    images = prkit.generate(pipe, [prompt, prompt], dog, prompt_2="a photo of the beach", negative_prompt_2="snow",
                            steps=2, output_type="np", height=32, width=32)
    assert seen[-1] == ["a photo of the beach"] * 2 and images.shape == (2, 32, 32, 3)


def test_sdxl_img2img_and_a_refiner_train_and_sample_with_lag(tmp_path):
    """Training asked the pipeline's private _get_add_time_ids, whose signature the img2img pipelines change
    (TypeError for SDXL img2img, inpainting and refiners); LAG on a refiner (no first tokenizer) asked for a
    tokenizer as if given a bare UNet."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    import prkit.train as train
    from conftest import make_concept, randomize

    config = prkit.TrainConfig(steps=2, batch_size=1, checkpoint_every=0, learning_rate=1e-2)
    concept = make_concept(resolution=32)
    base = _tiny_sdxl(tmp_path / "base")
    want = prkit.train_residuals(base, concept, config, name="t", progress=False).losses
    prkit.remove_residuals(base.unet, "t")
    i2i = StableDiffusionXLImg2ImgPipeline.from_pipe(base)
    assert prkit.train_residuals(i2i, concept, config, name="t", progress=False).losses == want

    refiner = _tiny_sdxl(tmp_path / "refiner", refiner=True)
    assert train.sdxl_time_ids(refiner, (32, 24)).tolist() == [[32, 24, 0, 0, 6.0]]
    result = prkit.train_residuals(refiner, concept, config, name="r", progress=False)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    randomize(result.residuals)
    call = dict(image=torch.rand(1, 3, 32, 32), strength=0.5, steps=4, output_type="np", seed=0)
    with_lag = prkit.generate(refiner, "a photo of a sks dog", result.residuals, lag=True, **call)
    without = prkit.generate(refiner, "a photo of a sks dog", result.residuals, lag=False, **call)
    assert with_lag.shape == (1, 32, 32, 3) and 0 < np.abs(with_lag - without).max()
    refiner.register_to_config(requires_aesthetics_score=False)  # time ids that do not fit this UNet: said so
    with pytest.raises(ValueError, match="takes 72 added-condition features, but 6 time ids.*requires_aesthetics"):
        train.sdxl_time_ids(refiner, 32)


def test_sdxl_size_conditioning_follows_non_square_images_and_mixed_sizes_are_refused(tmp_path):
    """SDXL is told the training images' size; a hand-made Concept of 24-high, 16-wide images was conditioned as
    16x16, and images of several sizes failed inside numpy."""
    from PIL import Image

    import prkit.train as train
    from prkit.data import Concept

    pipe = _tiny_sdxl(tmp_path)
    tall = [Image.new("RGB", (16, 24), (40 * i, 90, 200)) for i in range(3)]
    cache = train._Cache(pipe, Concept(tall, "sks", "dog", []), "a photo of a sks dog", flip=False)
    assert cache.cond["added_cond_kwargs"]["time_ids"].flatten().tolist() == [24, 16, 0, 0, 24, 16]
    mixed = Concept(tall[:2] + [Image.new("RGB", (16, 16))], "sks", "dog", [])
    with pytest.raises(ValueError, match=r"2 sizes \(16x16, 16x24\).*crop or resize them to one size"):
        mixed.tensors()


def test_a_name_that_is_neither_a_folder_nor_a_hub_id_is_refused_before_the_hub(monkeypatch, tmp_path):
    """'sd15' (no folder here) went to the hub first: ~30 s of retries before the message on a connected machine."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(RuntimeError, match="there is no such folder"):
        prkit.load_pipeline("sd15", device="cpu")
    with pytest.raises(RuntimeError, match="spelt 'world'"):
        prkit.load_pipeline("World", device="cpu")


@pytest.mark.parametrize("name", ["", "  ", "\t"])
def test_an_empty_model_name_is_refused_naming_the_argument(pipe, tmp_path, monkeypatch, name):
    """load_pipeline("") read as the current folder (Path("") is '.'): an unset variable loaded whatever model
    folder one stood in, or named '.' in the error; whitespace went on as a name. The CLI refuses an empty --model."""
    pipe.save_pretrained(str(tmp_path / "here"))
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(ValueError) as err:
        prkit.load_pipeline(name, device="cpu")
    assert str(err.value) == (f"load_pipeline: name_or_path={name!r} is empty; give 'world' (the embedded model), a "
                              "diffusers folder ('.' for the current one) or a hub id (an unset variable?)")
    assert type(prkit.load_pipeline(".", device="cpu")).__name__ == "StableDiffusionPipeline"  # said so, it loads


@pytest.mark.parametrize("name", ["", "  "])
def test_the_other_functions_taking_a_model_name_refuse_an_empty_one_as_load_pipeline_does(pipe, tmp_path,
                                                                                             monkeypatch, name):
    """unet_structure("") built the UNet of the model folder one stood in, and read_model_defaults("") read its
    prkit_defaults.json (Path("") is '.'); load_pipeline("") was refused."""
    from prkit.pipeline import read_model_defaults, unet_structure

    pipe.save_pretrained(str(tmp_path / "here"))
    (tmp_path / "here" / "prkit_defaults.json").write_text('{"residuals": {"learning_rate": 0.5}}')
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(ValueError) as err:
        unet_structure(name)
    assert str(err.value) == (f"unet_structure: name_or_path={name!r} is empty; give 'world' (the embedded model), a "
                              "diffusers folder ('.' for the current one) or a hub id (an unset variable?)")
    with pytest.raises(ValueError) as err:
        read_model_defaults(name)
    assert str(err.value) == (f"read_model_defaults: folder={name!r} is empty; give the model's folder ('.' for the "
                              "current one) (an unset variable?)")
    assert unet_structure(".") is not None  # said so, they read it
    assert read_model_defaults(".") == {"residuals": {"learning_rate": 0.5}}


def test_a_half_precision_cpu_load_says_so_once_in_prkits_words(pipe, tmp_path):
    """diffusers claimed three times per load that a half-precision pipeline on the CPU will fail (it runs), and
    transformers that its image processors want torchvision (prkit loads none)."""
    import logging
    import warnings

    names = ("transformers.utils.import_utils", "diffusers.pipelines.pipeline_utils")
    heard: list[str] = []
    catch = logging.Handler()
    catch.emit = lambda record: heard.append(record.getMessage())
    for name in names:  # on the loggers themselves: the libraries' roots do not propagate
        logging.getLogger(name).addHandler(catch)
    folder = tmp_path / "model"
    pipe.save_pretrained(str(folder))
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            half = prkit.load_pipeline(folder, device="cpu", dtype="fp16")
        assert half.unet.dtype == torch.float16
        ours = [w for w in seen if "on the CPU" in str(w.message)]
        assert len(ours) == 1 and str(ours[0].message).startswith("float16 on the CPU: it runs")
        assert ours[0].filename == __file__  # pointed at the caller's line
        assert not [m for m in heard if "cannot run with `cpu` device" in m or "requires torchvision" in m]
        with prkit.pipeline._library_notes_off():
            for name in names:
                logging.getLogger(name).warning("x requires torchvision (not installed); cannot run with `cpu` device")
            logging.getLogger(names[0]).warning("another note")
        assert heard == ["another note"]
        logging.getLogger(names[1]).warning("y cannot run with `cpu` device")  # outside a load: the library's own
        assert heard[-1] == "y cannot run with `cpu` device"
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            prkit.load_pipeline(folder, device="cpu")
        assert not [w for w in seen if "on the CPU" in str(w.message)]
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(catch)


def test_the_library_note_filters_nest_and_come_off_after_an_error():
    import logging

    from prkit.pipeline import _library_notes_off

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    before = list(logger.filters)
    with _library_notes_off():
        with _library_notes_off():
            pass
        assert len(logger.filters) == len(before) + 1  # the outer load's filter stays on
    with pytest.raises(RuntimeError), _library_notes_off():
        raise RuntimeError("a load failed")
    assert logger.filters == before


def test_a_folder_saved_in_one_variant_only_loads_without_naming_it(pipe, tmp_path):
    """A folder of ``*.fp16.safetensors`` weights alone (``save_pretrained(..., variant="fp16")``, or an ``hf download
    --include "*fp16*"``) failed with diffusers' 'no file named diffusion_pytorch_model.bin', and `prkit train/sample`
    have no flag to name the variant; a folder with plain weights still loads those, and a variant asked for wins."""
    import shutil

    folder = tmp_path / "fp16"
    pipe.save_pretrained(str(folder), variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    inputs = unet_inputs()
    loaded = prkit.load_pipeline(folder, device="cpu")
    assert torch.equal(run_unet(loaded.unet, inputs), run_unet(pipe.unet, inputs))
    assert loaded.unet.dtype == torch.float32
    mixed = tmp_path / "mixed"  # the UNet in the variant alone, the rest plain
    pipe.save_pretrained(str(mixed))
    shutil.rmtree(mixed / "unet")
    shutil.copytree(folder / "unet", mixed / "unet")
    assert torch.equal(run_unet(prkit.load_pipeline(mixed, device="cpu").unet, inputs), run_unet(pipe.unet, inputs))
    both = tmp_path / "both"  # plain weights beside the variant's: the plain ones, as diffusers loads them
    pipe.save_pretrained(str(both))
    other = make_pipe(tmp_path / "other")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    other.unet.save_pretrained(str(both / "unet"), variant="fp16")
    assert torch.equal(run_unet(prkit.load_pipeline(both, device="cpu").unet, inputs), run_unet(pipe.unet, inputs))
    assert torch.equal(run_unet(prkit.load_pipeline(both, device="cpu", variant="fp16").unet, inputs),
                       run_unet(other.unet, inputs))


def test_a_pipeline_class_prkit_does_not_load_is_refused_before_its_weights(tmp_path, monkeypatch):
    """An SDXL refiner folder (StableDiffusionXLImg2ImgPipeline in its model_index.json) had all its weights loaded
    (GBs) before it was refused, in words that did not say how prkit can use it (prkit.generate takes a refiner
    loaded with diffusers)."""
    from diffusers import DiffusionPipeline

    _tiny_sdxl(tmp_path / "build", refiner=True).save_pretrained(str(tmp_path / "refiner"))
    real, loads = DiffusionPipeline.from_pretrained.__func__, []
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: loads.append(args) or real(cls, *args, **kwargs)))
    with pytest.raises(TypeError) as err:
        prkit.load_pipeline(tmp_path / "refiner", device="cpu")
    assert loads == []
    assert str(err.value) == (
        f"{str(tmp_path / 'refiner')!r} is a StableDiffusionXLImg2ImgPipeline (its model_index.json says so); "
        "load_pipeline loads StableDiffusionPipeline, StableDiffusionXLPipeline. An img2img pipeline such as an SDXL "
        "refiner: load it with diffusers' StableDiffusionXLImg2ImgPipeline.from_pretrained(...) and pass it to "
        "prkit.generate (image=..., strength=...) or prkit.train_residuals")
    refiner = DiffusionPipeline.from_pretrained(str(tmp_path / "refiner"))  # as the message says: it samples
    images = prkit.generate(refiner, "a photo of a dog", image=torch.rand(1, 3, 32, 32), strength=0.5, steps=2,
                            output_type="np")
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_a_model_index_without_a_known_pipeline_class_is_refused_naming_the_file(pipe, tmp_path):
    """A model_index.json naming a class this diffusers lacks (a typo, a newer diffusers' pipeline) ended in
    diffusers' 'AttributeError: module diffusers has no attribute FooPipeline', one without _class_name in a bare
    "KeyError: '_class_name'"; neither said which file is wrong."""
    import json

    for case, edit in [("unknown", lambda index: index.update(_class_name="FooPipeline")),
                       ("missing", lambda index: index.pop("_class_name"))]:
        folder = tmp_path / case
        pipe.save_pretrained(str(folder))
        index = json.loads((folder / "model_index.json").read_text())
        edit(index)
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(TypeError) as err:
            prkit.load_pipeline(folder, device="cpu")
        message = str(err.value)
        assert repr(str(folder)) in message and "model_index.json" in message and "_class_name" in message, message
        assert ("'FooPipeline'" in message and "diffusers" in message) if case == "unknown" else True, message
        assert "StableDiffusionPipeline" in message, message


def test_dtype_auto_is_the_default_precision(pipe, tmp_path):
    """device='auto' was taken and dtype='auto' (diffusers' and transformers' torch_dtype="auto" too) refused as
    'not one of fp32, fp16, bf16', which did not say that the automatic choice is dtype=None."""
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    folder = tmp_path / "model"
    pipe.save_pretrained(str(folder))
    assert prkit.load_pipeline(folder, device="cpu", dtype="auto").unet.dtype == torch.float32
    assert prkit.load_pipeline(folder, device="cpu", torch_dtype="auto").unet.dtype == torch.float32
    assert prkit.load_pipeline(folder, device="cpu", dtype="bf16", torch_dtype="auto").unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype 'fp8' is not one of .*auto"):
        resolve_dtype("fp8", cpu)


def test_a_hub_id_not_in_the_cache_says_why_the_hub_was_not_asked_and_which_revision_to_fetch(monkeypatch, tmp_path):
    """local_files_only=True was reported as 'the hub could not be reached' (it was never asked), and the download
    advice for a revision= fetched the main branch instead."""
    from prkit.pipeline import unet_structure

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # local_files_only=True alone keeps the hub out
    name, cache = "prkit-tests/no-such-model", str(tmp_path / "cache")
    with pytest.raises(RuntimeError) as err:
        prkit.load_pipeline(name, device="cpu", local_files_only=True, revision="v1.0", cache_dir=cache)
    message = str(err.value)
    assert "local_files_only=True" in message and "could not be reached" not in message, message
    assert f"hf download {name} --revision v1.0 --local-dir" in message, message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as err:
        unet_structure(name, revision="v1.0", cache_dir=cache)
    assert "HF_HUB_OFFLINE" in str(err.value) and "--revision v1.0" in str(err.value), str(err.value)
