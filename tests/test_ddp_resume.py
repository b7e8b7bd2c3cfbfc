"""2-rank DDP on CPU (gloo): SIGKILL every process mid-run, resume=auto on 2 ranks, compare with an uninterrupted run.

The resumed run's per-step losses equal the uninterrupted 2-rank run's bit for bit. Why bitwise holds: both runs
have the same layout (2 ranks, same per-rank batches), the data order is a pure function of (seed, rank,
position), each rank's loader position and RNG state are checkpointed per rank and restored, the LR schedule is a
function of the step, torch runs single-threaded (OMP_NUM_THREADS=1), and a 2-rank all-reduce is one addition
a + b, which is commutative in IEEE float, so the reduction order cannot differ between the runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from multirank import kill_after_checkpoint, losses, torchrun_cmd
from test_train_config import subprocess_env, tiny_config

from ghostvis_core import checkpoint as ckpt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc"),
]

NUM_STEPS = 16
KILL_AFTER = 8  # SIGKILL once step_000008 (a complete checkpoint: folders are renamed into place) exists


def test_two_rank_sigkill_then_resume_auto_reproduces_the_uninterrupted_losses(tmp_path):
    env = subprocess_env(tmp_path)  # GHOSTVIS_HOME under tmp_path, OMP_NUM_THREADS=1
    common = dict(num_steps=NUM_STEPS, device_batch_size=2, save_every=4, keep_last=0)
    full_cfg = tiny_config(tmp_path, run="full", **common)
    killed_cfg = tiny_config(tmp_path, run="killed", **common)
    full_cfg.to_json(tmp_path / "full.json")
    killed_cfg.to_json(tmp_path / "killed.json")

    done = subprocess.run(torchrun_cmd(tmp_path / "full.json"), env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = losses(full_cfg.run_dir)
    assert [s for s, _ in expected] == list(range(1, NUM_STEPS + 1))
    # the progress lines right-align the step ("step  8/24"): the regex allows the padding
    assert re.search(rf"step\s+{NUM_STEPS}/{NUM_STEPS}\b", done.stderr), done.stderr[-2000:]

    kill_after_checkpoint(tmp_path / "killed.json", env, tmp_path, killed_cfg.run_dir, KILL_AFTER)
    killed_at = max(s for s, _ in losses(killed_cfg.run_dir))
    assert KILL_AFTER <= killed_at < NUM_STEPS, "the run was killed mid-way"
    latest = ckpt.latest_checkpoint(killed_cfg.run_dir)
    resume_step = ckpt.verify_checkpoint(latest)["step"]  # what survived the SIGKILL is a complete checkpoint
    assert KILL_AFTER <= resume_step <= killed_at

    resumed = subprocess.run(torchrun_cmd(tmp_path / "killed.json"), env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # rank 0 logs where it resumed; ranks > 0 log warnings only, so their resume step is checked through
    # the per-rank loader positions below
    assert re.findall(r"Resuming from (\S+) \(step (\d+)\)", resumed.stderr) == [(str(latest), str(resume_step))]
    assert re.search(rf"step\s+{resume_step + 1}/{NUM_STEPS}\b", resumed.stderr), resumed.stderr[-2000:]

    got = losses(killed_cfg.run_dir)
    print(f"killed after step {killed_at}, resumed both ranks from {latest.name}; {len(got)} losses compared")
    assert got == expected  # exact float equality, step by step

    # Each rank's data position and RNG state at the end equal the uninterrupted run's: a rank that resumed at
    # another step (or not at all) would have consumed a different number of batches.
    final = f"step_{NUM_STEPS:06d}"
    end_full = json.loads((full_cfg.run_dir / final / "state.json").read_text())
    end_resumed = json.loads((killed_cfg.run_dir / final / "state.json").read_text())
    assert end_resumed["world_size"] == end_full["world_size"] == 2
    assert len(end_resumed["loader"]) == 2
    assert end_resumed["loader"] == end_full["loader"]
    # torch's generator is seeded from cfg.seed and checkpointed per rank, so it matches exactly; Python's and
    # numpy's are never seeded by the trainer (nothing in training draws from them), so they differ between
    # any two runs and are not compared
    assert [r["torch"] for r in end_resumed["rng"]] == [r["torch"] for r in end_full["rng"]]
    assert end_resumed["tokens_seen"] == end_full["tokens_seen"]
