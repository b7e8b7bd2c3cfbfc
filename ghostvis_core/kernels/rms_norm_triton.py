"""Fused RMSNorm in Triton: forward and backward kernels -> `RMSNormFunction` -> `rms_norm_triton`.

Semantics are Llama / Hugging Face `LlamaRMSNorm`, computed in fp32:

    rstd = 1 / sqrt(mean(x_f32 ** 2) + eps)             per row, fp32
    n    = x_f32 * rstd                                   fp32
    n_r  = n.to(x.dtype)                                  <- the one rounding point before the weight
    y    = (w_f32 * n_r_f32).to(out_dtype)               out_dtype = promote(x.dtype, w.dtype), as in HF

So with bf16 x and bf16 w the output is rounded twice (after the normalisation, then after the weight), exactly
as `weight * hidden_states.to(input_dtype)` does in HF. `F.rms_norm` rounds once (x * rstd * w in fp32), so
the two differ by at most one unit in the last place of the output dtype.

Shapes: any leading shape is flattened to rows `x_MH` (M rows, H hidden); H may be any size up to
65536 / element bytes (one row lives in registers; columns past H are masked).
"""

import torch
import triton
import triton.language as tl

from ghostvis_core.errors import BackendUnavailableError

# One row must fit in one program's registers: 64 KiB of input per row (the Triton layer-norm tutorial's limit).
MAX_FUSED_BYTES = 65536


@triton.jit
def _row_sum(x, axis: tl.constexpr):
    # tl.sum with the library's own add combiner. tl.sum is itself a @triton.jit function, which Triton fixes as
    # compiled or interpreted when it is first imported; calling tl.reduce directly keeps these kernels runnable
    # under TRITON_INTERPRET=1 (CPU tests) even when Triton was imported before the variable was set, and the
    # interpreter recognises this combiner and reduces with numpy. On the GPU it compiles to the same code.
    return tl.reduce(x, axis, tl.standard._sum_combine)


# Forward, one row per program:
#   rstd = rsqrt(sum(x^2) / H + eps);  y = w * round(x * rstd)
# rstd (fp32, one per row) is stored so the backward pass skips the reduction over x^2.
@triton.jit
def rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_cols,
    eps,
    HAS_WEIGHT: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 on large batches
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(_row_sum(x * x, 0) / n_cols + eps)
    n_r = (x * rstd).to(X.dtype.element_ty)  # the Llama rounding point
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = n_r.to(tl.float32) * w
    else:
        y = n_r
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(RSTD + row, rstd)


@triton.jit
def _load_bwd_tile(X, DY, RSTD, r0, row_end, stride_x, stride_dy, cols, col_mask, ROWS: tl.constexpr):
    # Rows r0 .. r0 + ROWS of x and dy (storage dtype) and their rstd; rows at or past row_end read as 0.
    rows = r0 + tl.arange(0, ROWS)
    row_mask = rows < row_end
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    return x, dy, rstd


# Backward, persistent: program p owns rows [p * rows_per_program, (p + 1) * rows_per_program) and walks them
# ROWS_PER_ITER at a time. With n = x * rstd and dn = dy * w (dy alone when there is no weight):
#   dx = rstd * (dn - n * mean(dn * n))          (d/dx of x * rstd, rstd depending on x through mean(x^2))
#   dw = sum over rows of dy * n_r               (n_r is what the forward multiplied w by)
# Each program keeps its dw partial sum in fp32 registers and writes one row of DW_PARTIAL (num_programs, H);
# the host reduces it with .sum(0). No atomics, so dw is bitwise reproducible run to run.
@triton.jit
def rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    ROWS_PER_ITER: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    # Software pipelining by hand: the next tile's loads are issued before this tile's reductions, so the
    # memory system stays busy while the program computes (one H200, fwd+bwd 16384x4096 bf16 with 2 programs
    # per SM, 1 row, 8 warps: 78.5% of copy bandwidth without the prefetch, 85.6% with it).
    x_next, dy_next, rstd_next = _load_bwd_tile(
        X, DY, RSTD, row_start, row_end, stride_x, stride_dy, cols, col_mask, ROWS_PER_ITER
    )
    for r0 in range(row_start, row_end, ROWS_PER_ITER):
        x_s, dy_s, rstd = x_next, dy_next, rstd_next
        x_next, dy_next, rstd_next = _load_bwd_tile(
            X, DY, RSTD, r0 + ROWS_PER_ITER, row_end, stride_x, stride_dy, cols, col_mask, ROWS_PER_ITER
        )
        rows = r0 + tl.arange(0, ROWS_PER_ITER)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x = x_s.to(tl.float32)
        dy = dy_s.to(tl.float32)
        n = x * rstd[:, None]
        if HAS_WEIGHT:
            dn = dy * w[None, :]
            dw_acc += _row_sum(dy * n.to(X.dtype.element_ty).to(tl.float32), 0)
        else:
            dn = dy
        c = _row_sum(dn * n, 1) / n_cols
        dx = (dn - n * c[:, None]) * rstd[:, None]
        dx_ptrs = DX + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :]
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_mask)


