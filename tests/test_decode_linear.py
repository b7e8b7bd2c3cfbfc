"""The fused small-batch decode kernels (kernels/decode_linear_triton.py) on CPU through the Triton interpreter:
each epilogue against a float64 reference of the rounding its docstring states, the row and K masks, and a
model's fused decode step (decode_layers.py) against its PyTorch layers, token for token."""

import dataclasses

import pytest
import torch
from test_gpt import V, randomized, tiny_config

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels():
    from helpers import triton_interpreted

    with triton_interpreted("ghostvis_core.kernels.decode_linear_triton") as (module,):
        yield module


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).double()


def _reference(x, w, dtype, *, norm=None, eps=1e-5, epilogue="plain", res=None, cos=None, sin=None,
               rot_rows=0, head_dim=0):  # fmt: skip
    """float64 products over the inputs as the kernel rounds them (module docstring)."""
    x = x.double()
    if norm is not None:
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).double()
        x = _round(_round(x * rstd, dtype) * norm.double(), dtype)
    y = _round(x @ w.double().t(), dtype)
    if epilogue == "residual":
        return _round(res.double() + y, dtype)
    if epilogue == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        return _round(gate * torch.sigmoid(gate) * up, dtype)
    if epilogue == "rope":
        M, N = y.shape
        heads = y.view(M, N // head_dim, head_dim)
        a, b = heads.chunk(2, dim=-1)
        c, s = _round(cos.double(), dtype)[:, None], _round(sin.double(), dtype)[:, None]
        rot = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
        n_rot = rot_rows // head_dim
        out = torch.cat([rot[:, :n_rot], heads[:, n_rot:]], dim=1).view(M, N)
        return _round(out, dtype)
    return y


def _tol(dtype):
    # bf16: one rounding of the output (2^-8 relative) apart at most, from fp32 against fp64 accumulation
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-7}


