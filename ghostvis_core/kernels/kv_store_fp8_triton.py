"""Quantize a prefill's new K/V to float8 e4m3 and store them in an fp8 KV cache, in one Triton kernel.

For each query row b, new token t and KV head k (kv_cache.py, "fp8"):

    slot     = min(start_b + t, S - 1)                       (as attention.attention_with_kvcache clamps)
    scale    = max(amax_D |x|, FP8_MIN_AMAX) / FP8_MAX        (round-to-nearest division)
    cache[row_b, slot, k] = e4m3(clamp(x / scale, +-FP8_MAX)),  scales[row_b, slot, k] = scale

for x = k_new and x = v_new: the operations of kv_cache.quantize_fp8 and of the decode kernel's own store
(decode_attention_triton._quantize), so a token stored here and one stored by a decode step are stored alike.

Why a kernel: written in PyTorch, the same store is a chain of fp32 elementwise kernels (cast, abs, amax, divide,
clamp, cast) and four indexed scatters per layer, each reading or writing the whole (B, T, K, D) tensor in fp32.
Here each program loads a (BLOCK_T, D) tile of one KV head once and writes its bytes and scales once.

Layouts: k_new, v_new (B, T, K, D) with unit stride on D; caches (R, S, K, D) e4m3 and scales (R, S, K) fp32 with
the caches' strides shared by K and V; rows, starts int32/int64 (B,). D a power of two.
"""

import torch
import triton
import triton.language as tl

from ghostvis_core.kernels.decode_attention_triton import FP8_MAX, FP8_MIN_AMAX, _max, _round_e4m3

BLOCK_T = 16  # new tokens per program
NUM_WARPS = 4


@triton.jit
def _store_one(X, C, SC, b, t, t_ok, slot, c_row, s_row, d, stride_xb, stride_xt, stride_xh, kh,
               stride_cs, stride_ch, stride_ss, stride_sh):  # fmt: skip
    x = tl.load(X + b * stride_xb + t[:, None] * stride_xt + kh * stride_xh + d[None, :], mask=t_ok[:, None],
                other=0.0).to(tl.float32)  # fmt: skip
    amax = tl.maximum(_max(tl.abs(x), 1), FP8_MIN_AMAX)  # (BLOCK_T,)
    scale = tl.div_rn(amax, FP8_MAX)
    y = tl.minimum(tl.maximum(tl.div_rn(x, scale[:, None]), -FP8_MAX), FP8_MAX)
    x8 = _round_e4m3(y).to(tl.float8e4nv)
    tl.store(C + c_row + slot[:, None] * stride_cs + kh * stride_ch + d[None, :], x8, mask=t_ok[:, None])
    tl.store(SC + s_row + slot * stride_ss + kh * stride_sh, scale, mask=t_ok)


@triton.jit
def _kv_store_fp8_kernel(
    KN, VN, KC, VC, KS, VS, ROWS, STARTS,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
    T, S, D: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    kh = tl.program_id(2).to(tl.int64)
    t_ok = t < T
    d = tl.arange(0, D)
    row = tl.load(ROWS + b).to(tl.int64)
    slot = tl.minimum(tl.load(STARTS + b).to(tl.int64) + t, S - 1)
    c_row, s_row = row * stride_cb, row * stride_sb
    _store_one(KN, KC, KS, b, t, t_ok, slot, c_row, s_row, d, stride_kb, stride_kt, stride_kh, kh,
               stride_cs, stride_ch, stride_ss, stride_sh)  # fmt: skip
    _store_one(VN, VC, VS, b, t, t_ok, slot, c_row, s_row, d, stride_vb, stride_vt, stride_vh, kh,
               stride_cs, stride_ch, stride_ss, stride_sh)  # fmt: skip


def kv_store_fp8_triton(k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, k_cache_RSKD: torch.Tensor,
                        v_cache_RSKD: torch.Tensor, k_scale_RSK: torch.Tensor, v_scale_RSK: torch.Tensor,
                        rows_B: torch.Tensor, starts_B: torch.Tensor) -> None:  # fmt: skip
    """Store quantized k/v of query row b at cache row rows_B[b], slots [starts_B[b], starts_B[b] + T) clamped
    to S - 1 (module docstring), in place."""
    B, T, K, D = k_BTKD.shape
    S = k_cache_RSKD.shape[1]
    assert D & (D - 1) == 0 and k_BTKD.stride(-1) == v_BTKD.stride(-1) == 1, (D, k_BTKD.stride(), v_BTKD.stride())
    assert k_cache_RSKD.dtype == v_cache_RSKD.dtype == torch.float8_e4m3fn and k_cache_RSKD.stride(-1) == 1
    assert v_cache_RSKD.stride() == k_cache_RSKD.stride() and v_scale_RSK.stride() == k_scale_RSK.stride()
    if B * T == 0:
        return
    _kv_store_fp8_kernel[(B, triton.cdiv(T, BLOCK_T), K)](
        k_BTKD, v_BTKD, k_cache_RSKD, v_cache_RSKD, k_scale_RSK, v_scale_RSK, rows_B, starts_B,
        k_BTKD.stride(0), k_BTKD.stride(1), k_BTKD.stride(2), v_BTKD.stride(0), v_BTKD.stride(1), v_BTKD.stride(2),
        k_cache_RSKD.stride(0), k_cache_RSKD.stride(1), k_cache_RSKD.stride(2),
        k_scale_RSK.stride(0), k_scale_RSK.stride(1), k_scale_RSK.stride(2),
        T, S, D=D, BLOCK_T=BLOCK_T, num_warps=NUM_WARPS,
    )  # fmt: skip