def _fwd_num_warps(block_n: int) -> int:
    """Warps per row program: enough threads for 16-byte loads without spilling a long row."""
    if block_n <= 1024:
        return 4
    if block_n <= 4096:
        return 8
    return 16


# Backward launch configs by row block: (programs per SM, rows per loop iteration, num_warps), each the best
# of a sweep on one H200 (bf16, fwd+bwd % of copy bandwidth: 1024 -> 74%, 1280 in a 2048 block -> 60%,
# 4096 -> 86%, 8192 -> 87%). More than one program per SM keeps more rows in flight; the dw partial buffer
# grows with the grid ((programs, H) fp32: 2 MiB per program-per-SM at H=4096 on 132 SMs).
BWD_CONFIGS = {1024: (2, 4, 4), 2048: (2, 2, 8), 4096: (2, 1, 8), 8192: (1, 1, 16)}
BWD_CONFIG_WIDE = (1, 1, 16)


def _bwd_config(block_n: int) -> tuple[int, int, int]:
    """(programs per SM, rows per loop iteration, num_warps) for the backward of one row width."""
    for limit in sorted(BWD_CONFIGS):
        if block_n <= limit:
            return BWD_CONFIGS[limit]
    return BWD_CONFIG_WIDE


def _num_sms(device: torch.device) -> int:
    """SM count on CUDA; a few on the CPU interpreter (so tests still cover several programs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _check_hidden(n_cols: int, dtype: torch.dtype) -> int:
    block_n = triton.next_power_of_2(n_cols)
    limit = MAX_FUSED_BYTES // torch.empty((), dtype=dtype).element_size()
    if block_n > limit:
        raise BackendUnavailableError(
            f"Triton RMSNorm keeps one row in registers: hidden size {n_cols} ({dtype}) is over {limit}; "
            "use norm backend 'torch' (--norm torch / GPTConfig.norm_backend='torch') for this width."
        )
    return block_n


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, w and the per-row fp32 rstd; backward recomputes n = x * rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        shape = x.shape
        n_cols = shape[-1]
        x_MH = x.reshape(-1, n_cols)
        if x_MH.stride(-1) != 1:
            x_MH = x_MH.contiguous()
        n_rows = x_MH.shape[0]
        block_n = _check_hidden(n_cols, x.dtype)
        has_weight = weight is not None
        if has_weight:
            assert weight.shape == (n_cols,), f"weight shape {tuple(weight.shape)} != ({n_cols},)"
            weight = weight.contiguous()
            out_dtype = torch.promote_types(x.dtype, weight.dtype)
        else:
            out_dtype = x.dtype
        y_MH = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd_M = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
        if n_rows > 0:
            rms_norm_fwd_kernel[(n_rows,)](
                x_MH,
                weight if has_weight else x_MH,  # unused pointer when there is no weight
                y_MH,
                rstd_M,
                x_MH.stride(0),
                y_MH.stride(0),
                n_cols,
                eps,
                HAS_WEIGHT=has_weight,
                STORE_RSTD=True,
                BLOCK_N=block_n,
                num_warps=_fwd_num_warps(block_n),
            )
        ctx.save_for_backward(x_MH, weight if has_weight else None, rstd_M)
        ctx.has_weight = has_weight
        ctx.block_n = block_n
        ctx.x_shape = shape
        return y_MH.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_MH, weight, rstd_M = ctx.saved_tensors
        n_rows, n_cols = x_MH.shape
        dy_MH = dy.reshape(-1, n_cols)
        if dy_MH.stride(-1) != 1:
            dy_MH = dy_MH.contiguous()
        dx_MH = torch.empty_like(x_MH)
        programs_per_sm, rows_per_iter, num_warps = _bwd_config(ctx.block_n)
        num_programs = max(1, min(n_rows, programs_per_sm * _num_sms(x_MH.device)))
        rows_per_program = triton.cdiv(n_rows, num_programs) if n_rows > 0 else 0
        dw_partial = None
        if ctx.has_weight:
            dw_partial = torch.empty((num_programs, n_cols), dtype=torch.float32, device=x_MH.device)
        if n_rows > 0:
            rms_norm_bwd_kernel[(num_programs,)](
                dy_MH,
                x_MH,
                weight if ctx.has_weight else x_MH,
                rstd_M,
                dx_MH,
                dw_partial if ctx.has_weight else rstd_M,
                dy_MH.stride(0),
                x_MH.stride(0),
                dx_MH.stride(0),
                n_rows,
                n_cols,
                rows_per_program,
                HAS_WEIGHT=ctx.has_weight,
                ROWS_PER_ITER=rows_per_iter,
                BLOCK_N=ctx.block_n,
                num_warps=num_warps,
            )
        dw = None
        if ctx.has_weight:
            # Fixed-order fp32 reduction over the per-program partials: deterministic.
            dw = dw_partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
        return dx_MH.view(ctx.x_shape), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Llama-semantics RMSNorm over the last dim with the fused Triton kernels (autograd-aware)."""
    return RMSNormFunction.apply(x, weight, eps)
