"""LR schedule: linear warmup, flat, linear warmdown; applied as a multiplier on each group's initial_lr."""

from __future__ import annotations

import pytest
import torch

from ghostvis_core.train.schedule import apply_lr, lr_multiplier


def test_warmup_flat_warmdown_values():
    mults = [lr_multiplier(s, num_steps=10, warmup_steps=2, warmdown_frac=0.4) for s in range(10)]
    # warmup (s+1)/2 for s<2; warmdown over the last 4 steps: (10 - s) / 4 for s >= 6
    assert mults == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert lr_multiplier(3, num_steps=10, warmup_steps=0, warmdown_frac=0.0) == 1.0


def test_overlapping_warmup_and_warmdown_take_the_smaller():
    # 4 steps, 4 warmup steps, all warmdown: min((s+1)/4, (4-s)/4)
    mults = [lr_multiplier(s, 4, 4, 1.0) for s in range(4)]
    assert mults == pytest.approx([0.25, 0.5, 0.5, 0.25])


def test_apply_lr_scales_initial_lr_per_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 0.02}])
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    apply_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.01])
    apply_lr(opt, 1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.02])
