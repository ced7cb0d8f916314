"""The Triton kernels of the fast path (prkit.kernels: NHWC GroupNorm + SiLU, GEGLU) and the patches that put
them in a UNet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import prkit.kernels.group_norm_nhwc as nhwc
from conftest import child_env
from prkit.kernels.geglu import geglu

triton = pytest.importorskip("triton", reason="the kernels need triton (a dev dependency on Linux)")
SCRIPT = Path(__file__).with_name("kernels_interpreted.py")


def _interpreted(*checks: str) -> str:
    root = str(SCRIPT.parent.parent)  # prkit importable in the child also where it is not installed
    env = child_env(TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(SCRIPT), *checks], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_kernels_match_torch_group_norm_and_silu():
    out = _interpreted("kernels")
    assert out.count("kernel ") == 8 and out.rstrip().endswith("ok")


def test_kernels_read_a_strided_weight_and_bias():
    out = _interpreted("strided_affine")
    assert out.count("strided ") == 2 and out.rstrip().endswith("ok")


def test_geglu_kernel_matches_diffusers_geglu():
    out = _interpreted("geglu_kernel")
    assert out.count("geglu ") == 3 and out.rstrip().endswith("ok")


def test_channels_last_unet_matches_and_undoes():
    assert _interpreted("unet").rstrip().endswith("ok")


def test_cpu_without_the_interpreter_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(16), torch.randn(16)
    assert not nhwc.usable(x, 4, weight, bias)
    assert torch.equal(nhwc.group_norm_nhwc(x, 4, weight, bias, 1e-5, silu=True),
                       F.silu(F.group_norm(x, 4, weight, bias, 1e-5)))


def test_cat_channels_hands_out_dense_gradients():
    from prkit.fast_nhwc import _CatChannels

    a = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    b = torch.randn(2, 6, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = _CatChannels.apply(a, b)
    assert torch.equal(out, torch.cat([a, b], dim=1))
    grad = torch.randn(out.shape).contiguous(memory_format=torch.channels_last)
    out.backward(grad)
    assert torch.equal(a.grad, grad[:, :3]) and torch.equal(b.grad, grad[:, 3:])
    assert a.grad.is_contiguous(memory_format=torch.channels_last) and b.grad.is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("fail_at", [1, 3, 4])
def test_channels_last_patching_that_fails_part_way_leaves_the_unet_as_it_was(fail_at, monkeypatch):
    """A patch raising part-way used to leave the earlier ones applied (and the weights channels-last), with no undo
    for the caller to run; now patch_channels_last puts back what it had done before raising."""
    from conftest import run_unet, unet_inputs
    from tiny import tiny_unet

    from prkit import fast_nhwc

    unet = tiny_unet().requires_grad_(False)
    inputs = unet_inputs()
    reference = run_unet(unet, inputs)
    act = unet.conv_act
    calls = []
    real = fast_nhwc._set_forward

    def failing(modules, forward):
        calls.append(forward)
        if len(calls) == fail_at:
            raise RuntimeError("patch failed")
        return real(modules, forward)
    monkeypatch.setattr(fast_nhwc, "_set_forward", failing)
    monkeypatch.setattr(fast_nhwc.nhwc, "triton", fast_nhwc.nhwc.triton or object())  # the kernel patches run
    with pytest.raises(RuntimeError, match="patch failed"):
        fast_nhwc.patch_channels_last(unet)
    assert len(calls) == fail_at
    assert not any("forward" in m.__dict__ or "_get_output_for_continuous_inputs" in m.__dict__
                   for m in unet.modules())
    assert unet.conv_act is act
    assert all(p.is_contiguous() for p in unet.parameters())
    assert torch.equal(run_unet(unet, inputs), reference)


@pytest.mark.parametrize("freeu,sdxl_like", [(False, False), (True, False), (False, True)],
                         ids=["sd1", "freeu", "sdxl-like"])
def test_channels_last_patches_on_the_cpu_fall_back_to_the_same_numbers(freeu, sdxl_like, monkeypatch):
    """Off CUDA the kernels fall back to torch: the patched UNet (lean up blocks included) computes the same."""
    from conftest import output_and_grads, trainable_residuals, unet_inputs
    from tiny import tiny_unet

    from prkit import fast_nhwc
    from prkit.fast_nhwc import patch_channels_last, patch_fused_geglu

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    unet = tiny_unet(linear=sdxl_like, sdxl_like=sdxl_like).requires_grad_(False)
    if freeu:
        unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    params = trainable_residuals(unet)
    inputs = unet_inputs(batch=2)
    ref_out, ref_grads = output_and_grads(unet, params, *inputs)
    undo = [patch_channels_last(unet), patch_fused_geglu(unet)]
    assert all("forward" in block.__dict__ for block in unet.up_blocks)
    cats = []
    original = fast_nhwc._CatChannels.apply
    monkeypatch.setattr(fast_nhwc._CatChannels, "apply", lambda *a: cats.append(1) or original(*a))
    out, grads = output_and_grads(unet, params, *inputs)
    assert len(cats) == (0 if freeu else 4)  # FreeU keeps diffusers' forward
    assert out.is_contiguous(memory_format=torch.channels_last)
    for fn in reversed(undo):
        fn()
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads, ref_grads))


def test_resnet_biases_fold_into_the_time_and_shortcut_projections_and_back():
    """conv1's bias moves into time_emb_proj's and conv2's into conv_shortcut's (no bias pass after those
    convolutions); the UNet computes the same, trainable biases stay put, and undo gives back the very tensors."""
    from conftest import unet_inputs
    from tiny import tiny_unet

    from prkit.fast_nhwc import fold_resnet_biases, lean_resnet_forward, plain_resnets, _set_forward

    unet = tiny_unet().requires_grad_(False)
    for p in unet.parameters():  # biases that matter (diffusers zero-initializes some)
        p.data.add_(torch.randn_like(p) * 0.05)
    inputs = unet_inputs(batch=2)
    with torch.no_grad():
        reference = unet(*inputs).sample
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    params = dict(unet.named_parameters())
    resnets = plain_resnets(unet)
    trained = resnets[0]
    trained.conv1.bias.requires_grad_(True)  # a bias that trains (a whole-UNet target) is not moved
    hooked = next(r for r in resnets[1:] if r.conv_shortcut is not None)
    hooked.conv_shortcut.register_forward_pre_hook(lambda m, a: None)  # a hooked layer (layerwise casting): kept
    undo = [_set_forward(resnets, lean_resnet_forward)]
    undo.append(fold_resnet_biases(resnets))
    try:
        assert trained.conv1.bias is not None
        moved = [r for r in resnets if r.conv1.bias is None]
        shortcuts = [r for r in resnets if r.conv_shortcut is not None and r.conv2.bias is None]
        assert len(moved) == len(resnets) - 1 and shortcuts  # the tiny UNet's up resnets have shortcuts
        assert hooked.conv2.bias is not None and hooked not in shortcuts
        with torch.no_grad():
            torch.testing.assert_close(unet(*inputs).sample, reference, rtol=1e-5, atol=1e-5)
    finally:
        for fn in reversed(undo):
            fn()
    assert dict(unet.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in unet.named_parameters())
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_an_empty_input_keeps_torch_path(monkeypatch):
    """An empty H*W used to reach the kernels' plan and divide by zero; torch returns an empty tensor."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 32, 0, 4).contiguous(memory_format=torch.channels_last)
    assert not nhwc.usable(x, 8, None, None) and nhwc.usable(torch.randn(2, 32, 1, 4).contiguous(
        memory_format=torch.channels_last), 8, None, None) == (nhwc.triton is not None)
    assert nhwc.group_norm_nhwc(x, 8, silu=True).shape == x.shape


