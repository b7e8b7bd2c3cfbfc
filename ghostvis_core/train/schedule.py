"""Learning-rate schedule: linear warmup, constant, linear warmdown to zero (nanochat's shape).

The schedule is a multiplier on each param group's "initial_lr" (set by build_optimizer), so Muon and AdamW
groups with different base LRs follow the same curve. It is a pure function of the step, so resuming at step
k restores the schedule exactly with no scheduler state to save. A resume whose settings change the plan
(a larger num_steps after warmdown would restart the LR at full strength) continues from the rate the
checkpoint recorded instead (LRSchedule), and says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

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


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate each param group runs with now, by its "name" (first group of a name wins)."""
    lrs: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        lrs.setdefault(str(group.get("name", f"group{i}")), float(group["lr"]))
    return lrs


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """The run's multiplier per step: lr_multiplier's plan, or, after a resume that changed the plan (another
    num_steps, warmup or warmdown), its continuation from the rate of the last step the checkpoint ran.

    Continuation (a = the last step run before the resume, m_a = its multiplier, N = num_steps,
    W = min(round(warmdown_frac * N), N - a) warmdown steps):
        m(k) = m_a                   for a <= k < N - W   (hold the rate the run had; no new warmup)
        m(k) = m_a * (N - k) / W     for k >= N - W       (linear to 0 after the last step)
    so the rate never goes up at the seam, and resuming it again at any later step (anchored at that
    checkpoint's last step) rebuilds the same curve.
    """

    num_steps: int
    warmup_steps: int
    warmdown_frac: float
    anchor_step: int | None = None
    """a: the last step run before the resume (None = the plain plan)."""
    anchor_multiplier: float | None = None
    """m_a: its multiplier."""

    @property
    def continued(self) -> bool:
        """True when the continuation replaces the plain plan."""
        return self.anchor_step is not None

    @property
    def num_warmdown(self) -> int:
        """W: warmdown steps of the continuation (of the plain plan when not continued)."""
        planned = round(self.warmdown_frac * self.num_steps)
        return min(planned, self.num_steps - self.anchor_step) if self.continued else planned

    def multiplier(self, step: int) -> float:
        """LR multiplier for optimizer step `step` (0-based)."""
        if not self.continued:
            return lr_multiplier(step, self.num_steps, self.warmup_steps, self.warmdown_frac)
        m_a, w = float(self.anchor_multiplier), self.num_warmdown
        if w <= 0 or step < self.num_steps - w:
            return m_a
        return max(0.0, m_a * (self.num_steps - step) / w)


def resume_schedule(num_steps: int, warmup_steps: int, warmdown_frac: float, resume_step: int | None = None,
                    saved_multiplier: float | None = None,
                    last_multiplier: float | None = None) -> tuple[LRSchedule, str | None]:
    """The schedule of a run resumed at `resume_step`, and the log line when it is continued.

    `saved_multiplier`: what the checkpoint's plan gave step `resume_step` (state.json); when the plan for
    these settings gives another value there, the plan changed, and the run continues from `last_multiplier`
    (the rate its last step ran at, from the optimizer state) instead of jumping.
    """
    plain = LRSchedule(num_steps=num_steps, warmup_steps=warmup_steps, warmdown_frac=warmdown_frac)
    if resume_step is None or resume_step < 1 or saved_multiplier is None or last_multiplier is None:
        return plain, None
    planned = plain.multiplier(resume_step)
    if math.isclose(planned, saved_multiplier, rel_tol=1e-9, abs_tol=1e-12):
        return plain, None
    continued = dataclasses.replace(plain, anchor_step=resume_step - 1, anchor_multiplier=float(last_multiplier))
    w = continued.num_warmdown
    message = (
        f"LR schedule: the plan for num_steps={num_steps} (warmup_steps={warmup_steps}, warmdown_frac="
        f"{warmdown_frac}) gives step {resume_step + 1} lr x{planned:.4f}, the checkpoint's plan x"
        f"{saved_multiplier:.4f}, and its last step ran at x{last_multiplier:.4f}: continuing as if planned: "
        f"hold x{last_multiplier:.4f} to step {num_steps - w}, then warm down to 0 over the last {w} steps "
        "(start a new run with init_from= for a fresh schedule)"
    )
    return continued, message
