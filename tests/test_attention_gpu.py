"""Attention backends and the model on a CUDA GPU (run with `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_max_diff
from helpers import attention_reference as reference

from ghostvis_core.attention import (
    AttentionContext,
    attention,
    attention_with_kvcache,
    build_attention_context,
    cu_seqlens_from_positions,
    doc_ids_from_positions,
    flex_document_block_mask,
    packed_mask,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, T, H, K, D = 2, 384, 8, 2, 128
BF16_ATOL = 2e-2


def has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def qkv(n_kv=K):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return mk(H), mk(n_kv), mk(n_kv)


def positions():
    row0 = torch.cat([torch.arange(100), torch.arange(200), torch.arange(84)])
    return torch.stack([row0, torch.arange(T)]).cuda()


def check(name, got, ref):
    assert_max_diff(name, got, ref, atol=BF16_ATOL)


DENSE = ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "flash_attn"]


@pytest.mark.parametrize("backend", DENSE)
@pytest.mark.parametrize("n_kv", [K, H])
def test_dense_causal_backends(backend, n_kv):
    if backend == "flash_attn" and not has_flash():
        pytest.skip("flash-attn not installed")
    q, k, v = qkv(n_kv)
    ctx = AttentionContext(case="dense", backend=backend)
    if backend == "flex":
        from ghostvis_core.attention import _causal_block_mask

        ctx.block_mask = _causal_block_mask(T, "cuda")
    causal = torch.ones(T, T, dtype=torch.bool, device="cuda").tril().expand(B, T, T)
    check(f"dense {backend} kv={n_kv}", attention(q, k, v, ctx), reference(q, k, v, causal))


@pytest.mark.parametrize("backend", ["flash_attn", "flex", "sdpa_efficient", "sdpa_math"])
def test_packed_backends_keep_documents_apart(backend):
    if backend == "flash_attn" and not has_flash():
        pytest.skip("flash-attn not installed")
    q, k, v = qkv()
    pos = positions()
    ctx = AttentionContext(case="packed", backend=backend)
    if backend == "flash_attn":
        ctx.cu_seqlens, ctx.max_seqlen = cu_seqlens_from_positions(pos)
    elif backend == "flex":
        ctx.block_mask = flex_document_block_mask(doc_ids_from_positions(pos))
    else:
        ctx.mask_B1TT = packed_mask(pos)
    check(f"packed {backend}", attention(q, k, v, ctx), reference(q, k, v, packed_mask(pos)[:, 0]))


# the backends the decode and prefill cases can plan (attention_preferences.CASES_SUPPORTED): SDPA needs a
# per-row mask; the Triton kernel serves one new token per row only (decode)
@pytest.mark.parametrize("backend", ["flash_attn", "sdpa_efficient", "sdpa_math", "triton"])
@pytest.mark.parametrize("start,new", [(0, 64), (64, 1), (64, 16), (255, 1)])
def test_kvcache_backends(backend, start, new):
    if backend == "flash_attn" and not has_flash():
        pytest.skip("flash-attn not installed")
    q, k, v = qkv()
    end = start + new
    kc = torch.zeros(B, 256, K, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    kc[:, :start], vc[:, :start] = k[:, :start], v[:, :start]
    if backend == "triton" and new > 1:  # a prefill: KVCache.backend routes it to the plan's prefill choice
        with pytest.raises(ValueError, match="one new token per row"):
            attention_with_kvcache(q[:, start:end], k[:, start:end], v[:, start:end], kc, vc, start, backend)
        return
    got = attention_with_kvcache(q[:, start:end], k[:, start:end], v[:, start:end], kc, vc, start, backend)
    allowed = torch.ones(end, end, dtype=torch.bool, device="cuda").tril().expand(B, end, end)
    check(
        f"kvcache {backend} {start}+{new}",
        got,
        reference(q[:, :end], k[:, :end], v[:, :end], allowed)[:, start:end],
    )
    assert torch.equal(kc[:, start:end], k[:, start:end])


def test_plan_context_on_cuda():
    from plans import device_plan

    from ghostvis_core.config import GPTConfig

    plan = device_plan(GPTConfig(n_layer=1, n_head=H, n_kv_head=K, n_embd=H * D), "cuda", "bfloat16")
    ctx = build_attention_context(plan, positions(), B, T, torch.device("cuda"))
    print("packed backend:", ctx.backend, "dense:", plan.attention["dense"].backend)
    assert ctx.case == "packed" and ctx.backend in ("flash_attn", "flex", "sdpa_efficient", "sdpa_math")
