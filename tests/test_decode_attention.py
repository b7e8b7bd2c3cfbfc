"""The Triton split-KV decode kernel (kernels/decode_attention_triton.py) on CPU through the Triton interpreter:
against a float64 reference (cache write included, GQA and not, spans forced and chosen, full rows), and a
model's decode through it against the SDPA path."""

import math

import pytest
import torch
from test_gpt import V, randomized, tiny_config

pytest.importorskip("triton")


def _reference(q, k_new, v_new, k_cache, v_cache, lens):
    """float64: write row b's new K/V at slot min(len_b, S - 1), softmax attention over slots [0, slot]."""
    B, H, D = q.shape
    S, K = k_cache.shape[1:3]
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = []
    for b in range(B):
        slot = min(int(lens[b]), S - 1)
        k_cache[b, slot], v_cache[b, slot] = k_new[b], v_new[b]
        k = k_cache[b, : slot + 1].double().repeat_interleave(H // K, dim=1)  # (n, H, D)
        v = v_cache[b, : slot + 1].double().repeat_interleave(H // K, dim=1)
        p = (torch.einsum("hd,nhd->hn", q[b].double(), k) / math.sqrt(D)).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(out), k_cache, v_cache


CASES = [  # B, H, K, D, S, lengths, spans (None: the kernel's choice)
    (3, 4, 2, 16, 200, [0, 70, 199], None),  # GQA, an empty row, a row filling the last slot
    (2, 4, 4, 32, 130, [5, 300], 3),  # no GQA; a row past its end writes (and reads) the last slot
    (1, 6, 2, 16, 64, [63], 1),  # one span
    (2, 8, 1, 16, 100, [50, 99], 2),  # multi-query
    (3, 4, 2, 16, 130, [3, 64, 129], 8),  # spans past a short row's end; len + 1 not a multiple of the spans
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_matches_float64_and_writes_the_cache(decode_kernel, case, dtype):
    B, H, K, D, S, lengths, spans = case
    g = torch.Generator().manual_seed(B * S)
    q, k_new, v_new = (torch.randn(B, n, D, generator=g).to(dtype) for n in (H, K, K))
    k_cache, v_cache = (torch.randn(B, S, K, D, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor(lengths, dtype=torch.int32)
    want, k_want, v_want = _reference(q, k_new, v_new, k_cache, v_cache, lens)
    for _ in range(2):  # the second call finds the span tickets the first one left at zero
        got = decode_kernel.decode_attention_triton(q, k_new, v_new, k_cache, v_cache, lens, splits=spans)
        assert got.dtype == dtype and got.shape == (B, H, D)
        tol = 2e-6 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding (fp32 math inside)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
        assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
        if (spans or decode_kernel.num_splits(B, K, S, q.device)) > 1:
            assert not decode_kernel._tickets(q.device, B, K).any()


def test_spans_cover_the_cache_and_fill_the_card(decode_kernel):
    cpu = torch.device("cpu")  # counted as a 132-SM card
    assert decode_kernel.num_splits(1, 10, 384, cpu) == 24  # 384 slots / 16: every span of a full row one block
    assert decode_kernel.num_splits(64, 10, 384, cpu) == 7  # ceil(32 * 132 / 640)
    assert decode_kernel.num_splits(256, 10, 384, cpu) == 2
    assert decode_kernel.num_splits(8, 10, 4096, cpu) == 53  # ceil(32 * 132 / 80)
    assert decode_kernel.num_splits(1, 2, 8192, cpu) == decode_kernel.MAX_SPLITS  # the last span's serial combine bounds it


def test_a_model_decodes_through_the_kernel_as_through_sdpa(decode_kernel, monkeypatch):
    import ghostvis_core.attention as attention

    monkeypatch.setattr(attention, "_triton_decode_attention",
                        lambda q, k, v, kc, vc, lens: decode_kernel.decode_attention_triton(q[:, 0], k[:, 0], v[:, 0], kc,
                                                                                     vc, lens)[:, None])  # fmt: skip
    # fused projections: v reaches the kernel as a strided view of the q|k|v product, as when serving
    model = randomized(tiny_config(n_head=4, n_kv_head=2), seed=2).eval().fuse_projections_()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    caches = [model.new_kv_cache(2, 16) for _ in range(2)]
    caches[1].decode_backend = "triton"
    with torch.no_grad():
        for step in range(5):
            feed = ids if step == 0 else ids[:, -1:]  # a prefill (SDPA under "triton" too), then decode steps
            a, b = (model.forward_with_cache(feed, c) for c in caches)
            torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
            ids = torch.cat([ids, a[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(caches[0].cache_seqlens, caches[1].cache_seqlens)
