"""Attention dispatch: one entry point for every backend the plan can choose.

Shape legend: B batch, T tokens per row, H query heads, K key/value heads (H % K == 0), D head dim,
S cache slots, N = B*T flattened tokens. Every function here takes and returns FlashAttention's layout
(B, T, H, D); SDPA and FlexAttention want (B, H, T, D), so those paths transpose views on the way in and out.

Cases (backends.ATTENTION_CASES): "dense" causal rows, "packed" rows holding several documents (position_ids
restart at 0 at every document start; no token attends across a document boundary), "decode" against a KV
cache, "noncausal" (vision tower). Per-batch document facts (doc ids, cu_seqlens, max_seqlen, the Flex
BlockMask, or the explicit boolean mask) are computed once per forward by `build_attention_context` and shared
by every layer.

Backends: flash_attn (FA2 func / varlen_func / with_kvcache), sdpa_cudnn / sdpa_flash / sdpa_efficient /
sdpa_math (PyTorch SDPA pinned to one kernel with `sdpa_kernel`), flex (compiled FlexAttention + BlockMask).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ghostvis_core.errors import BackendUnavailableError

_SDPA_KERNELS = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
# SDPA's flash and math kernels take enable_gqa; for cuDNN and efficient we repeat K/V heads ourselves
# (no hidden kernel fallback, and the repeat is cheap next to the attention itself).
_SDPA_NATIVE_GQA = ("sdpa_flash", "sdpa_math")


@dataclass
class AttentionContext:
    """Per-forward attention facts shared by every layer."""

    case: str
    """"dense", "packed" or "noncausal"."""
    backend: str
    """The plan's backend for this case (flash_attn | sdpa_* | flex)."""
    doc_ids_BT: torch.Tensor | None = None
    """Packed: document index of every token within its row (int32)."""
    cu_seqlens: torch.Tensor | None = None
    """Packed + flash_attn: (num_docs + 1,) int32 offsets of each document in the flattened N tokens."""
    max_seqlen: int | None = None
    """Packed + flash_attn: longest document, a Python int."""
    block_mask: Any = None
    """flex: the BlockMask (causal, or causal and same-document), built once per batch."""
    mask_B1TT: torch.Tensor | None = None
    """Packed + SDPA: boolean mask, True where attention is allowed (same document and causal)."""


def _doc_starts(position_ids_BT: torch.Tensor) -> torch.Tensor:
    """True at every token that starts a document: position 0, or the first column of a row."""
    starts = position_ids_BT == 0
    starts[:, 0] = True  # a row that continues a document from the previous row still starts a segment
    return starts


def doc_ids_from_positions(position_ids_BT: torch.Tensor) -> torch.Tensor:
    """Document index per token, counted within each row (0, 0, 0, 1, 1, 2, ...), int32."""
    return (torch.cumsum(_doc_starts(position_ids_BT).to(torch.int32), dim=1) - 1).to(torch.int32)


