"""kernels/gram_triton.py (Muon's symmetric Gram products) against float64: on the CPU through the Triton
interpreter, and marked gpu, on CUDA against cuBLAS's bmm/baddbmm and inside a compiled Muon iteration."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def gram():
    from helpers import triton_interpreted

    with triton_interpreted("ghostvis_core.kernels.gram_triton") as (module,):
        yield module


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (K, M, N, block, block_k): M not a multiple of the tile (ragged last tiles, masked), N not one of block_k,
# a single tile (no mirror), and M > N (a tall X, rank-deficient Gram)
CASES = [(3, 40, 70, 16, 16), (2, 64, 48, 32, 16), (1, 16, 5, 16, 16), (2, 50, 20, 16, 32)]


@pytest.mark.parametrize(("K", "M", "N", "block", "block_k"), CASES, ids=str)
def test_gram_and_its_epilogue_match_float64(gram, K, M, N, block, block_k):
    g = torch.Generator().manual_seed(M * N)
    X = torch.randn(K, M, N, generator=g)
    ref = X.double() @ X.double().mT
    out = gram.sym_gram(X, block=block, block_k=block_k)
    assert out.shape == (K, M, M) and out.dtype == X.dtype
    assert torch.equal(out, out.mT)  # written twice from one tile: exactly symmetric
    assert _rel(out, ref) < 1e-6  # fp32 accumulation, fp32 out
    C = (ref / N).float()  # a symmetric addend
    out2 = gram.sym_gram(C, C, alpha=0.7, beta=-2.5, block=block, block_k=block_k)
    ref2 = 0.7 * C.double() @ C.double() - 2.5 * C.double()
    assert torch.equal(out2, out2.mT) and _rel(out2, ref2) < 1e-6


def test_bf16_rounds_once_from_fp32(gram):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2, 48, 80, generator=g).bfloat16()
    out = gram.sym_gram(X, block=16, block_k=16)
    ref = (X.double() @ X.double().mT).to(torch.bfloat16)  # exact products, one rounding
    assert out.dtype == torch.bfloat16
    # summation order differs from float64 by fp32 rounding only: at most one bf16 ulp apart, mostly equal
    assert (out.float() - ref.float()).abs().le(ref.float().abs() * 2**-7 + 1e-6).all()
    assert (out == ref).float().mean() > 0.95


def test_strided_input_and_an_empty_batch(gram):
    X = torch.randn(2, 24, 40)
    Xt = X.mT.contiguous().mT  # same values, N-major strides
    torch.testing.assert_close(gram.sym_gram(Xt, block=16, block_k=16), X @ X.mT, rtol=1e-5, atol=1e-5)
    assert gram.sym_gram(torch.randn(0, 8, 8), block=16, block_k=16).shape == (0, 8, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 1280, 1280), (4, 1280, 3456), (3, 200, 300)], ids=str)
def test_gram_on_cuda_matches_cublas(shape):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ghostvis_core.kernels.gram_triton import sym_gram

    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(*shape, device="cuda", generator=g).bfloat16()
    A = sym_gram(X)
    ref = torch.bmm(X, X.mT)
    print(f"{shape}: X X^T vs bmm rel {_rel(A, ref):.2e}")
    assert torch.equal(A, A.mT) and _rel(A, ref) < 4e-3
    A = A / A.norm(dim=(-2, -1), keepdim=True)
    B = sym_gram(A, A, alpha=2.0, beta=-1.5)
    ref = torch.baddbmm(A, A, A, beta=-1.5, alpha=2.0)
    print(f"{shape}: 2 A A^T - 1.5 A vs baddbmm rel {_rel(B, ref):.2e}")
    assert torch.equal(B, B.mT) and _rel(B, ref) < 4e-3


@pytest.mark.gpu
def test_compiled_symmetric_muon_matches_baddbmm_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ghostvis_core.muon import POLAR_EXPRESS, POLAR_EXPRESS_SAFETY, orthogonalize

    X = torch.randn(6, 384, 1024, device="cuda").bfloat16()
    outs = {form: torch.compile(lambda X, form=form: orthogonalize(X, POLAR_EXPRESS, POLAR_EXPRESS_SAFETY,
                                                                 form=form), fullgraph=True, dynamic=False)(X)
            for form in ("baddbmm", "symmetric")}
    ref = orthogonalize(X.double(), POLAR_EXPRESS, POLAR_EXPRESS_SAFETY)
    errs = {form: _rel(out, ref) for form, out in outs.items()}
    print(f"vs float64: {errs}")
    assert errs["symmetric"] < 1.25 * errs["baddbmm"] + 5e-3 and errs["symmetric"] < 5e-2
