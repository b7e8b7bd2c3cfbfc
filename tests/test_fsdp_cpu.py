"""FSDP2 (fully_shard per block + root) on CPU with gloo, 2 ranks under torchrun: losses, checkpoints, resume.

(a) Same config, same AdamW, same per-rank batches: FSDP's per-step losses equal DDP's within relative 1e-6
    (step 1 exactly: the same weights all-gathered and the same batch give the same forward). Not bitwise on
    later steps because the gradient-norm for clipping is summed in a different order (FSDP: per-shard sums of
    squares, then an all-reduce; DDP: one sum over each full gradient), so the clip coefficient and then every
    update differ in the last bits; measured max 8.8e-8 over 8 steps, the tolerance leaves 10x headroom.
(b) An FSDP checkpoint is the same full model.safetensors / optimizer.pt a DDP run writes (same keys, shapes,
    dtypes; it loads into a plain, unwrapped GPT) and its tensors equal the DDP run's at the same step within
    an absolute 1e-5 (weights move O(lr) = 3e-3 per Adam step; measured max 8.5e-7, in a hidden matrix: Adam
    normalises each update, so last-bit gradient differences in near-zero entries grow to a fraction of lr).
(c) SIGKILL an FSDP run after a checkpoint, resume=auto on 2 ranks: the losses equal the uninterrupted FSDP
    run's bit for bit, with the default optimizer (Muon on the sharded matrices + AdamW), so the sharded Muon
    momentum and Adam moments round-trip through the full-tensor checkpoint. Bitwise for the reasons given in
    test_ddp_resume.py (same layout, checkpointed data position and RNG per rank, OMP_NUM_THREADS=1, a 2-rank
    reduction is one commutative addition).
(d) The checkpoint format does not depend on the layout: FSDP resumes a DDP checkpoint and continues with
    DDP's losses (within the tolerance of (a)).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multirank import kill_after_checkpoint, losses, torchrun_cmd
from plans import cpu_plan
from test_train_config import subprocess_env, tiny_config

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.config import GPTConfig, OptimizerConfig
from ghostvis_core.gpt import GPT
from ghostvis_core.train.metrics import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc"),
]

REL_TOL_LOSS = 1e-6
ABS_TOL_WEIGHTS = 1e-5
STEPS = 8


def _run(config: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(torchrun_cmd(config), env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def ddp_and_fsdp(tmp_path_factory):
    """One 2-rank DDP run and one 2-rank FSDP run of the same config with AdamW (checkpoints at 4 and 8)."""
    tmp_path = tmp_path_factory.mktemp("fsdp_vs_ddp")
    env = subprocess_env(tmp_path)  # GHOSTVIS_HOME under tmp_path, OMP_NUM_THREADS=1
    common = dict(num_steps=STEPS, device_batch_size=2, save_every=4, optim=OptimizerConfig(backend="adamw", lr=3e-3))
    cfgs = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        cfg = tiny_config(tmp_path, run=name, fsdp=fsdp, **common)
        cfg.to_json(tmp_path / f"{name}.json")
        done = _run(tmp_path / f"{name}.json", env, tmp_path)
        assert "2 rank(s)" in done.stderr and "Using optimizer backend: torch AdamW" in done.stderr
        cfgs[name] = cfg
    return cfgs["ddp"], cfgs["fsdp"]


def test_fsdp_losses_match_ddp(ddp_and_fsdp):
    ddp, fsdp = ddp_and_fsdp
    a = read_metrics(ddp.run_dir / "metrics.jsonl")
    b = read_metrics(fsdp.run_dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert a[0]["loss"] == b[0]["loss"]
    rel = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b, strict=True)]
    print("relative loss difference per step, DDP vs FSDP:", " ".join(f"{r:.1e}" for r in rel))
    assert max(rel) <= REL_TOL_LOSS
    # the clipping norm is gathered over shards: the same number up to summation order
    for x, y in zip(a, b, strict=True):
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    assert b[-1]["loss"] < b[0]["loss"] - 0.5  # it trains


@pytest.mark.parametrize("step", [4, STEPS])
def test_fsdp_checkpoint_is_a_full_state_equal_to_ddp(ddp_and_fsdp, step):
    ddp, fsdp = ddp_and_fsdp
    name = ckpt.step_dir_name(step)
    ddp_dir, fsdp_dir = ddp.run_dir / name, fsdp.run_dir / name
    assert ckpt.verify_checkpoint(fsdp_dir)["world_size"] == 2
    ours, theirs = ckpt.load_model_state(fsdp_dir), ckpt.load_model_state(ddp_dir)
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for key, ref in theirs.items():
        got = ours[key]
        assert type(got) is torch.Tensor and got.shape == ref.shape and got.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=ABS_TOL_WEIGHTS, rtol=0)
        worst = max(worst, (got - ref).abs().max().item())
    print(f"step {step}: max |FSDP - DDP| weight difference {worst:.1e}")
    # a plain (unwrapped, unsharded) model takes it as is
    model_config = GPTConfig.from_dict(ckpt.read_state(fsdp_dir)["model_config"])
    GPT(model_config, cpu_plan(model_config)).load_state_dict(ours, strict=True)

    # optimizer.pt: DDP's format (index-keyed torch state per inner optimizer), full tensors, same values
    opt_ours, opt_theirs = ckpt.load_optimizer_state(fsdp_dir), ckpt.load_optimizer_state(ddp_dir)
    assert opt_ours["kinds"] == opt_theirs["kinds"] == ["AdamW"]
    for sd_ours, sd_theirs in zip(opt_ours["optimizers"], opt_theirs["optimizers"], strict=True):
        assert [g["params"] for g in sd_ours["param_groups"]] == [g["params"] for g in sd_theirs["param_groups"]]
        assert sorted(sd_ours["state"]) == sorted(sd_theirs["state"])
        for index, entries in sd_theirs["state"].items():
            for key, ref in entries.items():
                got = sd_ours["state"][index][key]
                assert type(got) is torch.Tensor and got.shape == ref.shape
                if key == "step":
                    assert got.item() == ref.item() == step
                else:  # Adam moments: first ~(1-beta1) g, second ~(1-beta2) g^2; both tiny and close
                    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-3)


def test_fsdp_sigkill_then_resume_auto_reproduces_the_uninterrupted_losses(tmp_path):
    num_steps, kill_after = 12, 4
    env = subprocess_env(tmp_path)
    common = dict(num_steps=num_steps, device_batch_size=2, save_every=4, keep_last=0, fsdp=True)
    full_cfg = tiny_config(tmp_path, run="full", **common)  # optimizer auto: Muon + AdamW on this torch
    killed_cfg = tiny_config(tmp_path, run="killed", **common)
    full_cfg.to_json(tmp_path / "full.json")
    killed_cfg.to_json(tmp_path / "killed.json")

    done = _run(tmp_path / "full.json", env, tmp_path)
    assert "Muon" in done.stderr
    expected = losses(full_cfg.run_dir)
    assert [s for s, _ in expected] == list(range(1, num_steps + 1))

    kill_after_checkpoint(tmp_path / "killed.json", env, tmp_path, killed_cfg.run_dir, kill_after)
    killed_at = max(s for s, _ in losses(killed_cfg.run_dir))
    assert kill_after <= killed_at < num_steps, "the run was killed mid-way"
    latest = ckpt.latest_checkpoint(killed_cfg.run_dir)
    resume_step = ckpt.verify_checkpoint(latest)["step"]
    assert kill_after <= resume_step <= killed_at

    resumed = _run(tmp_path / "killed.json", env, tmp_path)
    assert re.findall(r"Resuming from (\S+) \(step (\d+)\)", resumed.stderr) == [(str(latest), str(resume_step))]
    got = losses(killed_cfg.run_dir)
    print(f"killed after step {killed_at}, resumed both FSDP ranks from {latest.name}; {len(got)} losses compared")
    assert got == expected  # exact float equality, step by step
    final = ckpt.step_dir_name(num_steps)
    end_full, end_resumed = ckpt.read_state(full_cfg.run_dir / final), ckpt.read_state(killed_cfg.run_dir / final)
    assert end_resumed["loader"] == end_full["loader"] and end_resumed["tokens_seen"] == end_full["tokens_seen"]


def test_fsdp_resumes_a_ddp_checkpoint(ddp_and_fsdp, tmp_path):
    """Checkpoints do not depend on the layout: FSDP continues DDP's step-4 checkpoint with DDP's losses."""
    ddp, _ = ddp_and_fsdp
    cfg = tiny_config(tmp_path, run="fsdp_from_ddp", fsdp=True, num_steps=STEPS, device_batch_size=2, save_every=4,
                      optim=OptimizerConfig(backend="adamw", lr=3e-3), resume=str(ddp.run_dir / "step_000004"))
    cfg.to_json(tmp_path / "cfg.json")
    done = _run(tmp_path / "cfg.json", subprocess_env(tmp_path), tmp_path)
    assert "Resuming from" in done.stderr
    got = read_metrics(cfg.run_dir / "metrics.jsonl")
    want = read_metrics(ddp.run_dir / "metrics.jsonl")[4:]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(5, STEPS + 1))
    for x, y in zip(want, got, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=REL_TOL_LOSS)
