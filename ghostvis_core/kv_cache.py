"""Preallocated per-layer key/value cache for KV-cache decoding (GPT.new_kv_cache makes one).

Shape legend: L layers, B batch rows, S cache slots, K key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Cache tensors (L, B, S, K, D), filled left to right; `pos` slots are valid.

    decode_backend is the plan's "decode" choice, made for the model's dtype, so it runs on these tensors.
    """

    n_layer: int
    n_kv_head: int
    head_dim: int
    batch_size: int
    max_len: int
    device: torch.device
    decode_backend: str
    pos: int = 0
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def layer(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache tensors of layer i (allocated on first use in the activation dtype)."""
        if self.k is None:
            shape = (self.n_layer, self.batch_size, self.max_len, self.n_kv_head, self.head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        return self.k[i], self.v[i]