def test_trainable_norms_keep_torch_path():
    x = torch.randn(1, 8, 2, 2, device="cuda" if torch.cuda.is_available() else "cpu")
    weight = torch.ones(8, device=x.device, requires_grad=True)
    assert not nhwc.usable(x.contiguous(memory_format=torch.channels_last), 4, weight, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 320, 64, 64), (4, 1280, 8, 8), (2, 960, 32, 32), (4, 640, 32, 32),
                                   (4, 2560, 8, 8), (4, 1920, 16, 16)])
def test_cuda_kernels_match_torch(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(shape[1], device="cuda", dtype=dtype)
    bias = torch.randn(shape[1], device="cuda", dtype=dtype)
    for silu in (False, True):
        x.grad = None
        y = nhwc.group_norm_nhwc(x, 32, weight, bias, 1e-5, silu)
        ref_x = x.detach().float().requires_grad_(True)
        ref = F.group_norm(ref_x, 32, weight.float(), bias.float(), 1e-5)
        ref = F.silu(ref) if silu else ref
        grad = torch.randn_like(ref)
        y.backward(grad.to(dtype))
        ref.backward(grad)
        scale = ref.abs().max().item()
        assert (y.float() - ref).abs().max().item() < 2e-2 * scale
        assert (x.grad.float() - ref_x.grad).abs().max().item() < 2e-2 * ref_x.grad.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_geglu_matches_torch(dtype):
    torch.manual_seed(0)
    proj = (torch.randn(4, 4096, 2560, device="cuda") * 2).to(dtype).requires_grad_(True)
    y = geglu(proj)
    ref_proj = proj.detach().float().requires_grad_(True)
    h, gate = ref_proj.chunk(2, dim=-1)
    ref = h * F.gelu(gate)
    grad = torch.randn_like(ref)
    y.backward(grad.to(dtype))
    ref.backward(grad)
    assert (y.float() - ref).abs().max().item() < 1e-2 * ref.abs().max().item()
    assert (proj.grad.float() - ref_proj.grad).abs().max().item() < 1e-2 * ref_proj.grad.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sdxl_like", [False, True], ids=["sd1", "sdxl-like"])
def test_cuda_unet_gradients_with_the_kernels_match_torch(sdxl_like, monkeypatch):
    """One forward + backward of a tiny UNet, fp32 without TF32: the kernels' residual gradients are torch's."""
    from conftest import output_and_grads, trainable_residuals, unet_inputs
    from tiny import tiny_unet

    from prkit.fast_nhwc import patch_channels_last, patch_fused_geglu

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    unet = tiny_unet(linear=sdxl_like, sdxl_like=sdxl_like).requires_grad_(False).cuda()
    params = trainable_residuals(unet)
    inputs = [x.cuda() for x in unet_inputs(batch=4)]
    ref_out, ref_grads = output_and_grads(unet, params, *inputs)
    undo = [patch_channels_last(unet), patch_fused_geglu(unet)]
    out, got = output_and_grads(unet, params, *inputs)
    for fn in reversed(undo):
        fn()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    for a, b in zip(got, ref_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), (a - b).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_loop_with_the_kernels_matches_it_without(tmp_path):
    """The fast loop's defaults (channels-last + NHWC norms + GEGLU kernel, graph) vs NCHW torch ops: same losses
    and residuals (Adam turns rounding of near-zero gradients into steps of the learning rate: compared as a whole)."""
    from conftest import make_concept, make_pipe

    from prkit.fast import FastConfig, train_fast
    from prkit.train import TrainConfig

    concept = make_concept()
    results = []
    for fast in (FastConfig(), FastConfig(channels_last=False, fused_geglu=False)):
        pipe = make_pipe(tmp_path / str(len(results))).to("cuda")
        result = train_fast(pipe, concept, TrainConfig(batch_size=4, steps=6, mixed_precision="no"), progress=False,
                            fast=fast)
        results.append((result.losses, {k: v.float().cpu() for k, v in result.residuals.state_dict().items()}))
    (losses_k, state_k), (losses_t, state_t) = results
    assert losses_k == pytest.approx(losses_t, rel=1e-3)
    for key, value in state_t.items():
        assert (state_k[key] - value).norm() <= 0.05 * value.norm(), key
    assert all(state_t[k].abs().max() > 0 for k in state_t if k.endswith(".up"))  # the residuals did train


def test_kernels_compile_for_an_h100():
    """Triton's front end and ptxas accept every kernel for sm_90 (the interpreter does not check types)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import prkit.kernels.geglu as geglu_module

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernels are interpreted in this process")
    half, f32, i32 = "*bf16", "*fp32", "i32"
    sizes = {k: i32 for k in ("HW", "C", "CG", "G", "K", "NCB", "SPAN", "S")}
    kernels = []
    for cb in (64, 128, 256, 512):  # every tile width a plan can pick for groups of up to 256 channels (and one more)
        tile = {"CB": cb, "KP": nhwc._KP, "ROWS": nhwc._BLOCK // cb}
        merge = {**tile, "S_P2": nhwc._MAX_SPLITS}
        kernels += [
            (nhwc._stats, {"X": half, "PCNT": f32, "PMEAN": f32, "PM2": f32, **sizes}, tile),
            (nhwc._apply, {"X": half, "Y": half, "W": half, "B_": half, "PCNT": f32, "PMEAN": f32, "PM2": f32,
                           "MEAN": f32, "RSTD": f32, **sizes, "eps": "fp32", "SILU": i32}, merge),
            (nhwc._bwd_sums, {"X": half, "DY": half, "W": half, "B_": half, "MEAN": f32, "RSTD": f32, "P1": f32,
                              "P2": f32, **sizes, "SILU": i32}, tile),
            (nhwc._bwd_apply, {"X": half, "DY": half, "DX": half, "W": half, "B_": half, "MEAN": f32, "RSTD": f32,
                               "P1": f32, "P2": f32, **sizes, "SILU": i32}, merge),
        ]
    rows = {"ROWS": geglu_module._ROWS, "COLS": geglu_module._COLS}
    kernels += [
        (geglu_module._forward, {"P": half, "OUT": half, "R": i32, "C": i32}, rows),
        (geglu_module._backward, {"P": half, "G": half, "DP": half, "R": i32, "C": i32}, rows),
    ]
    for fn, signature, constexprs in kernels:
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert ".entry" in compiled.asm["ptx"], fn.__name__
