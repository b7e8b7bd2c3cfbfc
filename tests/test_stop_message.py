"""Ctrl-C (SIGINT) in a recipe: the "stopped by ...; resume with the same command" line is printed exactly once."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from test_train_config import recipe_cmd, subprocess_env, tiny_config

from ghostvis_core.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_sigint_stop_message_is_printed_once(tmp_path):
    cfg = tiny_config(tmp_path, num_steps=400, save_every=0)
    cfg.to_json(tmp_path / "cfg.json")
    proc = subprocess.Popen(recipe_cmd("recipes.base_train", tmp_path / "cfg.json"), env=subprocess_env(tmp_path),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(read_metrics(metrics)) >= 2):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]  # saved and stopped, but interrupted: a `&&` chain stops here
    assert (out + err).count("resume with the same command") == 1, out + err[-2000:]
    assert "stopped by SIGINT at step" in out
