"""Attention dispatch on CPU: every path that runs here against a plain float64 math reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_max_diff
from helpers import attention_reference as reference
from plans import cpu_plan

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
from ghostvis_core.config import GPTConfig

B, T, H, K, D = 2, 40, 4, 2, 16


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, H, D, generator=g),
        torch.randn(B, T, K, D, generator=g),
        torch.randn(B, T, K, D, generator=g),
    )


def packed_positions():
    return torch.stack([torch.cat([torch.arange(11), torch.arange(25), torch.arange(4)]), torch.arange(T)])


def report(name, got, ref):
    assert_max_diff(name, got, ref, atol=1e-5)


def test_doc_ids_and_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])  # row 2 continues a document
    assert doc_ids_from_positions(pos).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]]
    cu, max_len = cu_seqlens_from_positions(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 8, 12] and max_len == 4
    mask = packed_mask(pos)
    assert mask.shape == (2, 1, 6, 6) and mask[0, 0, 4].tolist() == [False, False, False, True, True, False]


def test_dense_causal_sdpa_math_matches_reference():
    q, k, v = qkv()
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    got = attention(q, k, v, AttentionContext(case="dense", backend="sdpa_math"))
    report("dense sdpa_math", got, reference(q, k, v, causal))


def test_noncausal_sdpa_math_matches_reference():
    q, k, v = qkv(1)
    got = attention(q, k, v, AttentionContext(case="noncausal", backend="sdpa_math"))
    report("noncausal sdpa_math", got, reference(q, k, v, torch.ones(B, T, T, dtype=torch.bool)))


def test_packed_sdpa_math_with_doc_mask_matches_reference():
    q, k, v = qkv(2)
    pos = packed_positions()
    plan = cpu_plan(GPTConfig(n_layer=1, n_head=H, n_kv_head=K, n_embd=H * D))
    ctx = build_attention_context(plan, pos, B, T, torch.device("cpu"))
    assert ctx.case == "packed" and ctx.backend == "sdpa_math"
    got = attention(q, k, v, ctx)
    report("packed sdpa_math", got, reference(q, k, v, packed_mask(pos)[:, 0]))


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_flex_document_mask_forward_on_cpu_matches_reference():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv(3)
    pos = packed_positions()
    ctx = AttentionContext(
        case="packed", backend="flex", block_mask=flex_document_block_mask(doc_ids_from_positions(pos))
    )
    with torch.no_grad():  # FlexAttention has no CPU backward; the forward runs eagerly here
        got = attention(q, k, v, ctx)
    report("packed flex (cpu eager)", got, reference(q, k, v, packed_mask(pos)[:, 0]))


@pytest.mark.parametrize("start,new", [(0, 9), (9, 1), (9, 6)])
def test_kvcache_attention_matches_reference(start, new):
    q, k, v = qkv(4)
    end = start + new
    k_cache, v_cache = torch.zeros(B, 20, K, D), torch.zeros(B, 20, K, D)
    k_cache[:, :start], v_cache[:, :start] = k[:, :start], v[:, :start]
    got = attention_with_kvcache(
        q[:, start:end], k[:, start:end], v[:, start:end], k_cache, v_cache, start, "sdpa_math"
    )
    allowed = torch.ones(end, end, dtype=torch.bool).tril().expand(B, end, end)
    ref = reference(q[:, :end], k[:, :end], v[:, :end], allowed)[:, start:end]
    report(f"kvcache start={start} new={new}", got, ref)
    assert torch.equal(k_cache[:, start:end], k[:, start:end])


def test_packed_flash_context_takes_the_loaders_bounds_without_computing_them(monkeypatch):
    """The trainer passes the loader's host-side (cu_seqlens, max_seqlen): no nonzero / .item() on the device."""
    from types import SimpleNamespace

    import ghostvis_core.attention as attention_mod

    def no_sync(_):
        raise AssertionError("cu_seqlens computed from the device tensor")

    monkeypatch.setattr(attention_mod, "cu_seqlens_from_positions", no_sync)
    plan = SimpleNamespace(attention={"packed": SimpleNamespace(backend="flash_attn")})
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    bounds = (torch.tensor([0, 3, 6], dtype=torch.int32), 3)
    ctx = build_attention_context(plan, pos, 1, 6, torch.device("cpu"), bounds)
    assert ctx.case == "packed" and ctx.cu_seqlens.tolist() == [0, 3, 6] and ctx.max_seqlen == 3
    with pytest.raises(AssertionError, match="computed from the device"):
        build_attention_context(plan, pos, 1, 6, torch.device("cpu"))  # without them it would compute
