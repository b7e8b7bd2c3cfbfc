"""On a CUDA GPU: SIGKILL the trainer mid-step, resume with resume=auto, and the per-step losses equal an
uninterrupted run's bit for bit (run with `pytest -m gpu tests/test_resume_kill_gpu.py -s`).

Deterministic settings (the GPU counterpart of test_resume_kill.py's single-threaded CPU run):
- torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS picks one reduction
  order), cudnn.benchmark off (no timing-based kernel choice);
- compile=false (inductor's autotuning could pick different kernels in the two processes);
- bf16 autocast, the default GPU dtype, and the attention backend of each case pinned: auto (what the plan picks
  on this card), flex, and math. A backend whose backward accumulates with atomics (FlashAttention-2's dq) is
  not bitwise reproducible: the first assertion (two uninterrupted runs agree) names that before the kill test
  can be blamed.
Data order, loader position, RNG and optimizer state are restored exactly, as on the CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train_config import subprocess_env, tiny_config

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.train.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The trainer, in one process on cuda:0, with the deterministic switches set before anything runs.
DETERMINISTIC_TRAINER = (
    "import sys, torch; torch.use_deterministic_algorithms(True); torch.backends.cudnn.benchmark = False; "
    "from recipes.base_train import main; sys.exit(main(sys.argv[1:]))"
)
MODEL = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_kv_head": 2}
NUM_STEPS = 40
SAVE_EVERY = 5
KILL_AFTER_RECORDS = 12  # past the step-10 checkpoint, inside step 13


def _cfg(tmp_path, run, attn):
    model = dict(MODEL) if attn == "auto" else {**MODEL, "attn_backend": attn}
    return tiny_config(tmp_path, run=run, model=model, num_steps=NUM_STEPS, save_every=SAVE_EVERY, keep_last=2,
                       device_batch_size=8, pack_max_length=256, compile=False, dtype="bfloat16")


def _cmd(config_path):
    return [sys.executable, "-c", DETERMINISTIC_TRAINER, "--config", str(config_path)]


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def _train(tmp_path, env, run, attn):
    cfg = _cfg(tmp_path, run, attn)
    cfg.to_json(tmp_path / f"{run}.json")
    done = subprocess.run(_cmd(tmp_path / f"{run}.json"), env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg, done.stderr


@pytest.mark.parametrize("attn", ["auto", "flex", "math"])
def test_sigkill_mid_step_then_resume_auto_reproduces_the_uninterrupted_losses_on_gpu(tmp_path, attn):
    env = {**subprocess_env(tmp_path), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    env.pop("GHOSTVIS_ENV_PROFILE", None)
    full, log = _train(tmp_path, env, "full", attn)
    expected = _losses(full.run_dir)
    assert [s for s, _ in expected] == list(range(1, NUM_STEPS + 1))
    backends = [line for line in log.splitlines() if line.startswith(("Attention:", "Run:"))]
    again, _ = _train(tmp_path, env, "again", attn)
    assert _losses(again.run_dir) == expected, f"two uninterrupted runs differ with {backends}: not deterministic"

    killed = _cfg(tmp_path, "killed", attn)
    killed.to_json(tmp_path / "killed.json")
    proc = subprocess.Popen(_cmd(tmp_path / "killed.json"), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = killed.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(read_metrics(metrics)) >= KILL_AFTER_RECORDS):
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "not enough steps in time"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # the loop is inside the next step: forward, backward or optimizer
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(s for s, _ in _losses(killed.run_dir))
    assert KILL_AFTER_RECORDS <= killed_at < NUM_STEPS
    latest = ckpt.latest_checkpoint(killed.run_dir)
    ckpt.verify_checkpoint(latest)

    resumed = subprocess.run(_cmd(tmp_path / "killed.json"), env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {latest}" in resumed.stderr
    got = _losses(killed.run_dir)
    print(f"{torch.cuda.get_device_name(0)}, attn={attn} ({'; '.join(backends)}): killed after step {killed_at}, "
          f"resumed from {latest.name}; {len(got)} losses bitwise equal: {got == expected}; "
          f"final loss {expected[-1][1]:.6f}")
    assert got == expected  # exact float equality, step by step
