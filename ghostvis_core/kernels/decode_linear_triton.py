"""Small-batch decode projections as Triton GEMVs, each fused with its neighbours in a decoder layer.

At batch 1 every projection of a decode step is a GEMV: each weight is read once for one row of activations,
and the compiled step runs about 11 kernels per d20 layer. Here a layer is five kernels:

    qkv = rope(rmsnorm(x) @ W_qkv^T)                         RMSNorm in the prologue, RoPE on the q, k rows
    y   = decode attention                                    (decode_attention_triton: stores k, v)
    x1  = x + y @ W_o^T                                       residual add in the epilogue
    h   = silu(n @ W_gate^T) * (n @ W_up^T), n = rmsnorm(x1)  matching gate and up rows in one program
    x2  = x1 + h @ W_down^T

and the head is one more: logits = rmsnorm(x) @ W_head^T.

Measured on an H100 (d20, bf16, docs/BENCHMARKS.md, 2026-12-07), the fused step ties the compiled PyTorch
layers at batch 1 (0.760 against 0.759 ms) and loses above it (2.902 against 1.013 ms at batch 8): half the
kernels, but each moves its bytes more slowly than cuBLAS's GEMV. So the plan runs it only when asked
(decode_layers.py).

A program owns BLOCK_N output rows (two such sets for RoPE and SwiGLU) of one batch row m and reads its weight
rows in BLOCK_K-wide chunks, accumulating in fp32. Grid (M, row blocks), m fastest: the M programs of one block
of weight rows run side by side, so that the weight comes from DRAM once and from L2 for the other batch rows;
even so the step grows with M (above), as each program still reads its rows from L2 once per batch row.

Weight prefetch under programmatic dependent launch (PDL, Hopper and later): a program's weight rows do not
depend on the kernel before it, only x does. So it first asks L2 for its rows (cp.async.bulk.prefetch.L2, one
instruction per row), lets the next kernel launch, and only then waits (griddepcontrol.wait) for the previous
kernel's output: the weight stream of each projection overlaps the kernels before it. A projection of d20 is
3.3-17.7 MB, well inside the H200's 60 MB L2.

Rounding (inputs in the activation dtype, fp32 inside): the norm is HF's, w * round(x * rstd) rounded again;
each product is rounded to the activation dtype before its epilogue, as the unfused layer rounds F.linear's
output; the epilogue runs in fp32 and rounds once (so the residual is exactly the bf16 add round(x + y)).
RoPE takes cos and sin rounded to the activation dtype, as gpt.apply_rope casts them.

RoPE rows (rotate-half): the fused q|k|v weight holds heads of D rows; row h*D + j pairs with h*D + j + D/2.
A RoPE program holds BLOCK_N rows j0 .. j0 + BLOCK_N of each half of one head and rotates the pairs; the heads
from ROT_ROWS on (v) are written as they are.
"""

import functools

import torch
import triton
import triton.language as tl

PLAIN, RESIDUAL, SWIGLU, ROPE = 0, 1, 2, 3
EPILOGUES = {"plain": PLAIN, "residual": RESIDUAL, "swiglu": SWIGLU, "rope": ROPE}


@triton.jit
def _sum(x, axis: tl.constexpr):
    # tl.reduce with the library's combiner, not tl.sum: runnable under TRITON_INTERPRET=1 (as
    # decode_attention_triton._sum)
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _to(y, dt: tl.constexpr):
    """fp32 y rounded to dt, to nearest even. For bf16 the rounding is done on the bits first (exact then),
    because the Triton CPU interpreter's fp32 -> bf16 cast truncates: the CPU tests would otherwise check a
    different rounding from the one the GPU's cvt.rn does."""
    if dt == tl.bfloat16:
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dt)


