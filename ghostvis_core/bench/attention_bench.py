"""Attention backends head to head: dense causal TFLOP/s and packed documents vs plain causal.

FLOPs (FlashAttention's accounting): causal forward = 4 * B * H * T^2 * D / 2 (QK^T and PV, half the square);
fwd+bwd = 3.5 x forward (backward recomputes QK^T and adds dV, dP, dQ, dK). Packed rows hold `docs_per_row`
causal documents of T / docs_per_row tokens; a packed row is compared in ms with plain causal over the row.
Absent backends are rows with status "absent" and the reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ghostvis_core.errors import GhostVisError

_SDPA = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
LABELS = {
    "flash_attn": "FlashAttention-2",
    "sdpa_cudnn": "SDPA/cuDNN",
    "sdpa_flash": "SDPA/flash",
    "sdpa_efficient": "SDPA/efficient",
    "flex": "FlexAttention (compiled)",
}


def _bench(fn, inputs, backward: bool) -> float:
    from ghostvis_core.bench.train_bench import bench_ms

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
    return bench_ms(run, iters=20, warmup=5)


def _flash_absent_reason() -> str | None:
    try:
        import flash_attn  # noqa: F401
    except ImportError as err:
        return f"flash-attn does not import ({err}); `ghostvis install flash-attn`"
    return None


def _dense_fn(backend, q, k, v):
    """Causal attention over (B, H, T, D) tensors by `backend`."""
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        return lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    if backend == "flex":
        from ghostvis_core.attention import _causal_block_mask, _compiled_flex

        mask = _causal_block_mask(q.shape[2], str(q.device))
        flex = _compiled_flex()
        return lambda: flex(q, k, v, block_mask=mask)

    def sdpa():
        with sdpa_kernel([_SDPA[backend]]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return sdpa


def _packed_fn(backend, q, k, v, position_ids):
    from ghostvis_core.attention import (
        cu_seqlens_from_positions,
        doc_ids_from_positions,
        flex_document_block_mask,
        packed_mask,
    )

    B, H, T, D = q.shape
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        cu, max_len = cu_seqlens_from_positions(position_ids)
        qf, kf, vf = (t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v))
        return lambda: flash_attn_varlen_func(qf, kf, vf, cu, cu, max_len, max_len, causal=True)
    if backend == "flex":
        from ghostvis_core.attention import _compiled_flex

        mask = flex_document_block_mask(doc_ids_from_positions(position_ids))
        flex = _compiled_flex()
        return lambda: flex(q, k, v, block_mask=mask)
    if backend == "sdpa_efficient":
        mask = packed_mask(position_ids)

        def sdpa():
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        return sdpa
    return None  # SDPA flash / cuDNN take no block-diagonal mask


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
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    doc_len = T // docs_per_row
    position_ids = torch.arange(T, device="cuda").remainder(doc_len).expand(B, T).contiguous()
    fwd_flops = 4 * B * H * T * T * D / 2
    rows: list[dict] = []
    dense_ms: dict[str, tuple[float, float]] = {}
    flash_reason = _flash_absent_reason()
    for backend in ("flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex"):
        base = {
            "backend": backend,
            "label": LABELS[backend],
            "batch": B,
            "heads": H,
            "seq_len": T,
            "head_dim": D,
            "dtype": str(dtype).replace("torch.", ""),
        }
        if backend == "flash_attn" and flash_reason:
            rows.append({**base, "case": "dense", "status": "absent", "reason": flash_reason})
            rows.append({**base, "case": "packed", "status": "absent", "reason": flash_reason})
            continue
        try:
            fn = _dense_fn(backend, q, k, v)
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
        fn = _packed_fn(backend, q, k, v, position_ids)
        if fn is None:
            rows.append(
                {
                    **base,
                    "case": "packed",
                    "status": "absent",
                    "reason": f"{LABELS[backend]} takes no document mask",
                }
            )
            continue
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
