"""Batched symmetric Gram products for Muon: out = alpha * X X^T (+ beta * C), only the upper tiles computed.

Muon's iteration (muon.py) multiplies A = X X^T and A A = A A^T (A is symmetric) every step, and both results
are symmetric. cuBLAS computes every output tile; here a program computes one tile (i, j) with j >= i of a
(BLOCK x BLOCK) grid over the (M, M) output and writes it twice, at (i, j) and transposed at (j, i). That is
T (T + 1) / 2 of the T^2 tiles (55 of 100 for M = 1280 at BLOCK 128): 2 M^2 N -> about M^2 N FLOPs for X X^T.
Both operands of the tile's product are rows of X (K contiguous in memory), so no operand is transposed in
memory; the fp32 accumulator gets the epilogue alpha * acc + beta * C (C symmetric, read at (i, j) for both
writes) and is rounded once to the output dtype, as cuBLAS's baddbmm rounds its fp32 epilogue.

Tile list: the (i, j) pairs of the upper triangle are a small int32 table built once per T, indexed by the
first grid axis; the second axis is the batch. Tiles of one row i are adjacent in the table, so programs that
run together share the rows X[i-block] in L2.

Under TRITON_INTERPRET=1 (CPU tests) the operands are cast to fp32 before tl.dot (the interpreter's bf16 dot
returns garbage, Triton 3.9; the cast is exact) and the bf16 output is rounded to nearest on the bits (its
fp32 -> bf16 cast truncates), so the result is the GPU's up to summation order.
"""

import functools

import torch
import triton
import triton.language as tl

# Measured choice for (K, 1280, 1280) and (K, 1280, 3456) bf16 on the H200: see bench/muon_bench.py
BLOCK = 128
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 3


@triton.jit
def _sym_gram_kernel(
    X, C, Out, Tiles, M, N,
    sxb, sxm, sxn, scb, scm, scn, sob, som, son,
    alpha, beta,
    HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ti = tl.load(Tiles + 2 * t)
    tj = tl.load(Tiles + 2 * t + 1)
    rm = ti * BLOCK + tl.arange(0, BLOCK)
    rn = tj * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    xm = X + b * sxb + rm[:, None] * sxm + rk[None, :] * sxn
    xn = X + b * sxb + rn[:, None] * sxm + rk[None, :] * sxn
    acc = tl.full([BLOCK, BLOCK], 0.0, tl.float32)
    for k in range(0, (N + BLOCK_K - 1) // BLOCK_K):  # not tl.cdiv, nor tl.zeros above: Triton's jitted
        # helpers fail in a module re-imported for the interpreter (tests)
        k_ok = (k * BLOCK_K + rk) < N
        a = tl.load(xm, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        c = tl.load(xn, mask=(rn[:, None] < M) & k_ok[None, :], other=0.0)
        if INTERPRETED:  # exact: a bf16 x bf16 product is exact in fp32, as on the tensor cores
            a, c = a.to(tl.float32), c.to(tl.float32)
        acc = tl.dot(a, tl.trans(c), acc)
        xm += BLOCK_K * sxn
        xn += BLOCK_K * sxn
    acc = acc * alpha
    ok = (rm[:, None] < M) & (rn[None, :] < M)
    if HAS_C:
        acc += beta * tl.load(C + b * scb + rm[:, None] * scm + rn[None, :] * scn, mask=ok, other=0.0).to(tl.float32)
    if INTERPRETED and Out.dtype.element_ty == tl.bfloat16:
        # round to nearest even on the bits, as the GPU's cvt.rn does (the interpreter's cast truncates)
        bits = acc.to(tl.int32, bitcast=True)
        acc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    out = acc.to(Out.dtype.element_ty)
    tl.store(Out + b * sob + rm[:, None] * som + rn[None, :] * son, out, mask=ok)
    if ti != tj:
        # the mirror tile: out^T at (j, i), stored along its rows
        tl.store(Out + b * sob + rn[:, None] * som + rm[None, :] * son, tl.trans(out), mask=tl.trans(ok))


@functools.cache
def _tiles(T: int, device: torch.device) -> torch.Tensor:
    """The (i, j), j >= i, pairs of a T x T tile grid, row by row, as a flat int32 tensor on `device`."""
    pairs = [(i, j) for i in range(T) for j in range(i, T)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).flatten()


def sym_gram(X_KMN: torch.Tensor, C_KMM: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.0,
             block: int | None = None, block_k: int | None = None, num_warps: int | None = None,
             num_stages: int | None = None) -> torch.Tensor:
    """alpha * X @ X^T (+ beta * C) for a batch X (K, M, N), in X's dtype; C (K, M, M) must be symmetric (its
    upper tiles are read for both halves). block, block_k, num_warps, num_stages: the launch (default: the
    module's measured constants)."""
    assert X_KMN.dim() == 3, "X: (K, M, N)"
    K, M, N = X_KMN.shape
    block, block_k = block or BLOCK, block_k or BLOCK_K
    out = torch.empty((K, M, M), dtype=X_KMN.dtype, device=X_KMN.device)
    if K == 0 or M == 0:
        return out
    if C_KMM is not None:
        assert C_KMM.shape == (K, M, M), f"C {tuple(C_KMM.shape)}: expected {(K, M, M)}"
    T = triton.cdiv(M, block)
    tiles = _tiles(T, X_KMN.device)
    c = C_KMM if C_KMM is not None else out  # not read when HAS_C is False
    interpreted = X_KMN.device.type == "cpu"
    _sym_gram_kernel[(T * (T + 1) // 2, K)](
        X_KMN, c, out, tiles, M, N, *X_KMN.stride(), *c.stride(), *out.stride(), float(alpha), float(beta),
        HAS_C=C_KMM is not None, BLOCK=block, BLOCK_K=block_k, INTERPRETED=interpreted,
        **({} if interpreted else {"num_warps": num_warps or NUM_WARPS, "num_stages": num_stages or NUM_STAGES}),
    )  # fmt: skip
    return out