@triton.jit
def _prefetch_rows_l2(ptrs, nbytes):
    """Ask L2 for nbytes from each pointer (Hopper's bulk prefetch; fire and forget, nothing is returned)."""
    tl.inline_asm_elementwise(
        "mov.u32 $0, 0; cp.async.bulk.prefetch.L2.global [$1], $2;",
        "=r,l,r", [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _decode_linear_kernel(
    X, W, OUT, RES, NW, COS, SIN,
    N, K, UP_OFFSET, ROT_ROWS, eps,
    stride_xm, stride_wn, stride_om, stride_rm, stride_cm,
    NORM: tl.constexpr, EPILOGUE: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_N)
    TWO: tl.constexpr = EPILOGUE == 2 or EPILOGUE == 3
    if EPILOGUE == 3:  # rows j of both halves of one head
        per_head = HALF // BLOCK_N
        head = pid // per_head
        rows_a = head * (2 * HALF) + (pid % per_head) * BLOCK_N + lanes
        rows_b = rows_a + HALF
        ok = rows_a < N
    elif EPILOGUE == 2:  # gate rows, and the up rows UP_OFFSET below them
        rows_a = pid * BLOCK_N + lanes
        rows_b = rows_a + UP_OFFSET
        ok = rows_a < UP_OFFSET
    else:
        rows_a = pid * BLOCK_N + lanes
        rows_b = rows_a
        ok = rows_a < N
    w_a = W + rows_a.to(tl.int64) * stride_wn
    w_b = W + rows_b.to(tl.int64) * stride_wn
    if PREFETCH:
        if m == 0:  # one batch row asks; the others find the rows in L2
            nbytes = tl.full([BLOCK_N], 0, tl.int32) + K * W.dtype.element_ty.primitive_bitwidth // 8
            _prefetch_rows_l2(tl.where(ok, w_a, W), nbytes)
            if TWO:
                _prefetch_rows_l2(tl.where(ok, w_b, W), nbytes)
    if PDL:  # the next kernel may launch (and prefetch) now; x is the previous kernel's output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

    x_row = X + m * stride_xm
    rstd = 1.0
    if NORM:  # rstd = 1 / sqrt(mean(x^2) + eps), fp32
        sq = tl.full([BLOCK_K], 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            sq += xv * xv
        rstd = 1.0 / tl.sqrt(_sum(sq, 0) / K + eps)
    acc_a = tl.full([BLOCK_N, BLOCK_K], 0.0, tl.float32)
    acc_b = tl.full([BLOCK_N, BLOCK_K], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        kmask = cols < K
        xv = tl.load(x_row + cols, mask=kmask, other=0.0)
        if NORM:  # HF: weight * round(x * rstd), rounded again (bf16 * bf16)
            nw = tl.load(NW + cols, mask=kmask, other=0.0).to(tl.float32)
            xv = _to(_to(xv.to(tl.float32) * rstd, xv.dtype).to(tl.float32) * nw, xv.dtype)
        xf = xv.to(tl.float32)[None, :]
        wmask = ok[:, None] & kmask[None, :]
        acc_a += tl.load(w_a[:, None] + cols[None, :], mask=wmask, other=0.0).to(tl.float32) * xf
        if TWO:
            acc_b += tl.load(w_b[:, None] + cols[None, :], mask=wmask, other=0.0).to(tl.float32) * xf

    dt = OUT.dtype.element_ty
    y_a = _to(_sum(acc_a, 1), dt).to(tl.float32)  # each product rounded, as F.linear's output
    out_row = OUT + m * stride_om
    if EPILOGUE == 3:
        y_b = _to(_sum(acc_b, 1), dt).to(tl.float32)
        j = (pid % per_head) * BLOCK_N + lanes
        cos = _to(tl.load(COS + m * stride_cm + j), dt).to(tl.float32)
        sin = _to(tl.load(SIN + m * stride_cm + j), dt).to(tl.float32)
        rotate = head * (2 * HALF) < ROT_ROWS
        o_a = tl.where(rotate, y_a * cos - y_b * sin, y_a)
        o_b = tl.where(rotate, y_b * cos + y_a * sin, y_b)
        tl.store(out_row + rows_a, _to(o_a, dt), mask=ok)
        tl.store(out_row + rows_b, _to(o_b, dt), mask=ok)
    elif EPILOGUE == 2:
        y_b = _to(_sum(acc_b, 1), dt).to(tl.float32)
        h = y_a / (1.0 + tl.exp(-y_a)) * y_b  # silu(gate) * up
        tl.store(out_row + rows_a, _to(h, dt), mask=ok)
    elif EPILOGUE == 1:
        r = tl.load(RES + m * stride_rm + rows_a, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_row + rows_a, _to(r + y_a, dt), mask=ok)
    else:
        tl.store(out_row + rows_a, _to(y_a, dt), mask=ok)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


CONFIG_OVERRIDES: dict[tuple[str, int, int], tuple[int, int, int]] = {}
"""(epilogue, n_out, k) -> (BLOCK_N, BLOCK_K, num_warps) in place of default_config: for a benchmark's sweep."""


def default_config(n_out: int, k: int, epilogue: str) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an (n_out, k) projection with `epilogue` (measured: `python -m
    ghostvis_core.bench.decode_step --sweep-fused`, docs/BENCHMARKS.md)."""
    if (epilogue, n_out, k) in CONFIG_OVERRIDES:
        return CONFIG_OVERRIDES[epilogue, n_out, k]
    # d20 at batch 1 on an H100 (sweep of 2026-12-05): fewer warps and longer K chunks keep more of each
    # program's bytes in flight; two-row-set epilogues (rope, swiglu) hold two accumulators, so half the rows
    if epilogue in ("rope", "swiglu"):
        return 2, min(512, triton.next_power_of_2(k)), 2
    if epilogue == "residual":
        return 4, min(1024, triton.next_power_of_2(k)), 2
    return 8, min(512, triton.next_power_of_2(k)), 4


def decode_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, *, epilogue: str = "plain",
                  norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual_MN: torch.Tensor | None = None,
                  cos_MH: torch.Tensor | None = None, sin_MH: torch.Tensor | None = None, rot_rows: int = 0,
                  head_dim: int = 0, pdl: bool = False, prefetch: bool | None = None,
                  config: tuple[int, int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """x @ w.T for a few rows (M small), with the module docstring's prologue and epilogue; (M, N_out).

    norm_weight: RMSNorm x first (weight, eps). epilogue plain; residual (+ residual_MN); swiglu (w holds gate
    rows then up rows, out = silu(gate) * up, N_out = N / 2); rope (w holds heads of head_dim rows, the first
    rot_rows rows are rotated by cos_MH, sin_MH (M, head_dim / 2) of each row's position).
    pdl: launch with programmatic dependent launch (Hopper+); prefetch: the L2 weight prefetch before the wait
    (None: with pdl, when the rows are 16-byte aligned). config: (BLOCK_N, BLOCK_K, num_warps), None: default_config.
    """
    M, K = x_MK.shape
    N = w_NK.shape[0]
    code = EPILOGUES[epilogue]
    assert w_NK.shape[1] == K and w_NK.stride(1) == 1 and x_MK.stride(1) == 1, (x_MK.shape, w_NK.shape)
    n_out = N // 2 if code == SWIGLU else N
    block_n, block_k, num_warps = config or default_config(n_out, K, epilogue)
    out = torch.empty(M, n_out, dtype=x_MK.dtype, device=x_MK.device)
    if code == ROPE:
        half = head_dim // 2
        assert N % head_dim == 0 and half % block_n == 0 and cos_MH.shape == (M, half) == sin_MH.shape
        assert cos_MH.stride() == sin_MH.stride() and cos_MH.stride(1) == 1
        blocks = N // 2 // block_n
    else:
        half, blocks = 1, triton.cdiv(n_out, block_n)
    if code == RESIDUAL:
        assert residual_MN.shape == (M, N) and residual_MN.stride(1) == 1
    row_bytes = K * w_NK.element_size()
    if prefetch is None:
        prefetch = pdl and row_bytes % 16 == 0 and w_NK.stride(0) * w_NK.element_size() % 16 == 0
    if prefetch:
        assert x_MK.is_cuda and _capability(x_MK.device.index or 0)[0] >= 9, "the bulk L2 prefetch is sm90+"
        assert w_NK.data_ptr() % 16 == 0 and row_bytes % 16 == 0, "16-byte aligned weight rows"
    nw = norm_weight if norm_weight is not None else x_MK  # unused pointers: NORM / EPILOGUE are constexprs
    res = residual_MN if residual_MN is not None else out
    cos = cos_MH if cos_MH is not None else x_MK
    sin = sin_MH if sin_MH is not None else x_MK
    launch = {"launch_pdl": True} if pdl else {}
    _decode_linear_kernel[(M, blocks)](
        x_MK, w_NK, out, res, nw, cos, sin,
        N, K, N // 2, rot_rows, eps,
        x_MK.stride(0), w_NK.stride(0), out.stride(0), res.stride(0), cos.stride(0),
        NORM=norm_weight is not None, EPILOGUE=code, HALF=half,
        BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=bool(prefetch), PDL=pdl,
        num_warps=num_warps, **launch,
    )  # fmt: skip
    return out
