"""Baselines as training targets: only their parameters change, remove() restores the model exactly, recipes."""

from __future__ import annotations

import io
import math

import pytest
import torch

import prkit
import prkit.train as train
import prkit.train_inputs as train_inputs
from conftest import make_concept, make_pipe, run_unet, unet_inputs
from prkit.targets import RECIPES, TARGETS, CustomDiffusionTarget, TokenEmbedding, recipe

FAST = dict(progress=False, batch_size=2, steps=3)
TOKEN_PROMPT, PLAIN_PROMPT = "a photo of a sks dog", "a photo of a dog"


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{m}.{n}": p.detach().clone() for m in ("unet", "text_encoder", "vae")
            for n, p in getattr(pipe, m).named_parameters()}


@torch.no_grad()
def _outputs(pipe) -> dict[str, torch.Tensor]:
    """Text conditioning with and without the identifier, and the UNet's output on fixed inputs."""
    return {"token": train.encode_text(pipe, TOKEN_PROMPT, 16)["encoder_hidden_states"].clone(),
            "plain": train.encode_text(pipe, PLAIN_PROMPT, 16)["encoder_hidden_states"].clone(),
            "unet": run_unet(pipe.unet, unet_inputs())}


def _modules(pipe) -> dict[str, int]:
    return {n: id(m) for n, m in list(pipe.unet.named_modules()) + list(pipe.text_encoder.named_modules())}


def _train(pipe, target: str):
    cfg = recipe(target)
    return prkit.train_residuals(pipe, make_concept(), target=target, learning_rate=cfg["learning_rate"], **FAST)


def _snapshot(pipe) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    return [(f"{m}.{n}", p, p.detach().clone()) for m in ("unet", "text_encoder", "vae")
            for n, p in getattr(pipe, m).named_parameters()]


def _changed(snapshot) -> set[str]:
    """Names of the snapshot's parameter objects whose values moved (wrappers may rename them meanwhile)."""
    return {name for name, p, value in snapshot if not torch.equal(p.detach(), value)}


