"""Fused SwiGLU in Triton: forward and backward kernels -> `SwiGLUFunction` -> `swiglu_triton`.

    out = silu(gate) * up,   silu(a) = a * sigmoid(a)

computed in fp32 per element with the same rounding point as eager PyTorch's `F.silu(gate) * up`:
silu is rounded to the input dtype before the multiply (F.silu returns the input dtype), then the product is
rounded again. Only gate and up are saved; backward recomputes sigmoid, so no activation is stored.

Layout: gate and up may be row-strided views (the two halves of a fused gate/up projection, `x.chunk(2, -1)`);
their last dim must be contiguous. Fully contiguous inputs run as one flat 1-D range.
"""

import torch
import triton
import triton.language as tl


# Forward: c = round(silu(a)) * b, with silu(a) = a * sigmoid(a) in fp32.
# Program pid covers BLOCK columns of one row: row = pid // blocks_per_row, block = pid % blocks_per_row.
@triton.jit
def swiglu_fwd_kernel(
    A,
    B,
    C,
    stride_a,
    stride_b,
    n_cols,
    blocks_per_row,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    silu_r = (a / (1.0 + tl.exp(-a))).to(C.dtype.element_ty).to(tl.float32)
    tl.store(C + row * n_cols + cols, (silu_r * b).to(C.dtype.element_ty), mask=mask)


# Backward, with s = sigmoid(a):
#   d/da silu(a) = s + a * s * (1 - s) = s * (1 + a * (1 - s))
#   da = dc * b * s * (1 + a * (1 - s))
#   db = dc * round(silu(a))          (the rounded value the forward multiplied b by)
# da and db go to fresh contiguous buffers: gate and up may be saved views of a tensor autograd still needs.
@triton.jit
def swiglu_bwd_kernel(
    DC,
    A,
    B,
    DA,
    DB,
    stride_a,
    stride_b,
    n_cols,
    blocks_per_row,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(DC + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # tl.sigmoid's formula written out (see rms_norm_triton._row_sum); silu as a / denom, bit-identical to
    # the forward's value.
    denom = 1.0 + tl.exp(-a)
    s = 1.0 / denom
    silu_r = (a / denom).to(DB.dtype.element_ty).to(tl.float32)
    da = dc * b * s * (1.0 + a * (1.0 - s))
    db = dc * silu_r
    tl.store(DA + row * n_cols + cols, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * n_cols + cols, db.to(DB.dtype.element_ty), mask=mask)


# Elements per program and warps: 16 elements per thread is two 16-byte bf16 loads per input per thread.
BLOCK = 4096
NUM_WARPS = 8


def _as_rows(t: torch.Tensor, flat: bool) -> torch.Tensor:
    """View as (rows, cols) with a contiguous last dim; one row of numel elements when `flat`."""
    if flat:
        return t.view(1, -1)
    t_MN = t.reshape(-1, t.shape[-1])  # a view for chunk()/narrow() halves; copies only if it must
    return t_MN if t_MN.stride(-1) == 1 else t_MN.contiguous()


def _launch_geometry(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(grid size, blocks per row, BLOCK) for a (rows, cols) problem."""
    block = min(BLOCK, triton.next_power_of_2(max(n_cols, 1)))
    blocks_per_row = triton.cdiv(n_cols, block)
    return n_rows * blocks_per_row, blocks_per_row, block


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up only; backward recomputes sigmoid(gate)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(
                f"swiglu needs gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                f"and {tuple(up.shape)} {up.dtype}"
            )
        flat = gate.is_contiguous() and up.is_contiguous()
        a_MN, b_MN = _as_rows(gate, flat), _as_rows(up, flat)
        n_rows, n_cols = a_MN.shape
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        grid, blocks_per_row, block = _launch_geometry(n_rows, n_cols)
        if grid > 0:
            swiglu_fwd_kernel[(grid,)](
                a_MN, b_MN, out, a_MN.stride(0), b_MN.stride(0), n_cols, blocks_per_row,
                BLOCK=block, num_warps=NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(gate, up)
        ctx.flat = flat
        return out

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        gate, up = ctx.saved_tensors
        a_MN, b_MN = _as_rows(gate, ctx.flat), _as_rows(up, ctx.flat)
        n_rows, n_cols = a_MN.shape
        dc = dc.contiguous()
        da = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        db = torch.empty(up.shape, dtype=up.dtype, device=up.device)
        grid, blocks_per_row, block = _launch_geometry(n_rows, n_cols)
        if grid > 0:
            swiglu_bwd_kernel[(grid,)](
                dc, a_MN, b_MN, da, db, a_MN.stride(0), b_MN.stride(0), n_cols, blocks_per_row,
                BLOCK=block, num_warps=NUM_WARPS,
            )  # fmt: skip
        return da, db


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with the fused Triton kernels (autograd-aware, no saved activation)."""
    return SwiGLUFunction.apply(gate, up)
