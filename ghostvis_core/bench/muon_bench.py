"""Time Muon's orthogonalisation per spelling of its products (muon.ORTHOGONALIZE_FORMS) on a preset's buckets.

    python -m ghostvis_core.bench.muon_bench [--preset d20] [--forms baddbmm pointwise symmetric] [--json]
    python -m ghostvis_core.bench.muon_bench --gram-sweep     (kernels/gram_triton.py's launch configs)

The buckets are the preset's Muon matrices grouped by shape, as BatchedMuon groups them (d20: 80 of 1280x1280,
40 of 3456x1280, 20 of 1280x3456). Each form runs the Polar Express table in the iteration dtype (bf16 on CUDA),
compiled as the trainer compiles it (fullgraph, static shapes), on random momentum-like stacks; the GPU time per
bucket is the median of CUDA-event timings (bench.timing). Each form's error is measured on one matrix per
bucket with a known spectrum (1e-3 .. 1 of the largest singular value): the relative Frobenius distance to the
same iteration in float64, and the singular values of the bf16 result.

--gram-sweep times the symmetric form's two products per bucket, X X^T and c A A^T + b A, for each launch
config of kernels/gram_triton.sym_gram in GRAM_CONFIGS against cuBLAS (bmm, baddbmm) on the same tensors.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ghostvis_core.bench.timing import cuda_median_ms, require_cuda
from ghostvis_core.muon import (
    ORTHOGONALIZE_FORMS,
    POLAR_EXPRESS,
    POLAR_EXPRESS_SAFETY,
    orthogonalize,
    update_dtype,
)


def bucket_shapes(preset: str) -> list[tuple[int, int, int]]:
    """(K, M, N) per shape of the preset's Muon matrices, largest bucket first."""
    from ghostvis_core.engine import inference_plan
    from ghostvis_core.gpt import GPT
    from ghostvis_core.model_configs import get_preset
    from ghostvis_core.optim import split_params

    config = get_preset(preset)
    with torch.device("meta"):
        model = GPT(config, inference_plan(config, "cpu", "float32", False))
    counts: dict[tuple[int, int], int] = {}
    for p in split_params(model)["matrix"]:
        counts[tuple(p.shape)] = counts.get(tuple(p.shape), 0) + 1
    return sorted(((k, *shape) for shape, k in counts.items()), reverse=True)