CASES = [  # M, K, N, block config (BLOCK_N, BLOCK_K, warps) or None (the default)
    (1, 64, 40, None),  # N not a multiple of BLOCK_N: the last block is masked
    (3, 200, 24, (8, 64, 4)),  # K not a multiple of BLOCK_K: the last chunk is masked; several batch rows
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("epilogue", ["plain", "residual", "swiglu", "norm"])
def test_each_epilogue_matches_a_float64_reference(kernels, epilogue, case, dtype):
    M, K, N, config = case
    g = torch.Generator().manual_seed(M * 1000 + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(2 * N if epilogue == "swiglu" else N, K, generator=g) / K**0.5).to(dtype)
    norm = (1.0 + 0.2 * torch.randn(K, generator=g)).to(dtype) if epilogue in ("swiglu", "norm") else None
    res = torch.randn(M, N, generator=g).to(dtype) if epilogue == "residual" else None
    epi = "plain" if epilogue == "norm" else epilogue
    got = kernels.decode_linear(x, w, epilogue=epi, norm_weight=norm, eps=1e-5, residual_MN=res, config=config)
    want = _reference(x, w, dtype, norm=norm, epilogue=epi, res=res)
    assert got.shape == (M, N) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, H, K, D, block_n", [(1, 4, 2, 16, 4), (2, 2, 1, 32, 8)])
def test_rope_rotates_the_q_and_k_heads_and_leaves_v(kernels, M, H, K, D, block_n, dtype):
    C = 48
    g = torch.Generator().manual_seed(H * D)
    x = torch.randn(M, C, generator=g).to(dtype)
    w = (torch.randn((H + 2 * K) * D, C, generator=g) / C**0.5).to(dtype)
    norm = (1.0 + 0.2 * torch.randn(C, generator=g)).to(dtype)
    angle = torch.tensor([[3.0], [17.0]])[:M] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    cos, sin = angle.cos(), angle.sin()
    kw = dict(norm_weight=norm, eps=1e-5, cos_MH=cos, sin_MH=sin, rot_rows=(H + K) * D, head_dim=D)
    got = kernels.decode_linear(x, w, epilogue="rope", config=(block_n, 32, 4), **kw)
    want = _reference(x, w, dtype, norm=norm, epilogue="rope", cos=cos, sin=sin, rot_rows=(H + K) * D,
                      head_dim=D)  # fmt: skip
    torch.testing.assert_close(got.double(), want, **_tol(dtype))
    plain = kernels.decode_linear(x, w, norm_weight=norm, eps=1e-5, config=(block_n, 32, 4))  # same sums
    v = slice((H + K) * D, None)
    assert torch.equal(got[:, v], plain[:, v])  # v is written as the product, bit for bit
    assert not torch.allclose(got[:, : (H + K) * D], plain[:, : (H + K) * D])  # q and k are rotated


def test_a_model_decodes_through_the_fused_layers_as_through_its_own(kernels, monkeypatch):
    from ghostvis_core.backends import Choice

    # the custom op imports the kernel module at each call: it finds the interpreted one
    model = randomized(tiny_config(n_head=4, n_kv_head=2), seed=3).eval().fuse_projections_()
    own_plan = model.plan
    fused_plan = dataclasses.replace(own_plan, decode_layers=Choice("triton", "fused", "test"))
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(4))
    caches = [model.new_kv_cache(3, 16) for _ in range(2)]
    with torch.no_grad():
        for step in range(5):
            feed = ids if step == 0 else ids[:, -1:]  # a prefill (never fused), then decode steps
            model.plan = own_plan
            a = model.forward_with_cache(feed, caches[0])
            model.plan = fused_plan
            b = model.forward_with_cache(feed, caches[1])
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            ids = torch.cat([ids, a[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert torch.equal(b[:, -1].argmax(-1), a[:, -1].argmax(-1))
    assert torch.equal(caches[0].cache_seqlens, caches[1].cache_seqlens)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-4, atol=1e-5)  # RoPE'd keys stored alike
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-4, atol=1e-5)


def test_the_fused_step_runs_only_when_requested_and_only_for_small_inference_batches_on_cuda():
    from helpers import make_env

    from ghostvis_core import decode_layers
    from ghostvis_core.backends import RunFacts, plan_run
    from ghostvis_core.errors import BackendUnavailableError, ConfigError
    from ghostvis_core.plan_banner import format_banner

    def choice(env, **kw):
        facts = dict(device_type="cuda", dtype="bfloat16", purpose="inference") | kw
        return plan_run(env, RunFacts(facts.pop("device_type"), facts.pop("dtype"), **facts)).decode_layers

    h100 = make_env("h100")
    assert choice(h100).backend == "torch" and "measured no faster" in choice(h100).reason  # auto
    assert choice(h100, decode_layers="torch").backend == "torch"
    assert choice(h100, decode_layers="triton").backend == "triton"
    assert "Decode layers: Triton fused decode layers" in format_banner(
        plan_run(h100, RunFacts("cuda", "bfloat16", purpose="inference", decode_layers="triton")))
    for env, kw, why in [
        (h100, dict(purpose="train"), "unfused"),  # sampling in training: separate projections
        (h100, dict(use_fused_kernels=False), "use_fused_kernels=False"),
        (make_env("h100", triton=None), {}, "triton is not installed"),
        (make_env("cpu"), dict(device_type="cpu", dtype="float32"), "CUDA GPUs"),
    ]:
        with pytest.raises(BackendUnavailableError, match=why):
            choice(env, decode_layers="triton", **kw)
    cpu = choice(make_env("cpu"), device_type="cpu", dtype="float32")
    assert cpu.backend == "torch" and "for CUDA GPUs" in cpu.reason
    with pytest.raises(ConfigError, match="decode_layers='fused' is not one of"):
        RunFacts("cuda", "bfloat16", decode_layers="fused")

    model = randomized(tiny_config(), seed=1).eval().fuse_projections_()
    model.plan = dataclasses.replace(model.plan, decode_layers=decode_layers.Choice("triton", "fused", "test"))
    small = model.new_kv_cache(decode_layers.FUSED_MAX_BATCH, 8)
    large = model.new_kv_cache(decode_layers.FUSED_MAX_BATCH + 1, 8)
    assert decode_layers.runs_fused(model, small, 1)
    assert not decode_layers.runs_fused(model, large, 1)  # a real GEMM: the compiled PyTorch layer
    assert not decode_layers.runs_fused(model, small, 2)  # a prefill
    assert not decode_layers.runs_fused(model, dataclasses.replace(small, fresh=True), 1)
    model.model.layers[0].self_attn.qkv_weight = None  # projections kept apart (a training process's model)
    assert not decode_layers.runs_fused(model, small, 1)
