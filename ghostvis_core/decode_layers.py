"""The fused small-batch decode step: when it runs (the plan's `decode_layers` choice) and what it computes.

Requested (decode_layers="triton"; auto keeps the PyTorch layers, which measured as fast), a decode step of
at most FUSED_MAX_BATCH rows runs each decoder layer as five kernels instead of the ~11 the
compiled PyTorch layer takes (kernels/decode_linear_triton.py has the kernels and their rounding):

    qkv = rope(rmsnorm(x) @ W_qkv^T);   y = decode attention (the plan's decode backend, writes the cache)
    x = x + y @ W_o^T;   h = silu(.) * (.) of rmsnorm(x) @ W_gate|up^T;   x = x + h @ W_down^T

and the head as one: logits = rmsnorm(x) @ W_head^T. It needs the inference-fused q|k|v and gate|up weights
(GPT.fuse_projections_), so a training process (separate projections) never takes it. Larger batches keep
the compiled PyTorch layer, where each projection is a real GEMM that cuBLAS or inductor runs well.

The kernels are custom ops, so the compiled step keeps one graph around them (as attention's decode ops) and a
CUDA graph captures them; they read the compiled step's PDL setting at run time (attention.inductor_pdl).
"""

from __future__ import annotations

import torch

from ghostvis_core.backends import Choice, RunFacts
from ghostvis_core.env import EnvFacts
from ghostvis_core.errors import BackendUnavailableError
from ghostvis_core.hardware_limits import arch_unavailable, package_unavailable

FUSED_MAX_BATCH = 8
"""Largest decode batch whose layers run as the fused kernels when they are requested: above it every
projection is a GEMM that cuBLAS or inductor runs well (each fused program re-reads its weights per row)."""


def choose_decode_layers(env: EnvFacts, facts: RunFacts) -> Choice:
    """The plan's choice for a small-batch decode step's layers: triton (the fused kernels) or torch.

    auto keeps the compiled PyTorch layers. On an H100 (2026-12-07, d20 bf16, `decode_step --layers torch
    triton`, ms per graphed step at batch 1 / 2 / 4 / 8) the fused step took 0.760 / 1.133 / 1.829 / 2.902
    against the PyTorch layers' 0.759 / 0.933 / 1.011 / 1.013: a tie at one row, and slower above it, where
    each fused program re-reads its weights for every row (docs/BENCHMARKS.md). triton is the explicit request
    that measurements and later kernel work take; it raises where the kernels cannot run."""
    request = facts.decode_layers
    if request == "torch":
        return Choice("torch", "PyTorch layers", "requested")
    if request == "auto":
        if facts.device_type != "cuda":
            return Choice("torch", "PyTorch layers", "the fused decode kernels are Triton kernels for CUDA GPUs")
        return Choice("torch", "PyTorch layers", "the fused decode kernels measured no faster, docs/BENCHMARKS.md")
    if facts.purpose != "inference":
        why = "a training run's sampling keeps the model's own (unfused) projections"
    elif facts.device_type != "cuda":
        why = "they are Triton kernels for CUDA GPUs"
    elif not facts.use_fused_kernels:
        why = "use_fused_kernels=False"
    else:
        cannot = arch_unavailable("triton", env.capability) or package_unavailable(env, "triton", "triton")
        why = None if cannot is None else cannot.message
    if why is not None:
        raise BackendUnavailableError(f"decode_layers=triton was requested but the fused decode kernels cannot "
                                      f"run: {why}. Fix: leave decode_layers at auto")  # fmt: skip
    return Choice("triton", f"Triton fused decode layers (batch <= {FUSED_MAX_BATCH})", "requested")


def with_decode_layers(plan, request: str):
    """`plan` with its decode layers chosen again for `request` (DecodeLayersRequest; "plan": unchanged), as
    plan_run would choose them on this machine; raises where the request cannot run."""
    import dataclasses

    from ghostvis_core.env import probe_env

    if request == "plan":
        return plan
    facts = dataclasses.replace(plan.facts, decode_layers=request)
    return dataclasses.replace(plan, facts=facts, decode_layers=choose_decode_layers(probe_env(), facts))


