"""Preallocated per-layer key/value cache with per-row lengths (GPT.new_kv_cache makes one).

Shape legend: L layers, B batch rows, S cache slots, K key/value heads, D head dim.

Every row has its own length (`cache_seqlens`, int32 (B,), on the device): rows holding prompts of different
lengths share a batch, a row's next token goes to slot cache_seqlens[b] and gets RoPE position cache_seqlens[b].
The tensors never move or change shape after construction, so a decode step that reads and writes them can be
captured once in a CUDA graph and replayed (gpt-fast's static cache); the lengths live on the device so no step
needs the host.

fp8 storage (kv_cache_dtype="fp8", vLLM's spelling): k and v hold float8 e4m3 with one fp32 scale per (token,
KV head), k_scale and v_scale (L, B, S, K):

    scale = max(amax_D |x|, FP8_MIN_AMAX) / 448;   x8 = e4m3(clamp(x / scale, -448, 448));   x ~ x8 * scale

Per-token scales need no calibration and keep each head's vector at e4m3's relative precision (3 mantissa
bits, a rounding error of at most 2^-4 of each element, usually far less of a dot product); the scales add 4
bytes per 128-byte head vector of D = 128. The cache holds about twice the tokens of bf16 in the same memory and
a decode step reads about half the bytes. The Triton decode kernel quantizes the new token and reads the cache in
fp8. A prefill of fresh rows (KVCache.fresh) attends over its own new K/V through the plan's dense backend and
stores them quantized; every other path (a prefill onto cached tokens, CPU decode) quantizes on write and attends
over the dequantized rows (attention.attention_with_kvcache).

Measured on an H200 (docs/BENCHMARKS.md, 2026-12-04): the decode kernel over fp8 took 56.2 / 108.9 us against
82.7 / 155.0 us over bf16 at batch 256 / 512; the whole `ghostvis bench` run over 1,000 prompts at batch 512 gave
107.0k against 85.7k output tok/s (1.25x), with the time to first token 208 against 190 ms mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ghostvis_core.errors import ConfigError

KV_CACHE_DTYPES = ("auto", "fp8")
"""auto: the model's compute dtype; fp8: float8 e4m3 with per-token scales (module docstring)."""
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_MIN_AMAX = 1e-6
"""An all-zero vector (an empty row's garbage, a zero-initialised model) gets this amax, so its scale is never 0."""
FP8_MIN_SM = (8, 9)
"""float8 e4m3 loads and converts in Triton need Ada or Hopper (sm89+)."""


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) -> (..., D) e4m3 and (...,) fp32 scales with x ~ x8 * scale (module docstring). The Triton decode
    kernel quantizes its new token with the same operations (round-to-nearest divisions), so a token written
    by a prefill and one written by a decode step are stored alike."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=FP8_MIN_AMAX) / FP8_MAX
    x8 = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, scale


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x8 * scale in `dtype` (the product in fp32, as the decode kernel computes it)."""
    return (x8.float() * scale[..., None]).to(dtype)


def store_fp8(k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              k_scale: torch.Tensor, v_scale: torch.Tensor, rows_B: torch.Tensor, starts_B: torch.Tensor) -> None:
    """Store quantize_fp8 of each query row b's new k/v (B, T, K, D) at cache row rows_B[b], slots
    [starts_B[b], starts_B[b] + T) clamped to S - 1, and their scales (the one place an fp8 cache is written
    outside the decode kernel). On CUDA one Triton kernel does it (kernels/kv_store_fp8_triton.py); on CPU
    the same operations in PyTorch, with the scatter done on bytes (indexing kernels do not all take float8)."""
    if k_BTKD.is_cuda:
        torch.ops.ghostvis.kv_store_fp8(k_BTKD, v_BTKD, k_cache, v_cache, k_scale, v_scale, rows_B, starts_B)
        return
    B, T = k_BTKD.shape[:2]
    slots = (starts_B.long()[:, None] + torch.arange(T, device=k_BTKD.device)).clamp(max=k_cache.shape[1] - 1)
    rows = rows_B.long()[:, None].expand(B, T)
    (k8, ks), (v8, vs) = quantize_fp8(k_BTKD), quantize_fp8(v_BTKD)
    k_cache.view(torch.uint8)[rows, slots], k_scale[rows, slots] = k8.view(torch.uint8), ks
    v_cache.view(torch.uint8)[rows, slots], v_scale[rows, slots] = v8.view(torch.uint8), vs


@torch.library.custom_op("ghostvis::kv_store_fp8", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _kv_store_fp8(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  k_scale: torch.Tensor, v_scale: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor) -> None:
    """The Triton store as an op torch.compile keeps in its graph (declared as writing the cache in place)."""
    from ghostvis_core.kernels.kv_store_fp8_triton import kv_store_fp8_triton

    kv_store_fp8_triton(k, v, k_cache, v_cache, k_scale, v_scale, rows, starts)


@_kv_store_fp8.register_fake
def _(k, v, k_cache, v_cache, k_scale, v_scale, rows, starts) -> None:
    return None


def _check_kv_cache_name(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"--kv-cache-dtype {kv_cache_dtype!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")


def check_kv_cache_dtype(kv_cache_dtype: str, device: torch.device, decode_backend: str) -> None:
    """Refuse a cache storage this machine cannot decode from, with the fix (the one place for that rule)."""
    _check_kv_cache_name(kv_cache_dtype)
    if kv_cache_dtype != "fp8" or device.type != "cuda":
        return  # CPU: the SDPA path attends over the dequantized rows (slow, exact to the stored values)
    sm = torch.cuda.get_device_capability(device)
    if sm < FP8_MIN_SM:
        raise ConfigError(f"--kv-cache-dtype fp8 needs an sm89+ GPU (Ada, Hopper) for its decode kernel; this "
                          f"one is sm{sm[0]}{sm[1]}. Fix: drop --kv-cache-dtype (the cache stays in the model's "
                          f"dtype)")
    if decode_backend != "triton":
        raise ConfigError(f"--kv-cache-dtype fp8 decodes through the Triton decode kernel, but this run's plan "
                          f"decodes with {decode_backend} (the Triton kernel cannot serve it here: see `ghostvis "
                          f"doctor`). Fix: drop --kv-cache-dtype")


def fp8_cache_backends(decode: str, prefill: str, device: torch.device) -> tuple[str, str]:
    """The (decode, prefill) backends over an fp8 cache: the Triton decode kernel reads it directly; flash-attn
    writes only its own dtype, so prefill (and decode off CUDA) attend through SDPA over dequantized rows."""
    sdpa = "sdpa_efficient" if device.type == "cuda" else "sdpa_math"
    return (decode if decode == "triton" else sdpa,
            prefill if prefill in ("sdpa_efficient", "sdpa_math") else sdpa)  # fmt: skip


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
    """The compute dtype of keys and values (what attention returns); the storage is `storage`."""
    storage: str = "auto"
    """auto: k and v in `dtype`; fp8: e4m3 with per-token scales (module docstring)."""
    k: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    v: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    cache_seqlens: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    k_scale: torch.Tensor | None = field(default=None, repr=False)
    """fp8 storage: (L, B, S, K) fp32 scales of k (None otherwise); v_scale likewise."""
    v_scale: torch.Tensor | None = field(default=None, repr=False)
    batch_idx: torch.Tensor | None = field(default=None, repr=False)
    """int32 (n,): the rows of k/v this view writes and reads (a batched prefill into some rows of a running
    batch, see `rows`); None: rows 0..batch_size-1."""
    fresh: bool = False
    """Every row of this view starts empty (`rows`, and the row Engine.prefill empties: a prefill of new
    prompts), so its tokens attend only to each other. Over fp8 storage that prefill attends over its own new K/V
    through the plan's dense causal backend (flash-attn where the plan has it) and only stores them quantized,
    instead of attending over the dequantized cache (GPT.forward_with_cache)."""

    def __post_init__(self) -> None:
        shape = (self.n_layer, self.batch_size, self.max_len, self.n_kv_head, self.head_dim)
        _check_kv_cache_name(self.storage)
        if self.k is None:
            store = FP8 if self.storage == "fp8" else self.dtype
            self.k = torch.zeros(shape, dtype=store, device=self.device)
            self.v = torch.zeros(shape, dtype=store, device=self.device)
            if self.storage == "fp8":
                self.k_scale = torch.ones(shape[:-1], dtype=torch.float32, device=self.device)
                self.v_scale = torch.ones(shape[:-1], dtype=torch.float32, device=self.device)
        if self.cache_seqlens is None:
            self.cache_seqlens = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)

    def backend(self, new_tokens: int) -> str:
        """The attention backend for a call appending `new_tokens` per row: one token into every row is a decode
        step, anything else (several tokens, or a view of some rows) a prefill."""
        return self.decode_backend if new_tokens == 1 and self.batch_idx is None else self.prefill_backend

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache tensors (B, S, K, D) of layer i."""
        return self.k[i], self.v[i]

    def layer_scales(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """fp8 storage: the scales (B, S, K) of layer i's k and v; (None, None) otherwise."""
        if self.k_scale is None:
            return None, None
        return self.k_scale[i], self.v_scale[i]

    @property
    def nbytes(self) -> int:
        """Bytes the cache tensors hold (keys, values and fp8 scales)."""
        tensors = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.k_scale is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)
    @property
    def pos(self) -> int:
        """The longest row's length (a host sync: for checks and tests, never in the decode loop)."""
        return int(self.cache_seqlens.max().item())

    def row(self, b: int) -> KVCache:
        """A one-row view sharing storage: a prefill into it fills row b of this cache (continuous batching)."""
        return KVCache(
            self.n_layer, self.n_kv_head, self.head_dim, 1, self.max_len, self.device, self.decode_backend,
            self.prefill_backend, self.dtype, self.storage, self.k[:, b : b + 1], self.v[:, b : b + 1],
            self.cache_seqlens[b : b + 1], *self._scale_rows(slice(b, b + 1)),
        )  # fmt: skip

    def _scale_rows(self, rows: slice) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.k_scale is None:
            return None, None
        return self.k_scale[:, rows], self.v_scale[:, rows]

    def rows(self, idx: torch.Tensor) -> KVCache:
        """A view of rows idx (int32 (n,), on the device) with lengths of its own, all 0: a prefill of n prompts
        into those rows at once. The caller sets the batch's lengths of those rows afterwards (the prompts'
        true lengths when they were padded to one length; slots past a row's length are never attended)."""
        n = int(idx.numel())
        lens = torch.zeros(n, dtype=torch.int32, device=self.device)
        return KVCache(
            self.n_layer, self.n_kv_head, self.head_dim, n, self.max_len, self.device, self.decode_backend,
            self.prefill_backend, self.dtype, self.storage, self.k, self.v, lens, self.k_scale, self.v_scale, idx,
            fresh=True,
        )  # fmt: skip
