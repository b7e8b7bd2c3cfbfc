"""SIGTERM in a recipe subprocess: finish the step, save, print how to resume, exit 0."""

from __future__ import annotations

import re
import signal

import pytest
from helpers import signal_after_metrics
from test_train_config import recipe_cmd, subprocess_env, tiny_config

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_sigterm_saves_a_checkpoint_at_the_stop_step_and_exits_zero(tmp_path):
    cfg = tiny_config(tmp_path, num_steps=400, save_every=0, keep_last=2)
    cfg.to_json(tmp_path / "cfg.json")
    metrics = cfg.run_dir / "metrics.jsonl"
    code, out, err = signal_after_metrics(
        recipe_cmd("recipes.base_train", tmp_path / "cfg.json"), subprocess_env(tmp_path), tmp_path, metrics,
        records=3, sig=signal.SIGTERM,
    )
    assert code == 0, err[-3000:]
    m = re.search(r"stopped by SIGTERM at step (\d+); resume with the same command", out)
    assert m, out + err[-2000:]
    step = int(m.group(1))
    assert 3 <= step < 400
    assert [s for s, _ in ckpt.list_checkpoints(cfg.run_dir)] == [step]
    assert ckpt.verify_checkpoint(cfg.run_dir / f"step_{step:06d}")["step"] == step
    assert max(r["step"] for r in read_metrics(metrics)) == step