def cu_seqlens_from_positions(position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """FlashAttention varlen offsets over the flattened rows: (cu_seqlens int32, max_seqlen int). On a CPU
    tensor (the data loaders' batches) this costs no device sync."""
    B, T = position_ids_BT.shape
    starts = torch.nonzero(_doc_starts(position_ids_BT).flatten()).flatten()
    end = torch.tensor([B * T], device=starts.device, dtype=starts.dtype)
    cu = torch.cat([starts, end]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max().item())
    return cu, max_seqlen


def packed_mask(position_ids_BT: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask: query i sees key j iff j <= i and both lie in the same document."""
    doc = doc_ids_from_positions(position_ids_BT)
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Flex is only fast compiled; dynamic=False because training shapes are fixed per run.
    return torch.compile(flex_attention, dynamic=False)


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    # Inside an outer torch.compile, dynamo lowers flex_attention itself; eagerly, only the compiled
    # function is fast. CPU Flex has no backward; its eager forward serves checks.
    if torch.compiler.is_compiling() or device.type != "cuda":
        return flex_attention
    return _compiled_flex()


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T: int, device_str: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal_mod, None, None, T, T, device=device_str)


def flex_document_block_mask(doc_ids_BT: torch.Tensor):
    """Flex BlockMask for packed rows: causal and same document (attention-gym's document mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids_BT.shape

    def doc_causal(b, h, q_idx, kv_idx):
        return (doc_ids_BT[b, q_idx] == doc_ids_BT[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(doc_causal, B, None, T, T, device=doc_ids_BT.device)


def build_attention_context(
    plan, position_ids_BT: torch.Tensor | None, batch: int, seq_len: int, device: torch.device,
    doc_bounds: tuple[torch.Tensor, int] | None = None,
) -> AttentionContext:
    """Everything the layers need for this batch, computed once per forward.

    doc_bounds: (cu_seqlens, max_seqlen) of packed rows, computed on the host by the data loader from the same
    position_ids (`cu_seqlens_from_positions` on the CPU tensor); without them, flash_attn's varlen offsets
    are computed here from the device tensor, which costs a host sync (nonzero and the max read back).
    GPT calls it through torch.compiler.disable on CUDA machines: the BlockMask is built eagerly, so it stays
    outside any compiled graph.
    """
    if position_ids_BT is None:
        backend = plan.attention["dense"].backend
        ctx = AttentionContext(case="dense", backend=backend)
        if backend == "flex":
            ctx.block_mask = _causal_block_mask(seq_len, str(device))
        return ctx
    backend = plan.attention["packed"].backend
    ctx = AttentionContext(case="packed", backend=backend)
    if backend == "flash_attn" and doc_bounds is not None:
        cu, ctx.max_seqlen = doc_bounds
        ctx.cu_seqlens = cu.to(device, torch.int32, non_blocking=True)  # the prefetcher already moved it
    elif backend == "flash_attn":
        ctx.cu_seqlens, ctx.max_seqlen = cu_seqlens_from_positions(position_ids_BT)
    elif backend == "flex":
        ctx.doc_ids_BT = doc_ids_from_positions(position_ids_BT)
        ctx.block_mask = flex_document_block_mask(ctx.doc_ids_BT)
    elif backend in _SDPA_KERNELS:
        ctx.mask_B1TT = packed_mask(position_ids_BT)
    else:
        raise BackendUnavailableError(f"attention backend '{backend}' cannot serve packed documents")
    return ctx


def _repeat_kv(x_BKTD: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, T, D) -> (B, K*n_rep, T, D), each KV head repeated for its n_rep query heads (HF repeat_kv)."""
    return x_BKTD if n_rep == 1 else x_BKTD.repeat_interleave(n_rep, dim=1)


def _sdpa(q_BTHD, k_BTKD, v_BTKD, backend: str, *, is_causal: bool, mask=None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTKD, v_BTKD))
    n_rep = q.shape[1] // k.shape[1]
    gqa = n_rep > 1
    if gqa and backend not in _SDPA_NATIVE_GQA:
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        gqa = False
    if q.device.type == "cpu":
        # CPU: let PyTorch use its CPU flash kernel or math; there is no kernel choice to pin.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    else:
        with sdpa_kernel([_SDPA_KERNELS[backend]]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    return out.transpose(1, 2)


def _flex(q_BTHD, k_BTKD, v_BTKD, block_mask) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTKD, v_BTKD))
    gqa = q.shape[1] != k.shape[1]
    out = _flex_fn(q.device)(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def attention(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, ctx: AttentionContext):
    """Softmax attention (scale D**-0.5) for one layer, per the batch's context; returns (B, T, H, D)."""
    backend = ctx.backend
    causal = ctx.case != "noncausal"
    if ctx.case == "packed":
        if backend == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            B, T, H, D = q_BTHD.shape
            out = flash_attn_varlen_func(
                q_BTHD.reshape(B * T, H, D),
                k_BTKD.reshape(B * T, -1, D),
                v_BTKD.reshape(B * T, -1, D),
                cu_seqlens_q=ctx.cu_seqlens,
                cu_seqlens_k=ctx.cu_seqlens,
                max_seqlen_q=ctx.max_seqlen,
                max_seqlen_k=ctx.max_seqlen,
                causal=True,
            )
            return out.view(B, T, H, D)
        if backend == "flex":
            return _flex(q_BTHD, k_BTKD, v_BTKD, ctx.block_mask)
        return _sdpa(q_BTHD, k_BTKD, v_BTKD, backend, is_causal=False, mask=ctx.mask_B1TT)
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q_BTHD, k_BTKD, v_BTKD, causal=causal)
    if backend == "flex":
        return _flex(q_BTHD, k_BTKD, v_BTKD, ctx.block_mask if causal else None)
    return _sdpa(q_BTHD, k_BTKD, v_BTKD, backend, is_causal=causal)


@torch.library.custom_op("ghostvis::triton_decode_attention", mutates_args=("k_cache", "v_cache"))
def _triton_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """One decode token per row (B, 1, H, D): the Triton split-KV kernel writes k/v at each row's slot and
    attends; a custom op for the same reason as _flash_attn_kvcache."""
    from ghostvis_core.kernels.decode_attention_triton import decode_attention_triton

    return decode_attention_triton(q[:, 0], k[:, 0], v[:, 0], k_cache, v_cache, cache_seqlens,
                                   pdl=inductor_pdl(q.device))[:, None]  # fmt: skip


def inductor_pdl(device: torch.device) -> bool:
    """Whether the compiled step around this call launches its kernels with programmatic dependent launch
    (batch_engine.decode_inductor_options, on Hopper and later): the decode kernel then does too, so each of
    its two kernel boundaries overlaps a launch like the step's other ones."""
    import torch._inductor.config as inductor_config

    return (bool(inductor_config.triton.enable_pdl) and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)  # fmt: skip


@_triton_decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, cache_seqlens):
    return q.new_empty(q.shape)


@torch.library.custom_op("ghostvis::triton_decode_attention_fp8",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))  # fmt: skip
def _triton_decode_attention_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """_triton_decode_attention over an fp8 e4m3 cache and its per-token scales (kv_cache.py)."""
    from ghostvis_core.kernels.decode_attention_triton import decode_attention_triton

    return decode_attention_triton(q[:, 0], k[:, 0], v[:, 0], k_cache, v_cache, cache_seqlens,
                                   pdl=inductor_pdl(q.device), k_scale_BSK=k_scale, v_scale_BSK=v_scale)[:, None]


@_triton_decode_attention_fp8.register_fake
def _(q, k, v, k_cache, v_cache, cache_seqlens, k_scale, v_scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("ghostvis::flash_attn_kvcache", mutates_args=("k_cache", "v_cache"))
def _flash_attn_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cache_seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """flash_attn_with_kvcache as an op torch.compile can keep in its graph (declared as writing the caches in
    place): without it the call is a graph break in every layer, and the compiled decode step falls apart
    into per-layer pieces that recompile for each layer index."""
    from flash_attn import flash_attn_with_kvcache

    return flash_attn_with_kvcache(
        q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, causal=True
    )


@_flash_attn_kvcache.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx):
    return q.new_empty(q.shape)


def attention_with_kvcache(
    q_BTHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    k_cache_BSKD: torch.Tensor,
    v_cache_BSKD: torch.Tensor,
    cache_seqlens: torch.Tensor | int,
    backend: str,
    cache_batch_idx: torch.Tensor | None = None,
    k_scale_BSK: torch.Tensor | None = None,
    v_scale_BSK: torch.Tensor | None = None,
    fresh_ctx: AttentionContext | None = None,
) -> torch.Tensor:
    """Append k/v of each row b at its slots [len_b, len_b + T) and attend causally to slots [0, len_b + T).

    cache_batch_idx: int32 (B,), the cache row of each query row (None: row b is cache row b); a batched
    prefill into some rows of a running batch passes them.

    k_scale_BSK, v_scale_BSK: an fp8 e4m3 cache's per-token scales (kv_cache.py). The Triton decode kernel reads
    such a cache directly; the SDPA path stores quantize_fp8 of the new k/v and attends over the dequantized
    rows (a copy of the cache in q's dtype: right for prefill, slow for a decode loop).

    fresh_ctx: every row is empty (len_b = 0, KVCache.fresh) and over an fp8 cache: k/v are stored quantized,
    and the rows attend causally over the new k/v themselves through this dense-case context (the plan's
    backend), the cache unread. Right-padded prompts are served too: a real token never attends to the pads
    after it.

    cache_seqlens: int32 (B,) per-row lengths on the device (an int means every row has that length). Shapes
    never depend on the lengths, so a decode step is capturable in a CUDA graph: flash_attn reads cache_seqlens
    itself; the SDPA path writes with a scatter and attends over all S slots with a per-row mask (at decode the
    extra masked slots cost S/len_b more attention reads, small next to the weights for contexts of a few
    thousand tokens). Slot indices are clamped to S - 1, so an idle row (continuous batching) that keeps
    stepping past its end overwrites its own last slot instead of writing out of bounds.
    """
    B, T = q_BTHD.shape[:2]
    S = k_cache_BSKD.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q_BTHD.device)
    fp8 = k_scale_BSK is not None
    assert fresh_ctx is None or (fp8 and fresh_ctx.case == "dense"), "fresh rows of an fp8 cache only"
    if fp8 and backend not in ("triton", "sdpa_efficient", "sdpa_math"):  # kv_cache.fp8_cache_backends routes
        raise ValueError(f"an fp8 KV cache cannot be served by {backend}")
    if backend == "flash_attn":
        # Writes k/v into the cache in place at each row's length; causal aligns each row's new tokens last.
        return _flash_attn_kvcache(
            q_BTHD, k_cache_BSKD, v_cache_BSKD, k_BTKD, v_BTKD, cache_seqlens, cache_batch_idx
        )
    if backend == "triton":
        if T != 1 or cache_batch_idx is not None:  # KVCache.backend routes these to the plan's prefill choice
            raise ValueError(f"the Triton decode kernel takes one new token per row of the whole batch (got T={T})")
        if fp8:
            return _triton_decode_attention_fp8(q_BTHD, k_BTKD, v_BTKD, k_cache_BSKD, v_cache_BSKD, cache_seqlens,
                                                k_scale_BSK, v_scale_BSK)  # fmt: skip
        return _triton_decode_attention(q_BTHD, k_BTKD, v_BTKD, k_cache_BSKD, v_cache_BSKD, cache_seqlens)
    lens = cache_seqlens.to(torch.long)
    q_pos = lens[:, None] + torch.arange(T, device=q_BTHD.device)  # (B, T) slot of each new token
    if cache_batch_idx is None:
        rows = torch.arange(B, device=q_BTHD.device)[:, None].expand(B, T)
    else:
        rows = cache_batch_idx.to(torch.long)[:, None].expand(B, T)
    if fp8:
        from ghostvis_core.kv_cache import dequantize_fp8, store_fp8

        store_fp8(k_BTKD, v_BTKD, k_cache_BSKD, v_cache_BSKD, k_scale_BSK, v_scale_BSK, rows[:, 0], lens)
        if fresh_ctx is not None:
            return attention(q_BTHD, k_BTKD, v_BTKD, fresh_ctx)
    else:
        slots = q_pos.clamp(max=S - 1)  # (store_fp8 clamps its own)
        k_cache_BSKD[rows, slots] = k_BTKD
        v_cache_BSKD[rows, slots] = v_BTKD
    if cache_batch_idx is not None:  # attend to those rows only (a gather: prefill, not the decode loop)
        if fp8:
            k_scale_BSK, v_scale_BSK = k_scale_BSK[rows[:, 0]], v_scale_BSK[rows[:, 0]]
            k_cache_BSKD = k_cache_BSKD.view(torch.uint8)[rows[:, 0]].view(k_cache_BSKD.dtype)
            v_cache_BSKD = v_cache_BSKD.view(torch.uint8)[rows[:, 0]].view(v_cache_BSKD.dtype)
        else:
            k_cache_BSKD, v_cache_BSKD = k_cache_BSKD[rows[:, 0]], v_cache_BSKD[rows[:, 0]]
    if fp8:
        k_cache_BSKD = dequantize_fp8(k_cache_BSKD, k_scale_BSK, q_BTHD.dtype)
        v_cache_BSKD = dequantize_fp8(v_cache_BSKD, v_scale_BSK, q_BTHD.dtype)
    H, D = q_BTHD.shape[2:]
    K = k_cache_BSKD.shape[2]
    G = H // K
    # GQA without repeating the cache: the G query heads of each KV head become G*T query rows of that head
    # (a copy of q, which is tiny at decode), and the (T, S) mask is repeated over them.
    q_BKMD = q_BTHD.view(B, T, K, G, D).permute(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
    allowed = torch.arange(S, device=q_BTHD.device)[None, None, :] <= q_pos[:, :, None]  # (B, T, S)
    mask = allowed[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
    k_BKSD, v_BKSD = k_cache_BSKD.transpose(1, 2), v_cache_BSKD.transpose(1, 2)
    # The plan's decode choice here is sdpa_efficient (CUDA, any dtype) or sdpa_math (CPU): SDPA's flash and
    # cuDNN kernels take no explicit mask (attention_preferences.CASES_SUPPORTED).
    assert backend in ("sdpa_efficient", "sdpa_math"), f"decode cannot run on {backend}"
    with sdpa_kernel([_SDPA_KERNELS[backend]]):
        out = F.scaled_dot_product_attention(q_BKMD, k_BKSD, v_BKSD, attn_mask=mask)
    return out.view(B, K, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H, D)