def known_spectrum(M: int, N: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """One (M, N) float64 matrix with singular values logspaced over 1e-3 .. 1."""
    g = torch.Generator().manual_seed(seed)
    k = min(M, N)
    U = torch.linalg.qr(torch.randn(M, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(N, k, generator=g, dtype=torch.float64)).Q
    return ((U * torch.logspace(-3, 0, k, dtype=torch.float64)) @ V.T).to(device)


def form_error(form: str, M: int, N: int, device: torch.device, fn) -> dict:
    """Relative distance of the form's result to float64 on a known spectrum, and its singular value range."""
    G = known_spectrum(M, N, device)[None]
    ref = orthogonalize(G, POLAR_EXPRESS, POLAR_EXPRESS_SAFETY)
    ours = fn(G.to(update_dtype(device))).double()
    rel = ((ours - ref).norm() / ref.norm()).item()
    sv = torch.linalg.svdvals(ours[0].cpu())
    return {"rel_error_vs_float64": rel, "sv_min": sv.min().item(), "sv_max": sv.max().item()}


def run(preset: str, forms: list[str]) -> dict:
    """Per form and bucket: GPU ms (compiled) and the error against float64."""
    device = require_cuda("muon_bench")
    dtype = update_dtype(device)
    shapes = bucket_shapes(preset)
    rows = []
    for form in forms:
        torch._dynamo.reset()  # the forms share one lambda's code: each gets its own graphs and recompile budget
        fn = torch.compile(
            lambda X, form=form: orthogonalize(X, POLAR_EXPRESS, POLAR_EXPRESS_SAFETY, form=form),
            dynamic=False, fullgraph=True)
        total = 0.0
        buckets = []
        for K, M, N in shapes:
            X = torch.randn(K, M, N, device=device, dtype=dtype)
            ms = cuda_median_ms(lambda X=X, fn=fn: fn(X), warmup=3, iters=20)
            total += ms
            buckets.append({"bucket": f"{K}x{M}x{N}", "ms": round(ms, 4), **form_error(form, M, N, device, fn)})
        rows.append({"form": form, "total_ms": round(total, 4), "buckets": buckets})
    return {"preset": preset, "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "dtype": str(dtype), "rows": rows}


GRAM_CONFIGS = [  # (block, block_k, num_warps, num_stages)
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 32, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3),
    (64, 64, 4, 4), (64, 128, 4, 3),
]


def gram_sweep(preset: str) -> dict:
    """Per bucket (K, min, max): cuBLAS ms and sym_gram ms per launch config for both symmetric products."""
    from ghostvis_core.kernels.gram_triton import sym_gram

    device = require_cuda("muon_bench --gram-sweep")
    rows = []
    for K, M, N in bucket_shapes(preset):
        m, n = min(M, N), max(M, N)
        X = torch.randn(K, m, n, device=device, dtype=torch.bfloat16) / n**0.5
        A = torch.bmm(X, X.mT)
        row = {"bucket": f"{K}x{m}x{n}",
               "cublas_gram_ms": round(cuda_median_ms(lambda X=X: torch.bmm(X, X.mT), warmup=3, iters=20), 4),
               "cublas_square_ms": round(cuda_median_ms(
                   lambda A=A: torch.baddbmm(A, A, A, beta=-2.0, alpha=0.5), warmup=3, iters=20), 4),
               "configs": []}
        for block, block_k, warps, stages in GRAM_CONFIGS:
            kw = dict(block=block, block_k=block_k, num_warps=warps, num_stages=stages)
            gram = cuda_median_ms(lambda X=X, kw=kw: sym_gram(X, **kw), warmup=3, iters=20)
            square = cuda_median_ms(lambda A=A, kw=kw: sym_gram(A, A, 0.5, -2.0, **kw), warmup=3, iters=20)
            row["configs"].append({"config": [block, block_k, warps, stages], "gram_ms": round(gram, 4),
                                   "square_ms": round(square, 4)})
        rows.append(row)
    return {"preset": preset, "device": torch.cuda.get_device_name(device), "rows": rows}


def _print_sweep(result: dict) -> None:
    print(f"{result['device']}: sym_gram launch configs (block, block_k, warps, stages), ms")
    for row in result["rows"]:
        print(f"{row['bucket']}: cuBLAS bmm X X^T {row['cublas_gram_ms']:.3f}, baddbmm A A {row['cublas_square_ms']:.3f}")
        for c in sorted(row["configs"], key=lambda c: c["gram_ms"] + c["square_ms"]):
            print(f"    {tuple(c['config'])}: X X^T {c['gram_ms']:.3f}  c A A^T + b A {c['square_ms']:.3f}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: one table (or JSON) of forms by bucket."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="d20")
    parser.add_argument("--forms", nargs="+", default=list(ORTHOGONALIZE_FORMS), choices=ORTHOGONALIZE_FORMS)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gram-sweep", action="store_true", help="time sym_gram's launch configs instead")
    args = parser.parse_args(argv)
    if args.gram_sweep:
        sweep = gram_sweep(args.preset)
        if args.json:
            print(json.dumps(sweep, indent=2))
        else:
            _print_sweep(sweep)
        return 0
    result = run(args.preset, args.forms)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['device']}, torch {result['torch']}, {result['dtype']}, preset {result['preset']}")
    for row in result["rows"]:
        cells = "  ".join(f"{b['bucket']}: {b['ms']:.3f} ms (err {b['rel_error_vs_float64']:.2e}, "
                          f"sv [{b['sv_min']:.3f}, {b['sv_max']:.3f}])" for b in row["buckets"])
        print(f"{row['form']:>10}: {row['total_ms']:.3f} ms per step | {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
