"""Attention backends head to head: dense causal TFLOP/s and packed documents vs plain causal.

FLOPs (FlashAttention's accounting): causal forward = 4 * B * H * T^2 * D / 2 (QK^T and PV, half the square);
fwd+bwd = 3.5 x forward (backward recomputes QK^T and adds dV, dP, dQ, dK). Packed rows hold `docs_per_row`
causal documents of T / docs_per_row tokens; a packed row is compared in ms with plain causal over the row.
Absent backends are rows with status "absent" and the reason.
"""

from __future__ import annotations

import torch

from ghostvis_core.errors import BackendUnavailableError, GhostVisError

# The shipped attention() is what is timed: each row plans with that backend requested (so an absent backend
# reports the planner's own reason) and calls attention() with the context the model would build.
BACKENDS = ("flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex")
LABELS = {
    "flash_attn": "FlashAttention-2",
    "sdpa_cudnn": "SDPA/cuDNN",
    "sdpa_flash": "SDPA/flash",
    "sdpa_efficient": "SDPA/efficient",
    "flex": "FlexAttention (compiled)",
}


def _bench(fn, inputs, backward: bool) -> float:
    from ghostvis_core.bench.timing import cuda_median_ms

    def run():
        if backward:
            for t in inputs:
                t.grad = None
            fn().backward(grad)
        else:
            with torch.no_grad():
                fn()

    with torch.no_grad():
        grad = torch.randn_like(fn())
    return cuda_median_ms(run, warmup=5, iters=20)


def _forced_plan(backend: str, head_dim: int, dtype: torch.dtype):
    """The plan with attention `backend` requested for every case it serves (raises when it cannot run)."""
    from ghostvis_core.backends import plan_backends
    from ghostvis_core.env import probe_env

    dtype_name = str(dtype).replace("torch.", "")
    return plan_backends(probe_env(), device_type="cuda", dtype=dtype_name, attn=backend, head_dim=head_dim)


def _attention_fn(plan, q, k, v, position_ids):
    """attention() over (B, T, H, D) tensors with the context GPT.forward builds (packed when positions given)."""
    from ghostvis_core.attention import attention, build_attention_context

    B, T = q.shape[:2]
    ctx = build_attention_context(plan, position_ids, B, T, q.device)
    return lambda: attention(q, k, v, ctx)


def run_attention_bench(
    batch: int = 4,
    heads: int = 16,
    seq_len: int = 4096,
    head_dim: int = 128,
    docs_per_row: int = 8,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """One row per (backend, case): ms and TFLOP/s fwd and fwd+bwd; packed rows add the ratio to dense."""
    if not torch.cuda.is_available():
        raise GhostVisError("the attention benchmark needs a CUDA GPU; run `ghostvis bench kernels` on one")
    if seq_len % docs_per_row:
        raise GhostVisError(f"seq_len={seq_len} must be divisible by docs_per_row={docs_per_row}")
    B, H, T, D = batch, heads, seq_len, head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    doc_len = T // docs_per_row
    position_ids = torch.arange(T, device="cuda").remainder(doc_len).expand(B, T).contiguous()
    fwd_flops = 4 * B * H * T * T * D / 2
    rows: list[dict] = []
    dense_ms: dict[str, tuple[float, float]] = {}
    for backend in BACKENDS:
        base = {
            "backend": backend,
            "label": LABELS[backend],
            "batch": B,
            "heads": H,
            "seq_len": T,
            "head_dim": D,
            "dtype": str(dtype).replace("torch.", ""),
        }
        try:
            plan = _forced_plan(backend, D, dtype)
        except BackendUnavailableError as err:
            reason = str(err)
            rows.append({**base, "case": "dense", "status": "absent", "reason": reason})
            rows.append({**base, "case": "packed", "status": "absent", "reason": reason})
            continue
        try:
            fn = _attention_fn(plan, q, k, v, None)
            fwd = _bench(fn, [q, k, v], backward=False)
            fwd_bwd = _bench(fn, [q, k, v], backward=True)
        except RuntimeError as err:  # e.g. "No available kernel" for this shape / dtype / GPU
            rows.append({**base, "case": "dense", "status": "error", "reason": str(err).splitlines()[0]})
            continue
        dense_ms[backend] = (fwd, fwd_bwd)
        rows.append(
            {
                **base,
                "case": "dense",
                "status": "ok",
                "fwd_ms": fwd,
                "fwd_bwd_ms": fwd_bwd,
                "fwd_tflops": fwd_flops / fwd / 1e9,
                "fwd_bwd_tflops": 3.5 * fwd_flops / fwd_bwd / 1e9,
            }
        )
        if plan.attention["packed"].backend != backend:  # SDPA flash / cuDNN take no block-diagonal mask
            rows.append(
                {
                    **base,
                    "case": "packed",
                    "status": "absent",
                    "reason": f"{LABELS[backend]} takes no document mask",
                }
            )
            continue
        fn = _attention_fn(plan, q, k, v, position_ids)
        fwd = _bench(fn, [q, k, v], backward=False)
        fwd_bwd = _bench(fn, [q, k, v], backward=True)
        rows.append(
            {
                **base,
                "case": "packed",
                "status": "ok",
                "docs_per_row": docs_per_row,
                "fwd_ms": fwd,
                "fwd_bwd_ms": fwd_bwd,
                "dense_fwd_ms": dense_ms[backend][0],
                "dense_fwd_bwd_ms": dense_ms[backend][1],
                "speedup_vs_dense": dense_ms[backend][1] / fwd_bwd,
            }
        )
    return rows


def format_attention_bench(rows: list[dict]) -> str:
    """Plain-text table of run_attention_bench rows."""
    out = [f"{'backend':26}{'case':8}{'fwd ms':>8}{'f+b ms':>8}{'fwd TF/s':>10}{'f+b TF/s':>10}  note"]
    for r in rows:
        if r["status"] != "ok":
            out.append(
                f"{r['label']:26}{r['case']:8}{'':>8}{'':>8}{'':>10}{'':>10}  {r['status']}: {r['reason']}"
            )
            continue
        tf = f"{r['fwd_tflops']:>10.0f}{r['fwd_bwd_tflops']:>10.0f}" if r["case"] == "dense" else " " * 20
        note = (
            f"{r['speedup_vs_dense']:.2f}x faster than dense causal (fwd+bwd)"
            if r["case"] == "packed"
            else ""
        )
        out.append(f"{r['label']:26}{r['case']:8}{r['fwd_ms']:>8.3f}{r['fwd_bwd_ms']:>8.3f}{tf}  {note}")
    return "\n".join(out)
