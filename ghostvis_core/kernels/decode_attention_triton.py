"""One-token decode attention over a KV cache with per-row lengths, in Triton (split-KV "flash decoding").

For each row b, KV head k and its G = H / K query heads, with L_b = cache_seqlens[b] tokens already cached:

    write  k_new, v_new into cache slot L_b (clamped to S - 1, as attention.attention_with_kvcache does)
    s_j  = q . k_j * D**-0.5          over slots j < L_b, plus the new token
    out  = sum_j softmax(s)_j v_j

Each row's L_b + 1 tokens are cut into `splits` spans of equal length (a multiple of BLOCK slots), one program
per (row, KV head, span). The span length is computed from the row's own length inside the kernel, so the grid
is static (a CUDA graph replays it at every length) while every span of a long row does work and a short row's
surplus programs exit at once. A program keeps an online softmax (running max m, sum denom, accumulator acc)
over its span in fp32 and stores acc / denom with lse = m + log denom.
The span holding slot L_b also folds in the new token from registers and writes it to the cache, so no
program ever reads a slot another program writes. The last program of a (row, KV head) to finish (a ticket
counter, taken with an atomic add after its partial is stored) combines the spans:

    out = sum_s exp(lse_s - max lse) out_s / sum_s exp(lse_s - max lse)

so no second kernel runs: on an H200, 4.82 against 5.40 us at batch 1 (200 cached, 24 spans), 27.8 against
29.3 us at batch 64 and 107.1 against 108.3 us at batch 256, CUDA-graph replays. With one span the split
kernel writes the output itself and takes no ticket.

Tiles, measured on an H200 (d20 decode shapes: 10 heads of 128, 384 slots, bf16; `python -m
ghostvis_core.bench.decode_attention`, docs/BENCHMARKS.md): 16 slots per iteration under 2 warps beat 64 under 4
at every batch, and more, shorter spans win until about 32 programs per SM: batch 64 with 200 cached, 54.3 ->
27.9 us (2.4 TB/s); batch 256 with 256 cached, 195 -> 102 us (3.3 TB/s); flash_attn_with_kvcache 35.5 and 140 us.
Many small programs keep more loads in flight than a few pipelined ones. In the 2-D form (below) one warp per
program then beat two over both caches, 19-26% at every batch (2-D form, one call, docs/BENCHMARKS.md): bf16 at batch 256 103.9 -> 83.9 us
(4.0 TB/s), batch 512 191.4 -> 158.1 us; fp8 (64 slots) at batch 256 71.6 -> 56.5 us, batch 512 130.2 -> 111.1 us.

Why not flash_attn_with_kvcache at decode: it runs its prefill tiles (64 query rows) for a single query row.
Here the G query heads of a KV head share each K/V load, with no tensor-core tile to fill.

fp8 caches (kv_cache.py, kv_cache_dtype="fp8"): the caches hold float8 e4m3 and k_scale, v_scale (B, S, K)
one fp32 scale per token and KV head. The scales fold into the math instead of a dequantized tile:
s_j = (q . k8_j) * ks_j * D**-0.5 and acc += sum_j (p_j * vs_j) v8_j. The new token is quantized as
kv_cache.quantize_fp8 does (amax over D, round-to-nearest divisions) and folded in from its stored fp8 value,
so this step sees exactly what later steps will read. Its tile was swept on the H200 (`--fp8` below): 64 slots;
16-slot tiles, the bf16 kernel's, ran 2x slower, and 4 warps slower still; one warp, as for bf16 (above).

The 2-D form (FLAT, the default when G == 1, as in d20 with 10 heads over 10 KV heads): with one query head per KV
head the (BLOCK_G, BLOCK, D) products are computed as (BLOCK, D) ones in the loaded tile's own layout, s = sum_D k
* q and acc += sum_BLOCK p v, with no 3-D broadcast for the compiler to lay out. On the H200 (`python -m
ghostvis_core.bench.decode_attention --defaults-only --fp8 --forms`, one call), 3-D -> 2-D: bf16 at batch 256
106.2 -> 103.4 us (3.26 TB/s), batch 512 201.9 -> 189.8 us (3.55 TB/s), batch 1 4.35 -> 4.12 us, batch 64 27.1 ->
28.5 us (its one loss); fp8 at batch 256 88.5 -> 71.2 us (2.44 TB/s of its bytes), batch 512 169.7 -> 128.6 us,
batch 64 25.5 -> 20.7 us. So over fp8 the kernel now runs 1.45x (batch 256) and 1.48x (batch 512) faster than over
bf16. Casting the fp8 tile to bf16 right after its load, before the fp32 cast, was timed in the same call and lost
at every batch (91.5 us at batch 256 in the 2-D form), so it is not done.

Layouts: q (B, H, D); k_new, v_new (B, K, D); caches (B, S, K, D) with unit stride on D; cache_seqlens int32
(B,). D a power of two (a head dim of 64, 128, ...).
"""