@pytest.mark.parametrize("target", ["textual_inversion", "custom_diffusion", "dreambooth"])
def test_only_intended_parameters_change_and_remove_restores(tmp_path, target):
    pipe = make_pipe(tmp_path)
    state, snapshot, outputs, modules = _state(pipe), _snapshot(pipe), _outputs(pipe), _modules(pipe)
    flags = {id(p): p.requires_grad for _, p, _ in snapshot}
    result = _train(pipe, target)
    handle = result.residuals
    assert result.steps_done == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    # the model's parameters keep the caller's flags (DreamBooth's are the UNet's own); the wrappers' are off
    assert all(p.requires_grad == flags.get(id(p), False) for p in handle.parameters())
    assert all(p.requires_grad == flags[id(p)] for _, p, _ in snapshot)
    trained = _outputs(pipe)
    changed = _changed(snapshot)
    if target == "dreambooth":
        assert changed and all(k.startswith("unet.") for k in changed)  # the text encoder and VAE never move
        assert handle.num_parameters() == sum(p.numel() for p in pipe.unet.parameters())
        handle.after_training()  # fp32 base: a no-op
    else:
        assert changed == set()  # the base tables and layers are never written: the trained copies live in wrappers
        assert torch.equal(trained["plain"], outputs["plain"])  # every other token's embedding is untouched
        assert not torch.equal(trained["token"], outputs["token"])  # the identifier's row trained
        row = handle.state_dict()["text_encoder.token_embedding.sks"]
        assert row.shape == (32,)
    if target == "textual_inversion":
        assert handle.num_parameters() == 32 and torch.equal(trained["unet"], outputs["unet"])
    if target == "custom_diffusion":
        kv = {k for k in handle.state_dict() if k.startswith("unet.")}
        assert kv and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in kv)
        assert len(kv) == 2 * sum(n.endswith("attn2") for n, _ in pipe.unet.named_modules())
        before_kv = {k: state[k] for k in state if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
        assert all(not torch.equal(handle.state_dict()[k], before_kv[k]) for k in kv)  # every K/V copy moved
    handle.remove()
    after = _state(pipe)
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert _modules(pipe) == modules  # the very same module objects are back
    assert all(torch.equal(a, b) for a, b in zip(_outputs(pipe).values(), outputs.values()))
    assert all(p.dtype == state[k].dtype for k, p in
               [(f"unet.{n}", p) for n, p in pipe.unet.named_parameters()])


def test_state_dict_round_trip(tmp_path):
    pipe = make_pipe(tmp_path)
    handle = _train(pipe, "custom_diffusion").residuals
    saved = {k: v.clone() for k, v in handle.state_dict().items()}
    with torch.no_grad():
        for p in handle.parameters():
            p.zero_()
    handle.load_state_dict(saved)
    assert all(torch.equal(handle.state_dict()[k], v) for k, v in saved.items())
    assert handle.num_parameters() == sum(v.numel() for v in saved.values())
    handle.remove()


def test_custom_diffusion_layers_have_plain_names_on_a_compiled_unet(tmp_path):
    from prkit.train import TrainConfig

    concept, config = make_concept(), TrainConfig(target="custom_diffusion")
    plain = make_pipe(tmp_path / "plain")
    names = set(CustomDiffusionTarget(plain, concept, config, "cd").layers)
    compiled = make_pipe(tmp_path / "compiled")
    compiled.unet = torch.compile(compiled.unet)  # wraps lazily: nothing is compiled here
    target = CustomDiffusionTarget(compiled, concept, config, "cd")
    assert names and set(target.layers) == names and not any("_orig_mod" in n for n in names)
    target.remove()


def test_multi_token_identifier_is_refused_and_leaves_the_model(tmp_path):
    pipe = make_pipe(tmp_path)
    modules = _modules(pipe)
    concept = make_concept(token="qqzx")  # not a single token of the tiny vocabulary
    for target in ("textual_inversion", "custom_diffusion"):
        with pytest.raises(ValueError, match="single-token identifier"):
            TARGETS[target](pipe, concept, train.TrainConfig(), "x")
        assert _modules(pipe) == modules


def test_token_wrapper_replaces_only_the_identifier(tmp_path):
    pipe = make_pipe(tmp_path)
    base = pipe.text_encoder.get_input_embeddings()
    wrapper = TokenEmbedding(base, token_id=3, init=torch.full((32,), 7.0))
    ids = torch.tensor([[0, 3, 5, 3]])
    out = wrapper(ids)
    assert torch.equal(out[0, 1], torch.full((32,), 7.0)) and torch.equal(out[0, 3], torch.full((32,), 7.0))
    assert torch.equal(out[0, [0, 2]], base(ids)[0, [0, 2]])
    assert wrapper.weight is base.weight


@pytest.mark.parametrize("target", ["textual_inversion", "custom_diffusion"])
def test_token_targets_keep_a_half_precision_pipeline_sampling_in_its_dtype(tmp_path, target):
    """The fp32 master row must not become the text encoder's dtype: diffusers casts prompt embeddings (and so the
    latents) to it, and a bf16 UNet then fails on fp32 input."""
    pipe = make_pipe(tmp_path).to(torch.bfloat16)
    result = prkit.train_residuals(pipe, make_concept(), target=target, learning_rate=1e-3, **FAST)
    assert result.residuals.num_parameters() > 0
    assert pipe.text_encoder.dtype == torch.bfloat16
    embeds, _ = pipe.encode_prompt("a photo of a sks dog", device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    assert embeds.dtype == torch.bfloat16
    images = prkit.generate(pipe, "a photo of a sks dog", None, steps=2, output_type="latent")
    assert images.dtype == torch.bfloat16 and torch.isfinite(images.float()).all()
    result.residuals.remove()


def test_residual_path_encodes_the_prompt_once_token_targets_every_step(tmp_path, monkeypatch):
    calls = []
    original = train.encode_text

    def counting(pipe, prompt, size, grad=False):
        calls.append(grad)
        return original(pipe, prompt, size, grad)

    monkeypatch.setattr(train, "encode_text", counting)  # the loop's own calls (token targets, every step)
    monkeypatch.setattr(train_inputs, "encode_text", counting)  # the cache's, once
    prkit.train_residuals(make_pipe(tmp_path / "a"), make_concept(), **FAST)
    assert calls == [False]
    calls.clear()
    handle = prkit.train_residuals(make_pipe(tmp_path / "b"), make_concept(), target="textual_inversion",
                                   **FAST).residuals
    assert calls == [False] + [True] * 3
    assert TARGETS["textual_inversion"].needs_text_encoder and CustomDiffusionTarget.needs_text_encoder
    handle.remove()


def test_recipes():
    assert set(RECIPES) == set(TARGETS)
    assert recipe("custom_diffusion")["learning_rate"] == pytest.approx(1e-5 * 2)  # lr x batch (--scale_lr)
    assert recipe("custom_diffusion", batch_size=4)["learning_rate"] == pytest.approx(4e-5)
    ti = recipe("textual_inversion")
    assert ti["learning_rate"] == 5e-3 and ti["steps"] > recipe("residuals")["steps"] and "rank" not in ti
    assert recipe("dreambooth")["learning_rate"] == 5e-6 and recipe("lora")["rank"] == 4
    assert recipe("residuals", steps=10, seed=3) == dict(learning_rate=1e-3, steps=10, rank=0.05, batch_size=4,
                                                         seed=3, target="residuals")
    train.TrainConfig(**recipe("dreambooth"))  # every key is a TrainConfig field
    with pytest.raises(KeyError, match="no recipe"):
        recipe("vico")


@pytest.mark.parametrize("target", ["lora", "attn_kv", "attn_out"])
def test_a_removed_peft_target_leaves_the_unet_as_it_was(tmp_path, concept, target):
    """peft's delete_adapters left its wrappers in place: module types changed and state-dict keys renamed
    (...to_k.base_layer.weight), so save_pretrained wrote a UNet diffusers could not load back."""
    pipe = make_pipe(tmp_path / "p")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    kinds = {k: type(m) for k, m in pipe.unet.named_modules()}
    result = prkit.train_residuals(pipe, concept, target=target, steps=1, batch_size=2, progress=False)
    assert any("lora" in k for k in pipe.unet.state_dict())
    result.residuals.remove()
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert {k: type(m) for k, m in pipe.unet.named_modules()} == kinds
    assert not hasattr(pipe.unet, "peft_config")
    pipe.unet.save_pretrained(tmp_path / "unet")
    from diffusers import UNet2DConditionModel

    again = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in before.items())


def test_dreambooth_trains_on_a_half_precision_pipeline_without_autocast(tmp_path, concept):
    """Its fp32 master weights met the pipeline's bf16 text embeddings in the step: a dtype error."""
    pipe = make_pipe(tmp_path / "p")
    pipe.to(torch.bfloat16)
    pipe.unet.conv_out.requires_grad_(False)  # the user's own flags: remove() leaves them as they were
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = prkit.train_residuals(pipe, concept, target="dreambooth", steps=1, batch_size=2, progress=False)
    assert all(math.isfinite(x) for x in result.losses)
    result.residuals.remove()
    for kw in (dict(fast=True), dict(mixed_precision="fp16")):  # the fast loop; autocast in the other half precision
        result = prkit.train_residuals(pipe, concept, target="dreambooth", steps=1, batch_size=2, progress=False,
                                       **kw)
        assert all(math.isfinite(x) for x in result.losses)
        result.residuals.remove()
    result = prkit.train_residuals(pipe, concept, target="dreambooth", steps=1, batch_size=2, progress=False)
    result.residuals.remove()
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags


def test_a_removed_peft_target_gives_the_users_loras_back_as_they_were_active(tmp_path, concept):
    """peft's delete_adapter made the first remaining adapter active where the deleted one was: with LoRAs "a" and
    "b" loaded and only "b" on, a LoRA baseline run left "a" on instead, and sampling changed."""
    pytest.importorskip("peft")
    from conftest import load_lora_file, randomize
    from prkit.files import export_lora

    files = {}
    for name, seed in (("a", 5), ("b", 6)):
        donor = make_pipe(tmp_path / f"d{name}")
        style = prkit.add_residuals(donor.unet, rank=2, name=name)
        randomize(style, seed=seed)
        files[name] = export_lora(style, tmp_path / f"{name}.safetensors", dtype=torch.float32)
    pipe = make_pipe(tmp_path / "p")
    for name, path in files.items():
        load_lora_file(pipe, path, adapter_name=name)
    pipe.set_adapters(["b"])
    inputs = unet_inputs()
    before = run_unet(pipe.unet, inputs)
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    result = prkit.train_residuals(pipe, concept, target="lora", steps=1, batch_size=2, progress=False)
    result.residuals.remove()
    assert pipe.get_active_adapters() == ["b"]
    torch.testing.assert_close(run_unet(pipe.unet, inputs), before, atol=0, rtol=0)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
def test_dreambooth_on_a_half_precision_pipeline_samples_while_and_after_it_trains(tmp_path, concept, fast):
    """Its fp32 master weights were left on the UNet: validation images and generate() after the run failed on the
    pipeline's bf16 latents ('mat1 and mat2 must have the same dtype') unless the caller knew to call
    after_training()."""
    pipe = make_pipe(tmp_path / "p").to(torch.bfloat16)
    result = prkit.train_residuals(pipe, concept, target="dreambooth", steps=2, batch_size=2, progress=False,
                                   validate_every=1, validation_prompts=("a photo of a {token} {class_word}",),
                                   validation_steps=2, fast=fast)
    assert sorted(result.validation) == [1, 2] and all(len(v) == 1 for v in result.validation.values())
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    images = prkit.generate(pipe, "a photo of a sks dog", None, steps=2, output_type="latent")
    assert images.dtype == torch.bfloat16 and torch.isfinite(images.float()).all()
    result.residuals.remove()


@pytest.mark.parametrize("target", ["lora", "textual_inversion"])
def test_generate_given_a_baselines_handle_says_how_to_sample_with_it(tmp_path, concept, target):
    """generate(pipe, prompt, result.residuals) after a baseline run said 'takes a Residuals handle
    (result.residuals, ...)', the very thing it was given; a baseline is on the model itself: None samples it."""
    pipe = make_pipe(tmp_path / "p")
    base = prkit.generate(pipe, TOKEN_PROMPT, None, steps=2, output_type="latent")
    result = prkit.train_residuals(pipe, concept, target=target, learning_rate=1e-1, **FAST)
    with pytest.raises(ValueError, match=r"baseline's handle.*generate\(pipe, prompt, None\) samples with it"):
        prkit.generate(pipe, TOKEN_PROMPT, result.residuals, steps=2, output_type="latent")
    trained = prkit.generate(pipe, TOKEN_PROMPT, None, steps=2, output_type="latent")
    assert (trained - base).abs().max() > 1e-4  # as the message says: the baseline is sampled
    result.residuals.remove()


@pytest.mark.parametrize("target", ["textual_inversion", "custom_diffusion", "lora", "dreambooth"])
def test_a_baseline_stopped_early_resumes_in_the_next_call(tmp_path, concept, target):
    """stop_after left the baseline on the model and the next call (which resumes the run, as for residuals) refused
    ('already has a trained token row', peft's 'Adapter with name default already exists') or, for DreamBooth,
    kept the half-trained weights as the ones its remove() restores."""
    kw = dict(target=target, learning_rate=1e-2, progress=False, batch_size=2, steps=4)
    straight = prkit.train_residuals(make_pipe(tmp_path / "s"), concept, **kw).residuals.state_dict()
    pipe = make_pipe(tmp_path / "p")
    state = _state(pipe)
    kw["checkpoint_dir"] = str(tmp_path / "ckpt")
    stopped = prkit.train_residuals(pipe, concept, stop_after=2, **kw)
    assert not stopped.completed and stopped.steps_done == 2
    result = prkit.train_residuals(pipe, concept, **kw)
    assert result.completed and result.steps_done == 4
    trained = result.residuals.state_dict()
    assert trained.keys() == straight.keys() and all(torch.equal(trained[k], v) for k, v in straight.items())
    result.residuals.remove()
    after = _state(pipe)
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    stopped.residuals.remove()  # already off the model: nothing more to do
    assert all(torch.equal(p, state[k]) for k, p in _state(pipe).items())


@pytest.mark.parametrize("target", ["lora", "attn_kv"])
def test_a_peft_targets_checkpoint_resumes_under_another_set_name(tmp_path, concept, target):
    """A run stopped as name='a' continues as name='b' (the name is the set's on the model, not part of the run), as
    residual sets and the other baselines do: peft's keys hold the adapter's name, and the resume was refused as
    "does not fit this run ('...lora_A.b.weight')"."""
    kw = dict(target=target, learning_rate=1e-2, progress=False, batch_size=2, steps=4)
    straight = prkit.train_residuals(make_pipe(tmp_path / "s"), concept, name="b", **kw).residuals.state_dict()
    kw["checkpoint_dir"] = str(tmp_path / "ckpt")
    prkit.train_residuals(make_pipe(tmp_path / "a"), concept, name="a", stop_after=2, **kw)
    result = prkit.train_residuals(make_pipe(tmp_path / "b"), concept, name="b", **kw)
    assert result.completed and result.steps_done == 4
    trained = result.residuals.state_dict()
    assert trained.keys() == straight.keys() and all(torch.equal(trained[k], v) for k, v in straight.items())


def test_a_peft_target_takes_its_ranks_per_block_or_layer(tmp_path, concept):
    """A rank dict (TrainConfig.rank, per block for residuals) was ignored by the LoRA targets without a word: every
    layer trained at rank 4. Each key names a block or layer by its path (or a prefix of it); the longest match wins,
    with alpha = rank (scale 1) as the recipe's single rank has it."""
    pipe = make_pipe(tmp_path / "p")
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    ranks = {"down_blocks": 2, "mid_block": 8, "up_blocks": 3, layer: 6}
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    handle = prkit.train_residuals(pipe, concept, target="lora", rank=ranks, steps=1, batch_size=1,
                                   progress=False).residuals
    downs = {k.split(".lora_A.")[0]: v.shape[0] for k, v in handle.state_dict().items() if ".lora_A." in k}
    assert len(downs) == 4 * sum(n.endswith(("attn1", "attn2")) for n, _ in pipe.unet.named_modules())
    assert downs[layer] == 6 and downs[layer.replace("to_k", "to_v")] == 3
    assert all(r == {"down": 2, "mid": 8, "up": 3}[k.split("_")[0]] for k, r in downs.items() if k != layer)
    scales = [m.scaling["default"] for n, m in pipe.unet.named_modules() if n in downs]
    assert len(scales) == len(downs) and set(scales) == {1.0}
    handle.remove()
    for bad, words in (({"down_blocks": 2, "mid_block": 2}, "no rank for LoRA layer 'up_blocks"),
                       ({**ranks, "down_blocks.7": 2}, "rank names 'down_blocks.7'"),
                       ({"down_blocks": 2, "mid_block": 2, "up_blocks": 0.5}, "whole rank >= 1, got 0.5")):
        with pytest.raises(ValueError, match=words):
            prkit.train_residuals(pipe, concept, target="lora", rank=bad, steps=1, batch_size=1, progress=False)
        after = pipe.unet.state_dict()
        assert after.keys() == before.keys() and not hasattr(pipe.unet, "peft_config")


@pytest.mark.parametrize("target, part", [("dreambooth", "unet"), ("textual_inversion", "text_encoder"),
                                          ("custom_diffusion", "vae")])
def test_a_baselines_checkpoint_continues_only_on_its_base_model(tmp_path, concept, target, part):
    """A baseline's checkpoint resumed without a word on another base model (another UNet for DreamBooth, another
    text encoder or VAE for the token targets), training on from weights, latents or a prompt of a model it never
    saw; residual sets' checkpoints are refused so, and now theirs are too. The same model resumes, as before."""
    from prkit.checkpoints import CheckpointError
    from tiny import tiny_text_encoder, tiny_unet, tiny_vae

    kw = dict(target=target, learning_rate=1e-2, progress=False, batch_size=2, steps=4,
              checkpoint_dir=str(tmp_path / "ckpt"))
    prkit.train_residuals(make_pipe(tmp_path / "a"), concept, stop_after=2, **kw)
    other = make_pipe(tmp_path / "b")
    setattr(other, part, {"unet": lambda: tiny_unet(seed=1), "vae": lambda: tiny_vae(seed=1),
                          "text_encoder": lambda: tiny_text_encoder(len(other.tokenizer), seed=1)}[part]())
    with pytest.raises(CheckpointError, match=r"belongs to another run \(at step 2\): it differs in (weights|inputs)"):
        prkit.train_residuals(other, concept, **kw)
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["fingerprint"].update(weights=None, inputs=None)  # as an older prkit stamped a baseline's: not checked
    torch.save(state, ckpt)
    result = prkit.train_residuals(make_pipe(tmp_path / "c"), concept, **kw)
    assert result.completed and result.steps_done == 4 and len(result.losses) == 4
    result.residuals.remove()


@pytest.mark.parametrize("target", ["residuals", "lora", "dreambooth"])
def test_a_run_stopped_on_a_compiled_unet_resumes_on_the_plain_one(tmp_path, concept, target):
    """pipe.unet = torch.compile(pipe.unet) (for faster sampling), a run stopped, resumed in a session without
    compile: refused as 'differs in weights (another one)' (the stamp looked for conv_in.weight among the compiled
    module's '_orig_mod.' names), and a LoRA's or DreamBooth's checkpoint held '_orig_mod.' keys the plain UNet has
    not. The weights' stamp and the baselines' keys are the plain module's."""
    kw = dict(target=target, learning_rate=1e-2, progress=False, batch_size=2, steps=4)
    straight = prkit.train_residuals(make_pipe(tmp_path / "s"), concept, **kw).residuals.state_dict()
    kw["checkpoint_dir"] = str(tmp_path / "ckpt")
    compiled = make_pipe(tmp_path / "a")
    compiled.unet = torch.compile(compiled.unet, backend="eager")  # dynamo alone: no compiler needed on a CPU
    stopped = prkit.train_residuals(compiled, concept, stop_after=2, **kw).residuals
    assert not any("_orig_mod" in k for k in stopped.state_dict())
    result = prkit.train_residuals(make_pipe(tmp_path / "b"), concept, **kw)
    assert result.completed and result.steps_done == 4
    trained = result.residuals.state_dict()
    assert trained.keys() == straight.keys() and all(torch.allclose(trained[k], v) for k, v in straight.items())


def test_a_lora_target_trains_with_the_users_text_encoder_lora_off(tmp_path, concept):
    """Loaded LoRAs are off while a run trains (it trains against the base model), but for the LoRA targets the text
    encoders' were left on: the baseline learnt against another prompt's conditioning (a kohya LoRA with text
    encoder keys). Only the UNet's peft switch is left to the target; the user's LoRA is back on after."""
    from peft import LoraConfig, inject_adapter_in_model

    kw = dict(target="lora", learning_rate=1e-2, progress=False, batch_size=2, steps=2)
    plain = prkit.train_residuals(make_pipe(tmp_path / "s"), concept, **kw).losses
    pipe = make_pipe(tmp_path / "p")
    inject_adapter_in_model(LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
                            pipe.text_encoder, adapter_name="user")  # B random: the LoRA changes the prompt
    with_lora = _outputs(pipe)["token"]
    result = prkit.train_residuals(pipe, concept, **kw)
    assert result.losses == plain
    result.residuals.remove()
    assert torch.equal(_outputs(pipe)["token"], with_lora)


@pytest.mark.parametrize("target", ["residuals", "lora"])
def test_a_checkpoint_written_on_a_compiled_unet_before_the_plain_names_resumes(tmp_path, concept, target):
    """Checkpoints written on a compiled UNet before d76c033 stamped no weights (the stamp found none under the
    '_orig_mod.' names) and keyed a LoRA's factors with '_orig_mod.': they resume, compiled or not, as before."""
    kw = dict(target=target, learning_rate=1e-2, progress=False, batch_size=2, steps=4)
    straight = prkit.train_residuals(make_pipe(tmp_path / "s"), concept, **kw).residuals.state_dict()
    kw["checkpoint_dir"] = str(tmp_path / "ckpt")
    prkit.train_residuals(make_pipe(tmp_path / "a"), concept, stop_after=2, **kw)
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["fingerprint"]["weights"] = []
    if target == "lora":
        state["target"] = {f"_orig_mod.{k}": v for k, v in state["target"].items()}
    torch.save(state, ckpt)
    compiled = make_pipe(tmp_path / "b")
    compiled.unet = torch.compile(compiled.unet, backend="eager")
    result = prkit.train_residuals(compiled, concept, **kw)
    assert result.completed and result.steps_done == 4
    trained = result.residuals.state_dict()
    assert trained.keys() == straight.keys() and all(torch.allclose(trained[k], v) for k, v in straight.items())


@pytest.mark.parametrize("target", ["custom_diffusion", "lora", "attn_kv"])
def test_a_target_on_fused_attention_projections_is_refused_naming_the_way_out(tmp_path, concept, target):
    """pipe.fuse_qkv_projections() (a diffusers speed-up) routes attention through to_qkv / to_kv, past the to_k /
    to_v layers these targets train: Custom Diffusion trained its token row alone without a word (K/V never moved),
    LoRA only its to_out layers, attn_kv failed with torch's 'element 0 of tensors does not require grad'."""
    pipe = make_pipe(tmp_path / "p")
    pipe.fuse_qkv_projections()
    modules = _modules(pipe)
    kw = dict(target=target, learning_rate=1e-2, progress=False, batch_size=1, steps=1)
    with pytest.raises(ValueError, match=r"fused.*pipe.unfuse_qkv_projections\(\)"):
        prkit.train_residuals(pipe, concept, **kw)
    assert _modules(pipe) == modules and not hasattr(pipe.unet, "peft_config")
    prkit.train_residuals(pipe, concept, **{**kw, "target": "attn_out"}).residuals.remove()  # to_out is not fused
    pipe.unfuse_qkv_projections()
    handle = prkit.train_residuals(pipe, concept, **kw).residuals
    keys = {k: v for k, v in handle.state_dict().items() if "attn2.to_k" in k and ("lora_B" in k or "unet." in k)}
    assert keys and all(torch.count_nonzero(v) > 0 for v in keys.values())  # LoRA's B starts at zero: it trained
    for key, value in keys.items() if target == "custom_diffusion" else ():
        assert not torch.equal(value, pipe.unet.get_submodule(key[5:-7]).base_layer.weight)  # every K moved
    handle.remove()


def test_a_recipe_given_none_leaves_it_to_the_default(tmp_path):
    """recipe('custom_diffusion', learning_rate=None) (None: the default, as TrainConfig reads it; `--set
    custom_diffusion.learning_rate=None`) failed with "unsupported operand type(s) for *: 'NoneType' and 'int'" in
    the --scale_lr product, where the other recipes pass None on; a None batch size reached TrainConfig's check."""
    fields = recipe("custom_diffusion", learning_rate=None)
    assert fields["learning_rate"] is None and fields["batch_size"] == 2
    config = train.TrainConfig(**fields)
    assert train.default_learning_rate(make_pipe(tmp_path / "p"), config.target, config.batch_size) == \
        pytest.approx(2e-5)  # the recipe's, scaled by the batch
    with pytest.raises(ValueError, match="batch_size"):
        train.TrainConfig(**recipe("custom_diffusion", batch_size=None))


def test_a_fused_lora_target_comes_off_the_base_weights_when_removed(tmp_path, concept):
    """pipe.fuse_lora() after a LoRA run (as diffusers users do for speed), then result.residuals.remove(): peft's
    delete left the fused update in the base weights, so the 'restored' model kept the LoRA for good. It is unfused
    first (to float rounding, as diffusers' unfuse_lora)."""
    pipe = make_pipe(tmp_path / "p")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    inputs = unet_inputs()
    base = run_unet(pipe.unet, inputs)
    result = prkit.train_residuals(pipe, concept, target="lora", learning_rate=1e-1, **FAST)
    pipe.fuse_lora()
    assert (run_unet(pipe.unet, inputs) - base).abs().max() > 1e-3  # the fused LoRA changes the output
    result.residuals.remove()
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and not hasattr(pipe.unet, "peft_config")
    assert all(torch.allclose(after[k], v, atol=1e-6, rtol=0) for k, v in before.items())
    torch.testing.assert_close(run_unet(pipe.unet, inputs), base, atol=1e-5, rtol=0)


def test_a_lora_target_starts_from_its_seed_without_reseeding_the_callers_random_stream(tmp_path, concept):
    """peft's gaussian start is drawn under the recipe's seed; lora_target reseeded torch's global generator to do so,
    so a caller's torch.manual_seed(7); <train a LoRA>; torch.rand(...) drew other numbers than without the target."""
    factors = []
    for run in range(2):
        pipe = make_pipe(tmp_path / f"p{run}")
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        target = TARGETS["lora"](pipe, concept, train.TrainConfig(seed=3), "x")
        assert torch.equal(torch.rand(3), expected)  # the caller's stream goes on where it was
        factors.append({k: v.clone() for k, v in target.state_dict().items()})
        target.remove()
    assert factors[0].keys() == factors[1].keys() and all(torch.equal(factors[0][k], factors[1][k]) for k in factors[0])


def test_a_dreambooth_run_continued_with_the_first_still_on_the_model_says_to_remove_it(tmp_path, concept):
    """A finished DreamBooth run left on the model (its handle never removed), then continued to more steps with the
    same checkpoint_dir: the stamp of the UNet's weights (now DreamBooth's) was refused as 'belongs to another run
    ... delete it', advice that loses the run. The refusal names the earlier call's weights and remove(); after it
    the run resumes at its step."""
    from prkit.checkpoints import CheckpointError

    kw = dict(target="dreambooth", learning_rate=1e-2, progress=False, batch_size=2,
              checkpoint_dir=str(tmp_path / "ckpt"))
    pipe = make_pipe(tmp_path / "p")
    first = prkit.train_residuals(pipe, concept, steps=2, **kw)
    with pytest.raises(CheckpointError, match=r"earlier DreamBooth call.*still on the model.*\.remove\(\)"):
        prkit.train_residuals(pipe, concept, steps=4, **kw)
    first.residuals.remove()
    result = prkit.train_residuals(pipe, concept, steps=4, **kw)
    assert result.completed and result.steps_done == 4 and result.losses[:2] == first.losses
    torch.save(pipe.unet, io.BytesIO())  # the whole module still pickles (nothing of the note kept on it)
    result.residuals.remove()
