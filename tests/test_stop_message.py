"""Ctrl-C (SIGINT) in a recipe: the "stopped by ...; resume with the same command" line is printed exactly once."""

from __future__ import annotations

import signal

import pytest
from helpers import signal_after_metrics
from test_train_config import recipe_cmd, subprocess_env, tiny_config

pytestmark = pytest.mark.slow


def test_sigint_stop_message_is_printed_once(tmp_path):
    cfg = tiny_config(tmp_path, num_steps=400, save_every=0)
    cfg.to_json(tmp_path / "cfg.json")
    code, out, err = signal_after_metrics(
        recipe_cmd("recipes.base_train", tmp_path / "cfg.json"), subprocess_env(tmp_path), tmp_path,
        cfg.run_dir / "metrics.jsonl", records=2, sig=signal.SIGINT,
    )
    assert code == 130, err[-3000:]  # saved and stopped, but interrupted: a `&&` chain stops here
    assert (out + err).count("resume with the same command") == 1, out + err[-2000:]
    assert "stopped by SIGINT at step" in out