@torch.library.custom_op("ghostvis::decode_linear", mutates_args=())
def _decode_linear(
    x: torch.Tensor, w: torch.Tensor, epilogue: str, norm_weight: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None, rot_rows: int,
    head_dim: int,
) -> torch.Tensor:  # fmt: skip
    """kernels.decode_linear_triton.decode_linear as an op the compiled step keeps in its graph."""
    from ghostvis_core.attention import inductor_pdl
    from ghostvis_core.kernels.decode_linear_triton import decode_linear

    return decode_linear(x, w, epilogue=epilogue, norm_weight=norm_weight, eps=eps, residual_MN=residual,
                         cos_MH=cos, sin_MH=sin, rot_rows=rot_rows, head_dim=head_dim,
                         pdl=inductor_pdl(x.device))  # fmt: skip


@_decode_linear.register_fake
def _(x, w, epilogue, norm_weight, eps, residual, cos, sin, rot_rows, head_dim):
    return x.new_empty(x.shape[0], w.shape[0] // 2 if epilogue == "swiglu" else w.shape[0])


def runs_fused(model, cache, new_tokens: int) -> bool:
    """Whether this forward of `new_tokens` per row over `cache` takes the fused step: a decode step (one token,
    no row view, not a prefill) of at most FUSED_MAX_BATCH rows, under a plan that chose it, with every layer's
    projections fused and the cache in the activations' dtype or fp8."""
    return (
        model.plan.decode_layers.backend == "triton" and new_tokens == 1 and not cache.fresh
        and cache.batch_idx is None and cache.cache_seqlens.shape[0] <= FUSED_MAX_BATCH
        and all(b.self_attn.qkv_weight is not None and b.mlp.gate_up_weight is not None for b in model.model.layers)
    )  # fmt: skip


def fused_decode_logits(model, x_B1C: torch.Tensor, cache) -> torch.Tensor:
    """Logits (B, 1, V) fp32 of one new token per row (embedded: x_B1C), through the fused layers; appends each
    row's K/V to the cache and advances its length by 1, as GPT.forward_with_cache does."""
    from ghostvis_core.attention import attention_with_kvcache
    from ghostvis_core.gpt import rope_cos_sin

    c = model.config
    B, H, K, D = x_B1C.shape[0], c.n_head, c.n_kv_head, c.head_dim
    cos, sin = rope_cos_sin(cache.cache_seqlens[:, None].to(torch.long), model.inv_freq)
    cos, sin = cos.reshape(B, D // 2), sin.reshape(B, D // 2)
    op = torch.ops.ghostvis.decode_linear
    x = x_B1C[:, 0]
    for i, block in enumerate(model.model.layers):
        attn, mlp, n1, n2 = block.self_attn, block.mlp, block.input_layernorm, block.post_attention_layernorm
        qkv = op(x, attn.qkv_weight, "rope", n1.weight, n1.eps, None, cos, sin, (H + K) * D, D)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        k_cache, v_cache = cache.layer(i)
        k_scale, v_scale = cache.layer_scales(i)
        y = attention_with_kvcache(
            q.view(B, 1, H, D), k.view(B, 1, K, D), v.view(B, 1, K, D), k_cache, v_cache, cache.cache_seqlens,
            cache.backend(1), None, k_scale, v_scale, None,
        )
        x = op(y.reshape(B, H * D), attn.o_proj.weight, "residual", None, 0.0, x, None, None, 0, 0)
        h = op(x, mlp.gate_up_weight, "swiglu", n2.weight, n2.eps, None, None, None, 0, 0)
        x = op(h, mlp.down_proj.weight, "residual", None, 0.0, x, None, None, 0, 0)
    cache.cache_seqlens += 1
    norm = model.model.norm
    return op(x, model.lm_head.weight, "plain", norm.weight, norm.eps, None, None, None, 0, 0).float()[:, None]
