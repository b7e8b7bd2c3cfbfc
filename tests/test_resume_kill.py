"""SIGKILL mid-run, then resume=auto: the per-step losses equal an uninterrupted run's, bit for bit (CPU).

Why bitwise holds: the data order is a pure function of (seed, position), the loader position, RNG states and
optimizer state are restored exactly, the LR schedule is a function of the step, and the subprocesses run torch
single-threaded (OMP_NUM_THREADS=1) so every reduction happens in the same order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from test_train_config import recipe_cmd, subprocess_env, tiny_config

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def test_sigkill_then_resume_auto_reproduces_the_uninterrupted_losses(tmp_path):
    env = subprocess_env(tmp_path)
    full_cfg = tiny_config(tmp_path, run="full", num_steps=30, save_every=4, keep_last=2)
    killed_cfg = tiny_config(tmp_path, run="killed", num_steps=30, save_every=4, keep_last=2)
    full_cfg.to_json(tmp_path / "full.json")
    killed_cfg.to_json(tmp_path / "killed.json")
    # the tokenizer is trained once into GHOSTVIS_HOME by the first run; both runs then share it
    done = subprocess.run(recipe_cmd("recipes.base_train", tmp_path / "full.json"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _losses(full_cfg.run_dir)
    assert [s for s, _ in expected] == list(range(1, 31))

    proc = subprocess.Popen(recipe_cmd("recipes.base_train", tmp_path / "killed.json"), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (killed_cfg.run_dir / "step_000008").is_dir():
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint at step 8 in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(s for s, _ in _losses(killed_cfg.run_dir))
    assert killed_at < 30, "the run was killed mid-way"
    latest = ckpt.latest_checkpoint(killed_cfg.run_dir)
    ckpt.verify_checkpoint(latest)  # what survived a SIGKILL is a complete checkpoint

    resumed = subprocess.run(recipe_cmd("recipes.base_train", tmp_path / "killed.json"), env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {latest}" in resumed.stderr
    got = _losses(killed_cfg.run_dir)
    print(f"killed after step {killed_at}, resumed from {latest.name}; {len(got)} losses compared")
    assert got == expected  # exact float equality, step by step
