"""Time Muon's orthogonalisation per spelling of its products (muon.ORTHOGONALIZE_FORMS) on a preset's buckets.

    python -m ghostvis_core.bench.muon_bench [--preset d20] [--forms baddbmm pointwise] [--json]

The buckets are the preset's Muon matrices grouped by shape, as BatchedMuon groups them (d20: 80 of 1280x1280,
40 of 3456x1280, 20 of 1280x3456). Each form runs the Polar Express table in the iteration dtype (bf16 on CUDA),
compiled as the trainer compiles it (fullgraph, static shapes), on random momentum-like stacks; the GPU time per
bucket is the median of CUDA-event timings (bench.timing). Each form's error is measured on one matrix per
bucket with a known spectrum (1e-3 .. 1 of the largest singular value): the relative Frobenius distance to the
same iteration in float64, and the singular values of the bf16 result.
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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: one table (or JSON) of forms by bucket."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="d20")
    parser.add_argument("--forms", nargs="+", default=list(ORTHOGONALIZE_FORMS), choices=ORTHOGONALIZE_FORMS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
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
