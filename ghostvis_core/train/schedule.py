"""Learning-rate schedule: linear warmup, constant, linear warmdown to zero (nanochat's shape).

The schedule is a multiplier on each param group's "initial_lr" (set by build_optimizer), so Muon and AdamW
groups with different base LRs follow the same curve. It is a pure function of the step, so resuming at step
k restores the schedule exactly with no scheduler state to save.
"""

from __future__ import annotations

import torch


def lr_multiplier(step: int, num_steps: int, warmup_steps: int, warmdown_frac: float) -> float:
    """LR multiplier for optimizer step `step` (0-based) of `num_steps`."""
    # warmup: (step+1)/warmup so the first step already moves; warmdown: linear from 1 at its start to 0 after
    # the last step. If the two overlap (short runs) the smaller multiplier wins.
    warmup = (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else 1.0
    num_warmdown = round(warmdown_frac * num_steps)
    warmdown_start = num_steps - num_warmdown
    warmdown = (num_steps - step) / num_warmdown if num_warmdown > 0 and step >= warmdown_start else 1.0
    return max(0.0, min(warmup, warmdown))


def apply_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Set each param group's lr to initial_lr * multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