import functools

import torch
import triton
import triton.language as tl

from ghostvis_core import kv_cache

BLOCK_N = 16  # cached tokens per loop iteration (module docstring: measured)
NUM_WARPS = 2  # the 3-D form (module docstring: measured)
NUM_STAGES = 2
FP8_BLOCK_N = 64  # over an fp8 cache (module docstring: measured)
FP8_NUM_WARPS = 2
FLAT_NUM_WARPS = 1  # the 2-D form, over either cache (module docstring: measured)
PROGRAMS_PER_SM = 32
MAX_SPLITS = 64  # the last program reads every span's (D,) partial in turn: a bound on that serial tail
FP8_MAX = tl.constexpr(kv_cache.FP8_MAX)
FP8_MIN_AMAX = tl.constexpr(kv_cache.FP8_MIN_AMAX)


@triton.jit
def _sum(x, axis: tl.constexpr):
    # tl.reduce with the library's combiners (not tl.sum / tl.max, which Triton binds as compiled or
    # interpreted at its first import): keeps the kernel runnable under TRITON_INTERPRET=1 in CPU tests.
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _round_e4m3(y):
    """y (fp32, |y| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32: the cast that follows is
    then exact. (The Triton CPU interpreter's fp32 -> e4m3 cast drops a carry into the exponent, 124.7 -> 64,
    so the CPU tests could not check the kernel's stored values against torch's cast without this.)
    The grid step at |y| in [2^e, 2^(e+1)) is 2^(e-3) (3 mantissa bits), and 2^-9 below e4m3's smallest
    normal 2^-6; adding and taking away 1.5 * 2^23 rounds |y| / step to an integer, ties to even. The sign goes
    back on last, so a negative y that rounds to zero stays -0.0, as torch's cast gives (byte 0x80, not 0x00)."""
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    r = ((tl.abs(y) * inv_step + 12582912.0) - 12582912.0) * step
    # the sign bit ORed in as an integer: a float negation or select of a zero may be folded away when compiled
    # (-0.0 == 0.0), which left +0.0 on the H200 where the interpreter gave -0.0
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _quantize(x, D: tl.constexpr):
    """(D,) fp32 -> e4m3 values and their fp32 scale, as kv_cache.quantize_fp8."""
    amax = tl.maximum(_max(tl.abs(x), 0), FP8_MIN_AMAX)
    scale = tl.div_rn(amax, FP8_MAX)
    y = tl.minimum(tl.maximum(tl.div_rn(x, scale), -FP8_MAX), FP8_MAX)
    return _round_e4m3(y).to(tl.float8e4nv), scale


