"""Checks of prkit.group_norm_nhwc's Triton kernels on the CPU, run by test_kernels.py in a subprocess:
TRITON_INTERPRET must be set before triton compiles anything. Prints one line per check; any failure raises."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

# triton 3.6's interpreter turns a scalar argument into a 1-element array, which numpy >= 2.3 refuses to int()
_patch = getattr(interpreter, "_patch_lang_tensor", None)
if _patch is not None:
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
    interpreter._patch_lang_tensor = _patched

sys.path.insert(0, os.path.dirname(__file__))
import prkit.kernels.group_norm_nhwc as nhwc  # noqa: E402
from prkit.kernels.geglu import geglu  # noqa: E402


def _against_torch(x: torch.Tensor, g: int, weight, bias, silu: bool) -> tuple[float, float]:
    """(max |y - torch's y|, max |dx - torch's dx| / max |torch's dx|) of group_norm_nhwc on NHWC ``x``."""
    x = x.detach().requires_grad_(True)
    assert nhwc.usable(x, g, weight, bias)
    y = nhwc.group_norm_nhwc(x, g, weight, bias, 1e-6, silu)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref_x = x.detach().contiguous().requires_grad_(True)
    ref = F.group_norm(ref_x, g, weight, bias, 1e-6)
    ref = F.silu(ref) if silu else ref
    grad = torch.randn_like(ref)
    y.backward(grad)
    ref.backward(grad)
    return (y - ref).abs().max().item(), ((x.grad - ref_x.grad).abs().max() / ref_x.grad.abs().max()).item()


def kernels() -> None:
    """Forward and input gradient against torch's GroupNorm (+ SiLU): one and several splits of H*W, tiles of
    several groups with a partial last tile (C=320 in 32 groups: tiles of 6 groups, the last of 2), 128- and
    256-lane tiles, and groups wider than any tile."""
    torch.manual_seed(0)
    cases = [((2, 64, 8, 8, 32), True, 1), ((1, 40, 5, 3, 4), False, 1),  # one split
             ((2, 64, 24, 20, 8), True, 10 ** 6), ((1, 40, 33, 7, 4), False, 10 ** 6),  # several splits
             ((2, 320, 6, 5, 32), True, 10 ** 6), ((1, 200, 9, 4, 5), False, 10 ** 6),  # partial last tile
             ((1, 960, 3, 3, 12), True, 10 ** 6), ((1, 600, 3, 3, 2), False, 10 ** 6)]  # 256 lanes; one wide group
    seen = set()
    for (b, c, h, w, g), silu, programs in cases:
        nhwc._PROGRAMS = programs
        plan = nhwc._plan(b, c, g, h * w)
        seen.add((plan["CB"], plan["S"] > 1, plan["K"] * plan["NCB"] > g))
        x = (torch.randn(b, c, h, w) * 3 + 50).contiguous(memory_format=torch.channels_last)
        err_y, err_g = _against_torch(x, g, torch.randn(c), torch.randn(c), silu)
        print(f"kernel {b, c, h, w, g} silu={silu} plan={plan}: |dy| {err_y:.2e}, grad rel {err_g:.2e}")
        assert err_y < 1e-4 and err_g < 1e-4, (err_y, err_g)
    nhwc._PROGRAMS = 512
    widths = {cb for cb, _, _ in seen}
    assert {64, 128, 256, 512} <= widths, widths  # every tile width was exercised
    assert any(split for _, split, _ in seen) and not all(split for _, split, _ in seen)
    assert any(partial for _, _, partial in seen)  # a last tile with fewer groups than the others


def strided_affine() -> None:
    """A weight and bias that are strided views (every other element of a larger tensor): the kernels index them
    as dense, so they read the wrong elements unless the wrapper makes them contiguous."""
    torch.manual_seed(0)
    b, c, h, w, g = 2, 16, 5, 4, 4
    x = (torch.randn(b, c, h, w) * 2 + 3).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(2 * c)[::2], torch.randn(3 * c)[1::3]
    assert not weight.is_contiguous() and not bias.is_contiguous()
    for silu in (False, True):
        err_y, err_g = _against_torch(x, g, weight, bias, silu)
        print(f"strided silu={silu}: |dy| {err_y:.2e}, grad rel {err_g:.2e}")
        assert err_y < 1e-4 and err_g < 1e-4, (err_y, err_g)


def geglu_kernel() -> None:
    """GEGLU forward and the projection's gradient against diffusers' chunk + exact GELU, odd sizes included."""
    torch.manual_seed(0)
    for shape in [(2, 7, 24), (3, 10), (1, 1, 2050)]:
        proj = (torch.randn(shape) * 3).requires_grad_(True)
        y = geglu(proj)
        ref_proj = proj.detach().clone().requires_grad_(True)
        h, gate = ref_proj.chunk(2, dim=-1)
        ref = h * F.gelu(gate)
        grad = torch.randn_like(ref)
        y.backward(grad)
        ref.backward(grad)
        err_y, err_g = (y - ref).abs().max().item(), (proj.grad - ref_proj.grad).abs().max().item()
        print(f"geglu {shape}: |dy| {err_y:.2e}, |d grad| {err_g:.2e}")
        assert y.shape == ref.shape and err_y < 1e-5 and err_g < 1e-5, (err_y, err_g)


def unet() -> None:
    """A tiny UNet under patch_channels_last + patch_fused_geglu: same output and residual gradients; undo
    restores it exactly."""
    from conftest import output_and_grads, run_unet, trainable_residuals, unet_inputs
    from tiny import tiny_unet

    from prkit.fast_nhwc import patch_channels_last, patch_fused_geglu

    model = tiny_unet().requires_grad_(False)  # frozen, as the fast loop has it
    params = trainable_residuals(model)
    inputs = unet_inputs()
    reference = run_unet(model, inputs)
    ref_out, ref_grads = output_and_grads(model, params, *inputs)
    undo, undo_geglu = patch_channels_last(model), patch_fused_geglu(model)
    calls = []
    original = nhwc._GroupNormNHWC.apply
    nhwc._GroupNormNHWC.apply = lambda *a: calls.append(a[5]) or original(*a)
    out, got = output_and_grads(model, params, *inputs)
    nhwc._GroupNormNHWC.apply = original
    assert out.is_contiguous(memory_format=torch.channels_last)
    fused, plain = calls.count(True), calls.count(False)
    print(f"unet: {fused} fused norm+SiLU, {plain} plain norms; |d out| {(out - ref_out).abs().max():.2e}")
    assert fused >= 8 and plain >= 4  # resnets' two norms each + conv_norm_out; transformers' norms
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    for a, b in zip(got, ref_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), (a - b).abs().max()
    assert sum("forward" in m.__dict__ for m in model.modules() if type(m).__name__ == "GEGLU") == 7
    assert sum("forward" in m.__dict__ for m in model.up_blocks) == 2
    undo_geglu()
    undo()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(run_unet(model, inputs), reference)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()[name]()
    print("ok")
