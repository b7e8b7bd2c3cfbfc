"""Resuming with another num_steps continues the LR schedule from the rate the run had (no jump up at the
seam), says so with the numbers, and the step log carries the real LR of every optimizer group."""

from __future__ import annotations

import pytest
from helpers import library_log
from test_train_config import tiny_config

from ghostvis_core.train.loop import train
from ghostvis_core.train.metrics import format_step_line, read_metrics
from ghostvis_core.train.schedule import LRSchedule, lr_multiplier, resume_schedule


def test_continuation_holds_then_warms_down_and_is_stable_under_a_second_resume():
    # a run planned for 10 steps (warmdown 0.4: the last 4) finished; resumed at 10 with num_steps=20
    last = lr_multiplier(9, 10, 0, 0.4)
    assert last == pytest.approx(0.25)
    sched, message = resume_schedule(20, 0, 0.4, resume_step=10, saved_multiplier=lr_multiplier(10, 10, 0, 0.4),
                                     last_multiplier=last)
    assert sched.continued and sched.num_warmdown == 8
    mults = [sched.multiplier(k) for k in range(10, 20)]
    # hold 0.25 for steps 10, 11, then 0.25 * (20 - k) / 8 for k >= 12
    assert mults == pytest.approx([0.25, 0.25, 0.25, 0.21875, 0.1875, 0.15625, 0.125, 0.09375, 0.0625, 0.03125])
    assert lr_multiplier(10, 20, 0, 0.4) == 1.0  # what the plain plan would have jumped to
    assert "hold x0.2500 to step 12, then warm down to 0 over the last 8 steps" in message
    # resuming the continued run at step 15 rebuilds the same curve
    again, _ = resume_schedule(20, 0, 0.4, resume_step=15, saved_multiplier=sched.multiplier(15),
                               last_multiplier=sched.multiplier(14))
    assert [again.multiplier(k) for k in range(15, 20)] == pytest.approx(mults[5:])


def test_unchanged_plan_resumes_the_plain_schedule():
    sched, message = resume_schedule(10, 2, 0.4, resume_step=4, saved_multiplier=lr_multiplier(4, 10, 2, 0.4),
                                     last_multiplier=lr_multiplier(3, 10, 2, 0.4))
    assert sched == LRSchedule(num_steps=10, warmup_steps=2, warmdown_frac=0.4) and message is None


def test_resume_with_more_steps_keeps_the_lr_continuous(tmp_path, caplog):
    first = tiny_config(tmp_path, num_steps=8, warmup_steps=2, warmdown_frac=0.5, save_every=0)
    train(first)
    with library_log(caplog):
        train(tiny_config(tmp_path, num_steps=16, warmup_steps=2, warmdown_frac=0.5, save_every=0))
    records = {r["step"]: r for r in read_metrics(first.run_dir / "metrics.jsonl")}
    mults = [records[s]["lr_mult"] for s in range(7, 17)]
    # step 8 (the last before the seam) ran at (8 - 7) / 4; the resumed steps hold it, then go down to 0
    assert mults[1] == pytest.approx(0.25)
    assert all(b <= a + 1e-12 for a, b in zip(mults[1:], mults[2:], strict=False))
    assert mults[2] == pytest.approx(0.25) and mults[-1] == pytest.approx(0.25 / 8)
    assert "the plan for num_steps=16 (warmup_steps=2, warmdown_frac=0.5) gives step 9 lr x1.0000" in caplog.text
    assert "its last step ran at x0.2500: continuing as if planned: hold x0.2500 to step 8" in caplog.text
    # every group's real rate = its configured rate x the multiplier (tiny_config: lr 3e-3 for every group)
    for s in (8, 9, 16):
        lrs = records[s]["lr"]
        assert lrs and all(v == pytest.approx(3e-3 * records[s]["lr_mult"]) for v in lrs.values()), lrs
    line = format_step_line(records[9], 16)
    assert "lr x0.250 (matrix 7.50e-04," in line


def test_step_line_without_rates_is_unchanged():
    record = {"step": 1, "loss": 2.0, "lr_mult": 0.5, "dt_ms": 10, "tok_per_s": 100.0, "mfu": None,
              "peak_mem_gib": 0.1, "eta_s": 1.0}
    assert "lr x0.500 | dt" in format_step_line(record, 10)