@triton.jit
def _decode_split_kernel(
    Q, KN, VN, KC, VC, LENS, OUT, LSE, Y, TICKETS, KS, VS,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_yb, stride_yh,
    S, scale,
    SPLITS: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    DIRECT: tl.constexpr, PDL: tl.constexpr, FP8: tl.constexpr, FLAT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    if PDL:  # launched early (programmatic dependent launch): wait for the kernel that wrote q, k_new, v_new
        tl.extra.cuda.gdc_wait()
    new_slot = tl.minimum(tl.load(LENS + b), S - 1)  # the new token's slot; slots below it are cached
    # Spans over this row's new_slot + 1 tokens: SPLITS * split_len > new_slot, so some span holds the new token.
    # (integer division, not tl.cdiv: see _sum)
    split_len = ((new_slot + SPLITS) // SPLITS + BLOCK - 1) // BLOCK * BLOCK
    start = sp * split_len
    end = tl.minimum(start + split_len, new_slot)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    d = tl.arange(0, D)
    heads = kh * G + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    q = q.to(tl.float32) * scale  # (BLOCK_G, D)
    q1 = _sum(q, 0)  # (D,): the one head when FLAT
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.full([BLOCK_G], 0.0, tl.float32)  # tl.full, not tl.zeros: see _sum
    acc = tl.full([BLOCK_G, D], 0.0, tl.float32)
    cache_row = KC + b * stride_cb + kh * stride_ch
    vcache_row = VC + b * stride_cb + kh * stride_ch
    kscale_row = KS + b * stride_sb + kh * stride_sh
    vscale_row = VS + b * stride_sb + kh * stride_sh
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        n_ok = n < end
        offs = n[:, None].to(tl.int64) * stride_cs + d[None, :]
        k = tl.load(cache_row + offs, mask=n_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK, D)
        if FLAT:  # one query head per KV head: 2-D math in the tile's own layout (module docstring)
            s = _sum(k * q1[None, :], 1)[None, :]  # (1, BLOCK)
        else:
            s = _sum(q[:, None, :] * k[None, :, :], 2)  # (BLOCK_G, BLOCK)
        if FP8:
            s = s * tl.load(kscale_row + n * stride_ss, mask=n_ok, other=0.0)[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, _max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(vcache_row + offs, mask=n_ok[:, None], other=0.0).to(tl.float32)
        denom = denom * alpha + _sum(p, 1)
        if FP8:
            pv = p * tl.load(vscale_row + n * stride_ss, mask=n_ok, other=0.0)[None, :]
        else:
            pv = p
        if FLAT:
            acc = acc * alpha[:, None] + _sum(_sum(pv, 0)[:, None] * v, 0)[None, :]
        else:
            acc = acc * alpha[:, None] + _sum(pv[:, :, None] * v[None, :, :], 1)
        m = m_new
    if (new_slot >= start) & (new_slot < start + split_len):
        kn = tl.load(KN + b * stride_kb + kh * stride_kh + d)
        vn = tl.load(VN + b * stride_vb + kh * stride_vh + d)
        if FP8:  # store e4m3 and the scale; fold in the stored value (module docstring)
            kn8, ks = _quantize(kn.to(tl.float32), D)
            vn8, vs = _quantize(vn.to(tl.float32), D)
            tl.store(cache_row + new_slot * stride_cs + d, kn8)
            tl.store(vcache_row + new_slot * stride_cs + d, vn8)
            tl.store(kscale_row + new_slot * stride_ss, ks)
            tl.store(vscale_row + new_slot * stride_ss, vs)
            s = _sum(q * kn8.to(tl.float32)[None, :], 1) * ks  # (BLOCK_G,)
            vn_f = vn8.to(tl.float32)
        else:
            tl.store(cache_row + new_slot * stride_cs + d, kn)
            tl.store(vcache_row + new_slot * stride_cs + d, vn)
            s = _sum(q * kn.to(tl.float32)[None, :], 1)  # (BLOCK_G,)
            vn_f = vn.to(tl.float32)
            vs = 1.0
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        denom = denom * alpha + p
        acc = acc * alpha[:, None] + (p * vs)[:, None] * vn_f[None, :]
        m = m_new
    if PDL:  # the next kernel may launch now; it waits for this whole grid before it reads the output
        tl.extra.cuda.gdc_launch_dependents()
    has = denom > 0
    out = acc / tl.where(has, denom, 1.0)[:, None]
    y_ptrs = Y + b * stride_yb + heads[:, None] * stride_yh + d[None, :]
    if DIRECT:  # one span: this is the answer, in the output's dtype (no combine)
        tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=g_ok[:, None])
    else:
        lse = tl.where(has, m + tl.log(tl.where(has, denom, 1.0)), float("-inf"))
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os + d[None, :], out,
                 mask=g_ok[:, None])  # fmt: skip
        tl.store(LSE + b * stride_lb + heads * stride_lh + sp, lse, mask=g_ok)
        # The last span of (b, kh) to finish combines them all. The barrier puts every thread's stores
        # before the ticket's release; the acq_rel ticket orders the last program's loads after every
        # other program's stores; .cg loads skip L1. The last program resets the ticket for the next call.
        tl.debug_barrier()
        ticket_ptr = TICKETS + b * tl.num_programs(1) + kh
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == SPLITS - 1:
            lse_ptrs = LSE + b * stride_lb + heads * stride_lh
            top = tl.load(lse_ptrs, mask=g_ok, other=0.0, cache_modifier=".cg")  # span 0 is never empty
            for j in range(1, SPLITS):
                top = tl.maximum(top, tl.load(lse_ptrs + j, mask=g_ok, other=0.0, cache_modifier=".cg"))
            acc = tl.full([BLOCK_G, D], 0.0, tl.float32)
            wsum = tl.full([BLOCK_G], 0.0, tl.float32)
            for j in range(SPLITS):
                w = tl.exp(tl.load(lse_ptrs + j, mask=g_ok, other=0.0, cache_modifier=".cg") - top)
                o = tl.load(OUT + b * stride_ob + heads[:, None] * stride_oh + j * stride_os + d[None, :],
                            mask=g_ok[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
                acc += w[:, None] * o
                wsum += w
            tl.store(y_ptrs, (acc / wsum[:, None]).to(Y.dtype.element_ty), mask=g_ok[:, None])
            tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(batch: int, kv_heads: int, slots: int, device: torch.device, block_n: int = BLOCK_N) -> int:
    """Spans per (row, KV head): about PROGRAMS_PER_SM programs per SM, no more spans than a full row has
    blocks, at most MAX_SPLITS."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 132
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(slots, block_n), MAX_SPLITS))


_TICKETS: dict[tuple[int, int, int], torch.Tensor] = {}


def _tickets(device: torch.device, batch: int, kv_heads: int) -> torch.Tensor:
    """The per-(row, KV head) span counters of the in-kernel combine: zeros, made once per shape and device and
    kept (each call's last span puts its counter back to 0), so a captured graph replays with no memset.
    One decode call at a time per device uses them, as the engine's steps run."""
    key = (device.index or 0, batch, kv_heads)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(batch, kv_heads, dtype=torch.int32, device=device)
    return _TICKETS[key]


def decode_attention_triton(q_BHD, k_new_BKD, v_new_BKD, k_cache_BSKD, v_cache_BSKD, cache_seqlens_B,
                            splits: int | None = None, *, block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int = NUM_STAGES, pdl: bool = False, k_scale_BSK=None,
                            v_scale_BSK=None,
                            flat: bool | None = None) -> torch.Tensor:  # fmt: skip
    """Write each row's new K/V at its slot and attend to slots [0, len_b] (module docstring); (B, H, D).
    k_scale_BSK, v_scale_BSK: the fp32 scales of fp8 e4m3 caches (both or neither).
    block_n, num_warps, num_stages: the split kernel's tile and launch settings (None: BLOCK_N, or FP8_BLOCK_N
    over an fp8 cache; FLAT_NUM_WARPS in the 2-D form, else NUM_WARPS, or FP8_NUM_WARPS over an fp8 cache).
    pdl: launch with programmatic dependent launch (Hopper and later, CUDA), overlapping this kernel's launch
    with the tail of the one before, as the compiled step's own kernels do when it is on (batch_engine).
    flat: the 2-D form (module docstring); None: on when there is one query head per KV head."""
    B, H, D = q_BHD.shape
    S, K = k_cache_BSKD.shape[1], k_cache_BSKD.shape[2]
    G = H // K
    assert H % K == 0 and D & (D - 1) == 0, (H, K, D)
    assert all(t.stride(-1) == 1 for t in (q_BHD, k_new_BKD, v_new_BKD, k_cache_BSKD)), "unit stride on D"
    assert v_cache_BSKD.stride() == k_cache_BSKD.stride()
    fp8 = k_scale_BSK is not None
    flat = (G == 1) if flat is None else flat
    assert not flat or G == 1, "the 2-D form holds one query head per KV head"
    block_n = block_n or (FP8_BLOCK_N if fp8 else BLOCK_N)
    num_warps = num_warps or (FLAT_NUM_WARPS if flat else FP8_NUM_WARPS if fp8 else NUM_WARPS)
    assert fp8 == (v_scale_BSK is not None) == (k_cache_BSKD.dtype == torch.float8_e4m3fn), "fp8 cache and scales"
    if fp8:
        assert v_scale_BSK.stride() == k_scale_BSK.stride()
        ks, vs, sstride = k_scale_BSK, v_scale_BSK, k_scale_BSK.stride()
    else:  # unused pointers (FP8 is a constexpr: the loads are compiled out)
        ks, vs, sstride = cache_seqlens_B, cache_seqlens_B, (0, 0, 0)
    splits = splits or num_splits(B, K, S, q_BHD.device, block_n)
    y = torch.empty(B, H, D, dtype=q_BHD.dtype, device=q_BHD.device)
    if splits == 1:  # the split kernel writes y itself: no partials, no tickets
        out, lse, tickets = y[:, :, None], y.new_empty(0, 0, 0, dtype=torch.float32), cache_seqlens_B
    else:
        out = torch.empty(B, H, splits, D, dtype=torch.float32, device=q_BHD.device)
        lse = torch.empty(B, H, splits, dtype=torch.float32, device=q_BHD.device)
        tickets = _tickets(q_BHD.device, B, K)
    launch = {"launch_pdl": True} if pdl else {}
    _decode_split_kernel[(B, K, splits)](
        q_BHD, k_new_BKD, v_new_BKD, k_cache_BSKD, v_cache_BSKD, cache_seqlens_B, out, lse, y, tickets, ks, vs,
        q_BHD.stride(0), q_BHD.stride(1), k_new_BKD.stride(0), k_new_BKD.stride(1),
        v_new_BKD.stride(0), v_new_BKD.stride(1),
        k_cache_BSKD.stride(0), k_cache_BSKD.stride(1), k_cache_BSKD.stride(2), *sstride,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), y.stride(0), y.stride(1),
        S, D**-0.5,
        SPLITS=splits, G=G, BLOCK_G=triton.next_power_of_2(G), D=D, BLOCK=block_n, DIRECT=splits == 1, PDL=pdl, FP8=fp8,
        FLAT=flat,
        num_warps=num_warps, num_stages=num_stages, **launch,
    )  # fmt: skip
    return y
