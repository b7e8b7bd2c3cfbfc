"""Preallocated per-layer key/value cache with per-row lengths (GPT.new_kv_cache makes one).

Shape legend: L layers, B batch rows, S cache slots, K key/value heads, D head dim.

Every row has its own length (`cache_seqlens`, int32 (B,), on the device): rows holding prompts of different
lengths share a batch, a row's next token goes to slot cache_seqlens[b] and gets RoPE position cache_seqlens[b].
The tensors never move or change shape after construction, so a decode step that reads and writes them can be
captured once in a CUDA graph and replayed (gpt-fast's static cache); the lengths live on the device so no step
needs the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Cache tensors k, v (L, B, S, K, D) and per-row valid lengths cache_seqlens (B,) int32.

    decode_backend and prefill_backend are the plan's "decode" and "prefill" choices, made for the model's
    dtype, so they run on these tensors; `backend` says which serves a call.
    """

    n_layer: int
    n_kv_head: int
    head_dim: int
    batch_size: int
    max_len: int
    device: torch.device
    decode_backend: str
    prefill_backend: str
    dtype: torch.dtype = torch.float32
    k: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    v: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    cache_seqlens: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    batch_idx: torch.Tensor | None = field(default=None, repr=False)
    """int32 (n,): the rows of k/v this view writes and reads (a batched prefill into some rows of a running
    batch, see `rows`); None: rows 0..batch_size-1."""

    def __post_init__(self) -> None:
        shape = (self.n_layer, self.batch_size, self.max_len, self.n_kv_head, self.head_dim)
        if self.k is None:
            self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.cache_seqlens is None:
            self.cache_seqlens = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)

    def backend(self, new_tokens: int) -> str:
        """The attention backend for a call appending `new_tokens` per row: one token into every row is a decode
        step, anything else (several tokens, or a view of some rows) a prefill."""
        return self.decode_backend if new_tokens == 1 and self.batch_idx is None else self.prefill_backend

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache tensors (B, S, K, D) of layer i."""
        return self.k[i], self.v[i]

    @property
    def pos(self) -> int:
        """The longest row's length (a host sync: for checks and tests, never in the decode loop)."""
        return int(self.cache_seqlens.max().item())

    def row(self, b: int) -> KVCache:
        """A one-row view sharing storage: a prefill into it fills row b of this cache (continuous batching)."""
        return KVCache(
            self.n_layer, self.n_kv_head, self.head_dim, 1, self.max_len, self.device, self.decode_backend,
            self.prefill_backend, self.dtype, self.k[:, b : b + 1], self.v[:, b : b + 1], self.cache_seqlens[b : b + 1],
        )  # fmt: skip

    def rows(self, idx: torch.Tensor) -> KVCache:
        """A view of rows idx (int32 (n,), on the device) with lengths of its own, all 0: a prefill of n prompts
        into those rows at once. The caller sets the batch's lengths of those rows afterwards (the prompts'
        true lengths when they were padded to one length; slots past a row's length are never attended)."""
        n = int(idx.numel())
        lens = torch.zeros(n, dtype=torch.int32, device=self.device)
        return KVCache(
            self.n_layer, self.n_kv_head, self.head_dim, n, self.max_len, self.device, self.decode_backend,
            self.prefill_backend, self.dtype, self.k, self.v, lens, idx,
        )  # fmt: skip
