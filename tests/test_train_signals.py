"""SIGTERM in a recipe subprocess: finish the step, save, print how to resume, exit 0."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from test_train_config import recipe_cmd, subprocess_env, tiny_config

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_sigterm_saves_a_checkpoint_at_the_stop_step_and_exits_zero(tmp_path):
    cfg = tiny_config(tmp_path, num_steps=400, save_every=0, keep_last=2)
    cfg.to_json(tmp_path / "cfg.json")
    proc = subprocess.Popen(recipe_cmd("recipes.base_train", tmp_path / "cfg.json"), env=subprocess_env(tmp_path),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(read_metrics(metrics)) >= 3):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    m = re.search(r"stopped by SIGTERM at step (\d+); resume with the same command", out)
    assert m, out + err[-2000:]
    step = int(m.group(1))
    assert 3 <= step < 400
    assert [s for s, _ in ckpt.list_checkpoints(cfg.run_dir)] == [step]
    assert ckpt.verify_checkpoint(cfg.run_dir / f"step_{step:06d}")["step"] == step
    assert max(r["step"] for r in read_metrics(metrics)) == step
