"""Triton RMSNorm and SwiGLU against a float64 reference, on CPU through the Triton interpreter.

The kernel modules are imported fresh with TRITON_INTERPRET=1 (Triton decides interpret-or-compile when a
kernel is decorated), and removed again afterwards so later importers get the normal compiled kernels.
"""


import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, triton_interpreted
from helpers import float64_leaf as _leaf
from helpers import rms_norm_reference as rms_norm_ref

pytest.importorskip("triton")

_KERNEL_MODULES = ("ghostvis_core.kernels.rms_norm_triton", "ghostvis_core.kernels.swiglu_triton")

SHAPES = [(5, 123, 123), (2, 128, 512), (3, 7, 4096)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def interpreted():
    """(rms_norm_triton module, swiglu_triton module) compiled for the Triton CPU interpreter."""
    with triton_interpreted(*_KERNEL_MODULES) as modules:
        yield tuple(modules)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_float64(interpreted, shape, dtype):
    rms_mod, _ = interpreted
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(dtype)
    y = rms_mod.rms_norm_triton(x, w, 1e-5)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype and y.shape == x.shape
    x64, w64 = _leaf(x), _leaf(w)
    y_ref = rms_norm_ref(x64, w64, 1e-5)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x64, w64), dy.double())
    assert_close("y", y, y_ref, dtype)
    assert_close("dx", dx, dx_ref, dtype)
    assert_close("dw", dw, dw_ref, dtype, summed=x[..., 0].numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_without_weight(interpreted, dtype):
    rms_mod, _ = interpreted
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 123, 123, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(5, 123, 123, generator=gen).to(dtype)
    y = rms_mod.rms_norm_triton(x, None, 1e-6)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    x64 = _leaf(x)
    y_ref = rms_norm_ref(x64, None, 1e-6)
    (dx_ref,) = torch.autograd.grad(y_ref, (x64,), dy.double())
    assert_close("y", y, y_ref, dtype)
    assert_close("dx", dx, dx_ref, dtype)


# The interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even), so the bitwise rounding
# checks run in fp16 here (numpy rounds fp16 to nearest) and in bf16 in tests/test_kernels_gpu.py.


def test_rms_norm_rounds_like_hf_llama(interpreted):
    """y = w * round(x * rstd) as in HF LlamaRMSNorm, so nearly every element is bitwise equal."""
    rms_mod, _ = interpreted
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 128, 512, generator=gen).half()
    w = (1 + 0.1 * torch.randn(512, generator=gen)).half()
    y = rms_mod.rms_norm_triton(x, w, 1e-5)
    x_f32 = x.float()
    hf = w * (x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + 1e-5)).half()
    equal = (y == hf).float().mean().item()
    ulp = (y.float() - hf.float()).abs() / hf.float().abs().clamp_min(1e-30)
    print(f"bitwise equal to HF formula: {equal:.4%}, max relative diff {ulp.max().item():.3e}")
    assert equal >= 0.99
    assert ulp.max().item() <= 2**-10  # at most one fp16 ulp (rsqrt may differ in the last fp32 bit)


def test_rms_norm_mixed_dtypes_promote_like_hf(interpreted):
    """bf16 x with an fp32 weight returns fp32, as `weight * hidden.to(input_dtype)` does in HF."""
    rms_mod, _ = interpreted
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 4096, generator=gen).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(4096, generator=gen)).requires_grad_()
    y = rms_mod.rms_norm_triton(x, w, 1e-5)
    assert y.dtype == torch.float32
    x_f32 = x.detach().float()
    hf = w.detach() * (x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    torch.testing.assert_close(y.detach(), hf, atol=1e-6, rtol=2**-7)  # interpreter: bf16 by truncation
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32


def test_rms_norm_weight_grad_is_bitwise_deterministic(interpreted):
    rms_mod, _ = interpreted
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 128, 512, generator=gen).requires_grad_()
    w = torch.randn(512, generator=gen).requires_grad_()
    dy = torch.randn(2, 128, 512, generator=gen)
    grads = [torch.autograd.grad(rms_mod.rms_norm_triton(x, w, 1e-5), (x, w), dy) for _ in range(2)]
    assert torch.equal(grads[0][1], grads[1][1])
    assert torch.equal(grads[0][0], grads[1][0])


