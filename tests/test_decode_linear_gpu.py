"""The fused small-batch decode kernels on CUDA (run with `pytest -m gpu`): each epilogue at d20's shapes against
the float64 reference of test_decode_linear.py, the same bits with and without PDL and the L2 weight prefetch,
replayed in a CUDA graph; and a model's fused decode step against its PyTorch layers (teacher-forced, bf16)."""

from __future__ import annotations

import pytest
import torch
from test_decode_linear import _reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]  # fmt: skip

C, F, H, D = 1280, 3456, 10, 128  # d20


def _inputs(epilogue: str, M: int, g: torch.Generator) -> tuple[dict, dict]:
    n = {"rope": 3 * H * D, "residual": C, "swiglu": 2 * F, "plain": 4096}[epilogue]
    k = F if epilogue == "residual" else C  # the residual case is the down projection (K = 3456)
    x = torch.randn(M, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    kw: dict = {}
    if epilogue in ("rope", "swiglu", "plain"):
        kw.update(norm_weight=(1.0 + 0.2 * torch.randn(k, generator=g)).bfloat16(), eps=1e-5)
    if epilogue == "residual":
        kw["residual_MN"] = torch.randn(M, n, generator=g).bfloat16()
    if epilogue == "rope":
        angle = (200.0 + torch.arange(M)[:, None]) * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))
        kw.update(cos_MH=angle.cos(), sin_MH=angle.sin(), rot_rows=2 * H * D, head_dim=D)
    return {"x": x, "w": w}, kw


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("epilogue", ["rope", "residual", "swiglu", "plain"])
def test_each_epilogue_on_cuda_matches_float64_and_prefetch_changes_no_bit(epilogue, M):
    from ghostvis_core.kernels.decode_linear_triton import decode_linear

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL and the bulk L2 prefetch need Hopper or later")
    tensors, kw = _inputs(epilogue, M, torch.Generator().manual_seed(M))
    ref_kw = {k: v for k, v in kw.items() if k not in ("norm_weight", "eps", "residual_MN", "cos_MH", "sin_MH")}
    want = _reference(tensors["x"], tensors["w"], torch.bfloat16, norm=kw.get("norm_weight"), epilogue=epilogue,
                      res=kw.get("residual_MN"), cos=kw.get("cos_MH"), sin=kw.get("sin_MH"), **ref_kw)  # fmt: skip
    cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in {**tensors, **kw}.items()}
    x, w = cuda.pop("x"), cuda.pop("w")
    plain = decode_linear(x, w, epilogue=epilogue, **cuda)
    outs = []
    for pdl in (False, True):
        graph, out = torch.cuda.CUDAGraph(), None
        decode_linear(x, w, epilogue=epilogue, pdl=pdl, **cuda)  # compile before capture
        with torch.cuda.graph(graph):
            out = decode_linear(x, w, epilogue=epilogue, pdl=pdl, **cuda)
        graph.replay()
        graph.replay()
        outs.append(out.clone())
    torch.cuda.synchronize()
    torch.testing.assert_close(plain.double().cpu(), want, rtol=2**-7, atol=2**-7)
    assert torch.equal(outs[0], plain) and torch.equal(outs[1], plain)  # PDL + prefetch: the same bits


def test_a_bf16_model_decodes_through_the_fused_layers_as_through_its_own():
    from ghostvis_core.bench.infer_bench import random_model
    from ghostvis_core.decode_layers import with_decode_layers

    model = random_model("d12", "cuda", "auto", compile=False).model
    fused_plan, own_plan = with_decode_layers(model.plan, "triton"), with_decode_layers(model.plan, "torch")
    assert fused_plan.decode_layers.backend == "triton", fused_plan.decode_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 40), generator=g).cuda()
    caches = [model.new_kv_cache(4, 64) for _ in range(2)]
    with torch.no_grad():
        for step in range(8):  # teacher-forced: both read the same tokens, so a near-tie cannot fork them
            feed = ids[:, :33] if step == 0 else ids[:, 32 + step : 33 + step]
            model.plan = own_plan
            a = model.forward_with_cache(feed, caches[0], last_only=True)
            model.plan = fused_plan
            b = model.forward_with_cache(feed, caches[1], last_only=True)
            scale = a.abs().max().item()
            torch.testing.assert_close(b, a, rtol=0.02, atol=0.02 * scale)
    assert torch.equal(caches[0].cache_seqlens, caches[1].cache_seqlens)
    # the cached keys: each is a*cos - b*sin of a pair (a, b) rounded to bf16 after two orders of summation; a
    # cancellation there leaves a's and b's rounding (one ulp of up to the head's largest element) in a small key
    # (seen: 0.031 at |k| < 2). So every key within 2^-5 of its head's largest |k|, and all but 1e-5 within 2%
    k_own, k_fused = caches[0].k.float(), caches[1].k.float()
    diff = (k_fused - k_own).abs()
    head_scale = k_own.abs().amax(-1, keepdim=True).clamp_min(1.0)
    assert (diff <= 2**-5 * head_scale).all(), (diff / head_scale).max()
    assert (diff > 0.02 * k_own.abs() + 0.02).float().mean().item() < 1e-5
