"""Sampling on the device: greedy, temperature, top-k, top-p, with a per-request seed and no host sync.

Randomness is counter-based: the noise for the token a row draws at position p comes from a hash of (the
request's seed, p, the vocabulary index), not from a generator's running state. So a request's sampled tokens
depend only on its seed and its own logits, never on which other requests share the batch or in which row or
order it runs, and the whole step (noise included) is capturable in a CUDA graph. What still differs across
batch compositions is floating point: batched GEMMs may round differently from one-row ones, so a bf16 logit
that ties or nearly ties can flip a pick (in fp32 on CPU the tests see identical tokens).

Sampling from softmax(z / T) is argmax(z / T + g) with g standard Gumbel noise (the Gumbel-max trick), which
needs no multinomial (a host-synchronising, non-capturable kernel on some builds) and no sort when top-p is off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ghostvis_core.errors import ConfigError

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How every request of a `generate_many` call picks its tokens.

    temperature 0 is greedy; top_k None / top_p 1.0 keep every token. Request i samples with seed `seed + i`
    (its index in the prompt list), so its output is the same alone or in any batch. stop: strings that end a
    reply (not included in it); ignore_eos generates max_tokens whatever the model says (benchmarks).
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


def filter_logits(logits_BV: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Logits with every token outside the top k, or outside the smallest set holding top_p of the
    probability (always keeping the most likely token), set to -inf."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) > top_p  # mass before this token already > p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def sample_next(
    logits_BV: torch.Tensor, sampling: SamplingParams, seeds_B: torch.Tensor, positions_B: torch.Tensor
) -> torch.Tensor:
    """Next token per row (B,) int64, on the logits' device, without a host sync.

    positions_B: the position each drawn token will take (its row's length), the counter of the noise.
    """
    if sampling.greedy:
        return logits_BV.argmax(dim=-1)
    z = filter_logits(logits_BV.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds_B, positions_B, z.shape[-1])))
    return (z + gumbel).argmax(dim=-1)