def test_rms_norm_non_contiguous_input(interpreted):
    rms_mod, _ = interpreted
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(64, 2, 96, generator=gen)
    x = base.transpose(0, 1).requires_grad_()  # (2, 64, 96), rows not contiguous
    w = torch.randn(96, generator=gen)
    y = rms_mod.rms_norm_triton(x, w, 1e-5)
    torch.testing.assert_close(y, F.rms_norm(x, (96,), w, 1e-5), atol=1e-5, rtol=1e-5)
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    assert dx.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_matches_float64(interpreted, shape, dtype):
    _, swiglu_mod = interpreted
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    gate = (2 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(shape, generator=gen).to(dtype)
    out = swiglu_mod.swiglu_triton(gate, up)
    dgate, dup = torch.autograd.grad(out, (gate, up), dout)
    assert out.dtype == dtype and dgate.dtype == dtype and dup.dtype == dtype
    g64, u64 = _leaf(gate), _leaf(up)
    out_ref = F.silu(g64) * u64
    dgate_ref, dup_ref = torch.autograd.grad(out_ref, (g64, u64), dout.double())
    assert_close("out", out, out_ref, dtype)
    assert_close("dgate", dgate, dgate_ref, dtype)
    assert_close("dup", dup, dup_ref, dtype)


def test_swiglu_strided_halves_of_one_projection(interpreted):
    """gate and up as the two chunk() halves of a fused projection: row-strided views, no copy needed."""
    _, swiglu_mod = interpreted
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(3, 7, 2 * 300, generator=gen).half().requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    out = swiglu_mod.swiglu_triton(gate, up)
    eager = F.silu(gate) * up
    equal = (out == eager).float().mean().item()
    print(f"bitwise equal to eager silu(gate) * up: {equal:.4%}")
    assert equal >= 0.99
    torch.testing.assert_close(out, eager, atol=0, rtol=2**-10)
    dout = torch.randn(out.shape, generator=gen).half()
    (dh,) = torch.autograd.grad(out, (h,), dout)
    (dh_eager,) = torch.autograd.grad(eager, (h,), dout)
    torch.testing.assert_close(dh, dh_eager, atol=2e-3, rtol=2e-3)


def test_dispatch_runs_triton_under_interpreter(interpreted, monkeypatch):
    from ghostvis_core.kernels import rms_norm, swiglu

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(4, 96)
    w = torch.randn(96)
    torch.testing.assert_close(rms_norm(x, w, 1e-5, backend="triton"), F.rms_norm(x, (96,), w, 1e-5))
    torch.testing.assert_close(swiglu(x, w.expand(4, 96), backend="triton"), F.silu(x) * w)


@pytest.mark.parametrize("config", [(1, 1, 4), (2, 2, 4), (3, 4, 4)], ids=str)
def test_rms_norm_backward_launch_configs_agree(interpreted, monkeypatch, config):
    """Every backward launch config (grid size, rows per iteration) computes the same gradients."""
    rms_mod, _ = interpreted
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 11, 96, generator=gen).requires_grad_()
    w = torch.randn(96, generator=gen).requires_grad_()
    dy = torch.randn(3, 11, 96, generator=gen)
    monkeypatch.setitem(rms_mod.BWD_CONFIGS, 1024, config)
    dx, dw = torch.autograd.grad(rms_mod.rms_norm_triton(x, w, 1e-5), (x, w), dy)
    x64, w64 = _leaf(x), _leaf(w)
    dx_ref, dw_ref = torch.autograd.grad(rms_norm_ref(x64, w64, 1e-5), (x64, w64), dy.double())
    assert_close("dx", dx, dx_ref, torch.float32)
    assert_close("dw", dw, dw_ref, torch.float32, summed=33)
