"""Sampling on the device: greedy, temperature, top-k, top-p, with a per-request seed and no host sync.

Randomness is counter-based: the noise for the token a row draws at position p comes from a hash of (the
request's seed, p, the vocabulary index), not from a generator's running state. So a request's sampled tokens
depend only on its seed and its own logits, never on which other requests share the batch or in which row or
order it runs, and the whole step (noise included) is capturable in a CUDA graph. What still differs across
batch compositions is floating point: batched GEMMs may round differently from one-row ones, so a bf16 logit
that ties or nearly ties can flip a pick (in fp32 on CPU the tests see identical tokens).

Sampling from softmax(z / T) is argmax(z / T + g) with g standard Gumbel noise (the Gumbel-max trick), which
needs no multinomial (a host-synchronising, non-capturable kernel on some builds) and no sort when top-p is off.

Each row of a batch samples with its own parameters (RowSampling: device tensors the captured step reads), so
requests with different temperatures, top-k/top-p and seeds share one decode step; a greedy row takes the
plain argmax whatever its neighbours do, so its tokens are the same as in an all-greedy batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ghostvis_core.errors import ConfigError

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How a request picks its tokens (for `generate_many`, every request of the call).

    temperature 0 is greedy; top_k None / top_p 1.0 keep every token. In generate_many request i samples with
    seed `seed + i` (its index in the prompt list), so its output is the same alone or in any batch. stop:
    strings that end a reply (not included in it); ignore_eos generates max_tokens whatever the model says
    (benchmarks).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:
            raise ConfigError(f"--temperature must be a finite number >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k must be >= 1 (got {self.top_k}); leave it out to sample from every token")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1] (got {self.top_p}); 1 keeps every token")
        if any(not s for s in self.stop):
            raise ConfigError("--stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, Wellons) on int64 tensors holding values < 2^32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds_B: torch.Tensor, positions_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) float32 (B, V) from (seed, position, token index) alone: the same numbers on every device."""
    col = torch.arange(vocab, device=seeds_B.device, dtype=torch.int64)
    h = _mix32((seeds_B.to(torch.int64) & _MASK32) ^ 0x9E3779B9)
    h = _mix32(h ^ (positions_B.to(torch.int64) & _MASK32))
    h = _mix32(h[:, None] ^ col[None, :])
    # 24 high bits -> (0, 1): +0.5 keeps log(u) finite at both ends.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def filter_logits(
    logits_BV: torch.Tensor, top_k: int | None | torch.Tensor, top_p: float | torch.Tensor
) -> torch.Tensor:
    """Logits with every token outside the top k, or outside the smallest set holding top_p of the
    probability (always keeping the most likely token), set to -inf.

    top_k / top_p: one value for every row, or a tensor (B,) of per-row values (top_k >= V and top_p = 1
    keep every token), so rows of one batch can filter differently in one captured step.
    """
    B, V = logits_BV.shape
    k_B = _per_row(V if top_k is None else top_k, B, torch.int64, logits_BV.device).clamp(1, V)
    p_B = _per_row(top_p, B, torch.float32, logits_BV.device)
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    kth_B1 = sorted_BV.gather(-1, k_B[:, None] - 1)  # ties with the k-th value are kept, as topk-masking does
    sorted_BV = sorted_BV.masked_fill(sorted_BV < kth_B1, float("-inf"))
    probs = torch.softmax(sorted_BV, dim=-1)
    # mass before this token already > p; rows with p = 1 drop nothing (a cumsum may round past 1)
    drop_sorted = ((torch.cumsum(probs, dim=-1) - probs) > p_B[:, None]) & (p_B < 1.0)[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order_BV, drop_sorted)
    return logits_BV.masked_fill(drop | (logits_BV < kth_B1), float("-inf"))


def _per_row(value, B: int, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.full((B,), value, dtype=dtype, device=device)


SAMPLING_MODES = ("greedy", "sample", "filter")
"""What one decode step computes, cheapest first: argmax only; Gumbel noise (some row samples); noise after
the top-k/top-p filter (a full sort: some sampled row filters). A step of a mode serves every row of the
modes before it, so a batch runs the most demanding mode among its rows."""


def sampling_mode(sampling: SamplingParams) -> str:
    """The cheapest mode (SAMPLING_MODES) that serves a request sampling this way."""
    if sampling.greedy:
        return "greedy"
    return "filter" if sampling.top_k is not None or sampling.top_p < 1.0 else "sample"


def batch_mode(modes) -> str:
    """The mode a batch of rows with these modes runs (the most demanding one)."""
    return max(modes, key=SAMPLING_MODES.index, default="greedy")


@dataclass
class RowSampling:
    """Per-row sampling parameters on the device (B,): what one captured decode step reads for every row.

    temperature 0 = greedy row; top_k V = off; top_p 1 = off; seed = the request's seed. `set_row` writes
    one row in place (the tensors never move, so a graph captured over them stays valid).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, device) -> RowSampling:
        zeros = lambda dtype: torch.zeros(batch_size, dtype=dtype, device=device)  # noqa: E731
        return cls(zeros(torch.float32), zeros(torch.int64), torch.ones(batch_size, device=device),
                   zeros(torch.int64))  # fmt: skip

    def set_row(self, b: int, sampling: SamplingParams, vocab: int) -> None:
        self.temperature[b] = sampling.temperature
        self.top_k[b] = vocab if sampling.top_k is None else min(sampling.top_k, vocab)
        self.top_p[b] = sampling.top_p
        self.seeds[b] = sampling.seed

    def rows(self, index: slice | torch.Tensor) -> RowSampling:
        """Some rows: a view for a slice, a copy for an index tensor."""
        return RowSampling(self.temperature[index], self.top_k[index], self.top_p[index], self.seeds[index])


def sample_rows(logits_BV: torch.Tensor, rows: RowSampling, positions_B: torch.Tensor, mode: str) -> torch.Tensor:
    """Next token per row (B,) int64 with each row's own parameters, on the logits' device, no host sync.

    positions_B: the position each drawn token will take (its row's length), the counter of the noise. A
    greedy row takes argmax(logits) in every mode, so its tokens are the same whatever its neighbours do.
    """
    greedy_B = logits_BV.argmax(dim=-1)
    if mode == "greedy":
        return greedy_B
    is_greedy = rows.temperature == 0
    temperature = torch.where(is_greedy, torch.ones_like(rows.temperature), rows.temperature)
    z = logits_BV.float() / temperature[:, None]
    if mode == "filter":
        z = filter_logits(z, rows.top_k, rows.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(rows.seeds, positions_B, z.shape[-1])))
    return torch.where(is_greedy, greedy_B, (z + gumbel).argmax(dim=-1))
