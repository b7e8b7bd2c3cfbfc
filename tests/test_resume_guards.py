"""Resuming never mixes two histories: another run's checkpoint, another recipe or another preset is refused
with one clear message, and the run folder is byte-identical afterwards."""

from __future__ import annotations

import pytest
from helpers import tree_hashes as snapshot
from test_train_config import tiny_config

from ghostvis_core.errors import CheckpointError
from ghostvis_core.train.loop import train


@pytest.fixture
def two_runs(tmp_path):
    """Run 'x' with checkpoints at steps 2 and 4, run 'y' with one at step 2."""
    x = tiny_config(tmp_path, run="x", num_steps=4, save_every=2)
    train(x)
    y = tiny_config(tmp_path, run="y", num_steps=2, save_every=2)
    train(y)
    return x, y


def test_resume_from_another_runs_checkpoint_into_a_run_with_checkpoints_is_refused(two_runs, tmp_path):
    x, y = two_runs
    before = snapshot(x.run_dir)
    cfg = tiny_config(tmp_path, run="x", num_steps=6, save_every=2, resume=str(y.run_dir / "step_000002"))
    with pytest.raises(CheckpointError, match="belongs to another run.*--run NAME"):
        train(cfg)
    assert snapshot(x.run_dir) == before
    # into a new run it is allowed: that run starts its own history from y's weights and position
    fresh = tiny_config(tmp_path, run="z", num_steps=3, resume=str(y.run_dir / "step_000002"))
    assert train(fresh).step == 3


@pytest.mark.parametrize("field, value", [("recipe", "chat_sft"), ("preset", "small")])
def test_resume_with_another_recipe_or_preset_is_refused(two_runs, tmp_path, field, value):
    x, _ = two_runs
    before = snapshot(x.run_dir)
    cfg = tiny_config(tmp_path, run="x", num_steps=6, **{field: value})
    with pytest.raises(CheckpointError, match=f"trained with {field} .*start a new run with --run NAME"):
        train(cfg)
    assert snapshot(x.run_dir) == before
