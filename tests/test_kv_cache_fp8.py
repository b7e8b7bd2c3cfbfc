"""fp8 e4m3 KV cache (kv_cache.py, kv_cache_dtype="fp8"): quantization error bounds, the Triton decode kernel over
an fp8 cache (Triton interpreter) against a float64 reference over the dequantized cache, the SDPA path storing
the same values, and models decoding through an fp8 cache: close to the full-precision cache, batched equal to
one by one, and refused where no decode kernel can read it."""

import dataclasses
import math

import pytest
import torch
from test_gpt import V, randomized, tiny_config

from ghostvis_core.errors import ConfigError
from ghostvis_core.kv_cache import (
    FP8,
    FP8_MAX,
    FP8_MIN_AMAX,
    KVCache,
    check_kv_cache_dtype,
    dequantize_fp8,
    quantize_fp8,
)


def test_quantize_keeps_each_vector_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 128, generator=g) * torch.logspace(-3, 2, 64)[:, None, None]  # 5 decades of scale
    x[0, 0] = 0.0  # an all-zero vector: a scale of FP8_MIN_AMAX / 448, values 0
    x8, scale = quantize_fp8(x)
    assert x8.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    amax = x8.float().abs().amax(-1).flatten()
    assert amax[0] == 0 and (amax[1:] == FP8_MAX).all()  # each vector's largest element lands on e4m3's largest
    back = dequantize_fp8(x8, scale, torch.float64)
    assert torch.equal(back[0, 0], torch.zeros(128, dtype=torch.float64))
    # e4m3: 3 mantissa bits, so rounding moves an element by at most 2^-4 of its magnitude (normal range) or
    # half a subnormal step, 2^-10 * scale (values below 2^-6 * scale)
    err = (back - x.double()).abs()
    bound = torch.maximum(x.double().abs() * 2**-4, scale.double()[..., None] * 2**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    # a head vector's dot product keeps far better than the per-element bound
    q = torch.randn(128, generator=g, dtype=torch.float64)
    rel = (((back - x.double()) @ q).abs() / (x.double().norm(dim=-1) * q.norm())).flatten()[1:]
    assert rel.max() < 0.02 and rel.mean() < 0.004


def _reference(q, k_new, v_new, k8, v8, ks, vs, lens):
    """float64 over the dequantized cache after writing quantize_fp8 of the new token at min(len, S - 1)."""
    B, H, D = q.shape
    S, K = k8.shape[1:3]
    k8, v8, ks, vs = k8.clone(), v8.clone(), ks.clone(), vs.clone()
    out = []
    for b in range(B):
        slot = min(int(lens[b]), S - 1)
        (k8[b, slot], ks[b, slot]), (v8[b, slot], vs[b, slot]) = quantize_fp8(k_new[b]), quantize_fp8(v_new[b])
        k = dequantize_fp8(k8[b, : slot + 1], ks[b, : slot + 1], torch.float64).repeat_interleave(H // K, dim=1)
        v = dequantize_fp8(v8[b, : slot + 1], vs[b, : slot + 1], torch.float64).repeat_interleave(H // K, dim=1)
        p = (torch.einsum("hd,nhd->hn", q[b].double(), k) / math.sqrt(D)).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(out), (k8, v8, ks, vs)


CASES = [  # B, H, K, D, S, lengths, spans (None: the kernel's choice)
    (3, 4, 2, 16, 200, [0, 70, 199], None),  # GQA, an empty row, a row filling the last slot
    (2, 4, 4, 32, 130, [5, 300], 3),  # no GQA; a row past its end
    (1, 6, 2, 16, 64, [63], 1),  # one span: the kernel writes the output itself
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp8_decode_matches_float64_over_the_dequantized_cache_and_stores_like_quantize(decode_kernel, case, dtype):
    B, H, K, D, S, lengths, spans = case
    g = torch.Generator().manual_seed(B * S + 1)
    q, k_new, v_new = (torch.randn(B, n, D, generator=g).to(dtype) for n in (H, K, K))
    v_new[0, 0, :2] = torch.tensor([-0.0, -1e-7])  # negatives stored as -0.0 (byte 0x80), as torch stores them
    (k8, ks), (v8, vs) = (quantize_fp8(3 * torch.randn(B, S, K, D, generator=g)) for _ in range(2))
    lens = torch.tensor(lengths, dtype=torch.int32)
    want, stored = _reference(q, k_new, v_new, k8, v8, ks, vs, lens)
    got = decode_kernel.decode_attention_triton(q, k_new, v_new, k8, v8, lens, splits=spans, k_scale_BSK=ks,
                                         v_scale_BSK=vs)  # fmt: skip
    assert got.dtype == dtype and got.shape == (B, H, D)
    # fp32 math over values of ~3 (rel. ~5e-6); bf16: q and the output rounded (2 ulps of values up to ~5)
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    # the kernel stored the new token exactly as quantize_fp8 does (same divisions, same rounding)
    for got_t, want_t in zip((k8, v8, ks, vs), stored, strict=True):
        assert torch.equal(got_t.view(torch.uint8) if got_t.dtype == FP8 else got_t,
                           want_t.view(torch.uint8) if want_t.dtype == FP8 else want_t)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_triton_fp8_store_writes_what_quantize_fp8_writes_and_nothing_else(dtype):
    """The prefill's one-kernel store (kernels/kv_store_fp8_triton.py, interpreted on the CPU) against
    kv_cache.store_fp8's PyTorch path: the same e4m3 bytes and fp32 scales at each query row's cache row and
    slots, bit for bit, from k/v that are strided views of one fused projection (as GPT's are); a T that is no
    multiple of the kernel's token block; every other slot untouched."""
    pytest.importorskip("triton")
    from helpers import triton_interpreted

    from ghostvis_core.kv_cache import store_fp8

    B, T, K, D, R, S = 3, 21, 2, 64, 5, 40
    g = torch.Generator().manual_seed(7)
    kvq = (3 * torch.randn(B, T, 3, K, D, generator=g)).to(dtype)
    k_new, v_new = kvq[:, :, 0], kvq[:, :, 1]  # strides of a fused projection: not contiguous over K
    k_new[0, 4, 1] = 0.0  # an all-zero vector takes the FP8_MIN_AMAX scale
    # negatives that round to zero are stored as -0.0 (byte 0x80), as torch's cast stores them
    v_new[1, 2, 0, :3] = torch.tensor([-0.0, -1e-7, 1e-7])
    rows = torch.tensor([4, 0, 2], dtype=torch.long)
    starts = torch.tensor([0, 5, 19], dtype=torch.long)  # the last row ends on the last slot
    (k8, ks), (v8, vs) = (quantize_fp8(torch.randn(R, S, K, D, generator=g)) for _ in range(2))
    want = [t.clone() for t in (k8, v8, ks, vs)]
    store_fp8(k_new, v_new, *want, rows, starts)
    got = [t.clone() for t in (k8, v8, ks, vs)]
    with triton_interpreted("ghostvis_core.kernels.decode_attention_triton",
                            "ghostvis_core.kernels.kv_store_fp8_triton") as (_, store):  # fmt: skip
        store.kv_store_fp8_triton(k_new, v_new, *got, rows, starts)
    for got_t, want_t, old in zip(got, want, (k8, v8, ks, vs), strict=True):
        as_bits = (lambda t: t.view(torch.uint8)) if old.dtype == FP8 else (lambda t: t)
        assert torch.equal(as_bits(got_t), as_bits(want_t))
        assert not torch.equal(as_bits(got_t), as_bits(old))  # the store wrote something
    # the written slots hold quantize_fp8 of the new values, and rows 1 and 3 are untouched
    k8_want, ks_want = quantize_fp8(k_new)
    assert torch.equal(got[0][2, 19:40].view(torch.uint8), k8_want[2].view(torch.uint8))
    assert torch.equal(got[2][4, :T], ks_want[0])
    assert ks_want[0, 4, 1] == torch.tensor(FP8_MIN_AMAX, dtype=torch.float32) / FP8_MAX
    for r in (1, 3):
        assert torch.equal(got[0][r].view(torch.uint8), k8[r].view(torch.uint8)) and torch.equal(got[3][r], vs[r])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fp8_store_on_cuda_writes_the_cpu_store_bytes():
    """kv_cache.store_fp8 on CUDA (the compiled Triton kernel, through its custom op) against its PyTorch path
    on the CPU: the same bytes and scales, bf16 inputs of prefill size (B 8, T 130, 10 KV heads of 128)."""
    from ghostvis_core.kv_cache import store_fp8

    B, T, K, D, R, S = 8, 130, 10, 128, 12, 300
    g = torch.Generator().manual_seed(3)
    kv = (3 * torch.randn(B, T, 2, K, D, generator=g)).bfloat16()
    rows = torch.randperm(R, generator=g)[:B]
    starts = torch.randint(0, S - T, (B,), generator=g)
    caches = [t for _ in range(2) for t in quantize_fp8(torch.randn(R, S, K, D, generator=g))]
    k8, ks, v8, vs = (t.clone() for t in caches)
    store_fp8(kv[:, :, 0], kv[:, :, 1], k8, v8, ks, vs, rows, starts)
    on_gpu = [t.cuda() for t in (caches[0], caches[2], caches[1], caches[3])]
    store_fp8(kv[:, :, 0].cuda(), kv[:, :, 1].cuda(), *on_gpu, rows.cuda(), starts.cuda())
    for name, got, want in zip(("k", "v", "k_scale", "v_scale"), on_gpu, (k8, v8, ks, vs), strict=True):
        as_bits = (lambda t: t.view(torch.uint8)) if want.dtype == FP8 else (lambda t: t)
        bad = (as_bits(got.cpu()) != as_bits(want)).nonzero()
        assert not len(bad), (f"{name}: {len(bad)} of {want.numel()} differ, first at {bad[0].tolist()}: "
                              f"{as_bits(got.cpu())[tuple(bad[0])]} against {as_bits(want)[tuple(bad[0])]}")  # fmt: skip


def test_fp8_cache_halves_the_bytes_and_refuses_an_unknown_storage():
    args = (2, 2, 128, 4, 64, torch.device("cpu"), "sdpa_math", "sdpa_math", torch.bfloat16)
    full, fp8 = KVCache(*args), KVCache(*args, "fp8")
    assert fp8.k.dtype == FP8 and fp8.k_scale.shape == (2, 4, 64, 2)
    assert fp8.nbytes / full.nbytes == pytest.approx((128 + 4) / 256)  # e4m3 plus one fp32 scale per vector
    with pytest.raises(ConfigError, match="int4"):
        KVCache(*args, "int4")
    with pytest.raises(ConfigError, match="--kv-cache-dtype 'int8'"):
        check_kv_cache_dtype("int8", torch.device("cpu"), "sdpa_math")


def _model():
    return randomized(tiny_config(n_head=4, n_kv_head=2), seed=3).eval().fuse_projections_()


def test_a_model_decodes_through_an_fp8_cache_close_to_the_full_one(decode_kernel, monkeypatch):
    import ghostvis_core.attention as attention

    monkeypatch.setattr(attention, "_triton_decode_attention_fp8",
                        lambda q, k, v, kc, vc, lens, ks, vs: decode_kernel.decode_attention_triton(
                            q[:, 0], k[:, 0], v[:, 0], kc, vc, lens, k_scale_BSK=ks, v_scale_BSK=vs)[:, None])
    model = _model()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    full = model.new_kv_cache(2, 16)
    sdpa_fp8 = model.new_kv_cache(2, 16, kv_cache_dtype="fp8")
    triton_fp8 = model.new_kv_cache(2, 16, kv_cache_dtype="fp8")
    triton_fp8.decode_backend = "triton"
    assert sdpa_fp8.storage == "fp8" and sdpa_fp8.decode_backend == "sdpa_math"
    agree = []
    with torch.no_grad():
        for step in range(5):
            feed = ids if step == 0 else ids[:, -1:]  # an SDPA prefill into fp8, then decode steps
            a, b, c = (model.forward_with_cache(feed, cache) for cache in (full, sdpa_fp8, triton_fp8))
            # the two fp8 paths store and read the same values (SDPA in fp32 over the dequantized rows)
            torch.testing.assert_close(c, b, rtol=0, atol=2e-5)
            # against the fp32 cache, on this random-weight model with head_dim 16 (measured: mean 5-7%, max
            # 22-37% of the logits' spread): e4m3 rounding of K/V moves the logits, not the picture
            err = (b - a).abs() / a.std()
            assert err.mean() < 0.1 and err.max() < 0.5, (err.mean(), err.max())
            agree.append((a.argmax(-1) == b.argmax(-1)).float().flatten())
            ids = torch.cat([ids, a[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.cat(agree).mean() >= 0.75  # the greedy token at most positions (measured 23 of 26)
    # the stored caches: the two paths' attention outputs differ in the last bits (fp32 sums in another order),
    # so later tokens' keys do too, and a value near a rounding boundary may land one e4m3 step (2^-4) apart
    for x, scale in (("k", "k_scale"), ("v", "v_scale")):
        want, got = (dequantize_fp8(getattr(c, x), getattr(c, scale), torch.float64) for c in (sdpa_fp8, triton_fp8))
        torch.testing.assert_close(got, want, rtol=2**-4, atol=1e-6)


def test_a_fresh_fp8_prefill_attends_over_its_own_keys_and_stores_them_quantized():
    """Fresh rows (KVCache.rows, right-padded prompts) of an fp8 cache: the prefill's logits are the full-precision
    cache's, since it attends over the new K/V themselves, and the cache then holds quantize_fp8 of those K/V."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    lens = [9, 5, 7]
    ids = torch.randint(0, V, (3, 9), generator=g)
    rows = torch.tensor([3, 0, 2], dtype=torch.int32)
    full = model.new_kv_cache(4, 16)
    fp8 = model.new_kv_cache(4, 16, kv_cache_dtype="fp8")
    last = torch.tensor(lens) - 1
    with torch.no_grad():
        want = model.forward_with_cache(ids, full.rows(rows), last_index=last)
        got = model.forward_with_cache(ids, fp8.rows(rows), last_index=last)
        # the same rows as a view not marked fresh: attending over the dequantized cache moves the logits
        stale_view = dataclasses.replace(model.new_kv_cache(4, 16, kv_cache_dtype="fp8").rows(rows), fresh=False)
        stale = model.forward_with_cache(ids, stale_view, last_index=last)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (stale - want).abs().max() > 1e-3  # so the check above can tell the two paths apart
    r = rows.long()
    for x, scale in (("k", "k_scale"), ("v", "v_scale")):
        q8, qs = quantize_fp8(getattr(full, x)[:, r, :9])
        # layer 0's K/V come from the embeddings alone: stored exactly as quantize_fp8 makes them
        assert torch.equal(getattr(fp8, x)[0, r, :9].view(torch.uint8), q8[0].view(torch.uint8))
        torch.testing.assert_close(getattr(fp8, scale)[0, r, :9], qs[0], rtol=0, atol=0)
        # later layers' inputs differ in the last fp32 bits (attention summed in another order), so a value
        # near a rounding boundary may land one e4m3 step (2^-4 relative) apart
        torch.testing.assert_close(dequantize_fp8(getattr(fp8, x)[:, r, :9], getattr(fp8, scale)[:, r, :9],
                                                  torch.float64), dequantize_fp8(q8, qs, torch.float64),
                                   rtol=2**-4, atol=1e-6)  # fmt: skip
    untouched = torch.tensor([1])
    assert (fp8.k[:, untouched].view(torch.uint8) == 0).all() and (fp8.k_scale[:, untouched] == 1).all()


def test_fp8_cache_generation_batched_equals_one_by_one():
    from ghostvis_core.batch_engine import Engine
    from ghostvis_core.sampling import SamplingParams

    model = _model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 11, 6, 1, 8)]
    engine = Engine(model, kv_cache_dtype="fp8")
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    together = engine.generate_many(prompts, greedy, max_tokens=7, batch_size=3)
    alone = [engine.generate_many([p], greedy, max_tokens=7, batch_size=1)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert all(len(c.token_ids) == 7 for c in together)
    assert engine.kv_cache_dtype == "fp8"


def test_fp8_cache_is_refused_where_no_kernel_reads_it(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match=r"sm89\+ GPU.*sm80.*drop --kv-cache-dtype"):
        check_kv_cache_dtype("fp8", cuda, "triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ConfigError, match="decodes with flash_attn"):
        check_kv_cache_dtype("fp8", cuda, "flash_attn")
    check_kv_cache_dtype("fp8", cuda, "triton")
    check_kv_cache_dtype("auto", cuda, "flash_attn")
