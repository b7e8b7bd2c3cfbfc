"""Triton RMSNorm and SwiGLU on CUDA: float64 parity at odd and model-sized shapes, HF rounding, determinism."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from helpers import float64_leaf as _leaf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = [(5, 123, 123), (2, 128, 512), (3, 7, 4096), (4, 2048, 1280), (2, 1024, 5120), (64, 10000)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_cuda_matches_float64(shape, dtype):
    from ghostvis_core.kernels import rms_norm

    gen = torch.Generator(device="cuda").manual_seed(sum(shape))
    x = torch.randn(shape, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    y = rms_norm(x, w, 1e-5, backend="triton")
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = _leaf(x), _leaf(w)
    y_ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x64, w64), dy.double())
    assert_close("y", y, y_ref, dtype)
    assert_close("dx", dx, dx_ref, dtype)
    assert_close("dw", dw, dw_ref, dtype, summed=x[..., 0].numel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_cuda_rounds_like_hf_llama(dtype):
    from ghostvis_core.kernels import rms_norm

    x = torch.randn(4096, 4096, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype)
    y = rms_norm(x, w, 1e-5, backend="triton")
    x_f32 = x.float()
    hf = w * (x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    equal = (y == hf).float().mean().item()
    print(f"{dtype}: bitwise equal to HF formula {equal:.5%}")
    assert equal >= 0.99


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_cuda_matches_float64(shape, dtype):
    from ghostvis_core.kernels import swiglu

    gen = torch.Generator(device="cuda").manual_seed(sum(shape) + 1)
    gate = (2 * torch.randn(shape, device="cuda", generator=gen)).to(dtype).requires_grad_()
    up = torch.randn(shape, device="cuda", generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    out = swiglu(gate, up, backend="triton")
    dgate, dup = torch.autograd.grad(out, (gate, up), dout)
    g64, u64 = _leaf(gate), _leaf(up)
    ref = F.silu(g64) * u64
    dgate_ref, dup_ref = torch.autograd.grad(ref, (g64, u64), dout.double())
    assert_close("out", out, ref, dtype)
    assert_close("dgate", dgate, dgate_ref, dtype)
    assert_close("dup", dup, dup_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_swiglu_cuda_strided_halves_match_eager(dtype):
    from ghostvis_core.kernels import swiglu

    h = torch.randn(4, 1000, 2 * 3456, device="cuda").to(dtype).requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    out = swiglu(gate, up, backend="triton")
    eager = F.silu(gate) * up
    equal = (out == eager).float().mean().item()
    print(f"{dtype}: bitwise equal to eager {equal:.5%}")
    assert equal >= 0.99
    dout = torch.randn_like(out)
    (dh,) = torch.autograd.grad(out, (h,), dout)
    (dh_eager,) = torch.autograd.grad(eager, (h,), dout)
    torch.testing.assert_close(dh, dh_eager, atol=2e-2, rtol=2e-2)


def test_rms_norm_cuda_weight_grad_is_bitwise_deterministic():
    from ghostvis_core.kernels import rms_norm

    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    runs = [torch.autograd.grad(rms_norm(x, w, 1e-5, backend="triton"), (x, w), dy) for _ in range(3)]
    assert all(torch.equal(runs[0][1], r[1]) for r in runs[1:])
    assert all(torch.equal(runs[0][0], r[0]) for r in runs[1:])


def test_rms_norm_cuda_widest_row_and_no_weight():
    from ghostvis_core.kernels import rms_norm

    x = torch.randn(16, 32768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = rms_norm(x, None, 1e-6, backend="triton")
    torch.testing.assert_close(y, F.rms_norm(x, (32768,), None, 1e-6), atol=2e-2, rtol=2e-2)
    (dx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
    assert torch.isfinite(dx).all()
