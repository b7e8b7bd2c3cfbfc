"""The train loop in-process on CPU: outputs, resume from a PATH (bitwise), NaN / OOM aborts, bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import poison_loss_at
from helpers import tree_hashes as _hashes
from test_train_config import tiny_config

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.errors import CheckpointError, ConfigError, TrainingAborted
from ghostvis_core.train import loop
from ghostvis_core.train.loop import train
from ghostvis_core.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)




def test_run_writes_checkpoints_metrics_plot_and_resumes_bitwise_from_a_path(tmp_path):
    cfg = tiny_config(tmp_path)
    result = train(cfg)
    run = cfg.run_dir
    assert result.step == 12 and result.checkpoint == run / "step_000012"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 8, 12]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["run"] == "tiny" and config["model"]["n_layer"] == 2
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "dt_ms", "tok_per_s", "mfu", "peak_mem_gib", "eta_s", "lr_mult"):
        assert key in records[0]
    assert records[0]["mfu"] is None  # CPU: no peak to compare against
    # a new run resumed from step 4 of the first one replays steps 5..12 bit for bit
    resumed = train(tiny_config(tmp_path, run="branch", resume=str(run / "step_000004")))
    assert resumed.losses == result.losses[4:]


def test_nan_loss_aborts_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, num_steps=8)
    poison_loss_at(monkeypatch, loop, 6)
    with pytest.raises(TrainingAborted) as err:
        train(cfg)
    assert "loss is nan at step 6" in str(err.value) and "step_000004" in str(err.value)
    assert [s for s, _ in ckpt.list_checkpoints(cfg.run_dir)] == [4]
    before = _hashes(cfg.run_dir / "step_000004")
    state = ckpt.verify_checkpoint(cfg.run_dir / "step_000004")  # manifest sha256 still matches
    assert state["step"] == 4 and _hashes(cfg.run_dir / "step_000004") == before


def test_out_of_memory_names_the_flags_to_lower(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, num_steps=6)

    def oom(model, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "forward_sum", oom)
    with pytest.raises(TrainingAborted) as err:
        train(cfg)
    text = str(err.value)
    assert "--device-batch-size 4" in text and "--pack-max-length 32" in text and "accumulation" in text


def test_damaged_latest_checkpoint_refuses_to_resume_and_changes_nothing(tmp_path):
    cfg = tiny_config(tmp_path, num_steps=8)
    train(cfg)
    latest = cfg.run_dir / "step_000008"
    (latest / "state.json").write_text("{not json")
    before = _hashes(cfg.run_dir)
    with pytest.raises(CheckpointError) as err:
        train(tiny_config(tmp_path, num_steps=12))
    assert str(latest) in str(err.value) and "step_000004" in str(err.value)
    assert _hashes(cfg.run_dir) == before
    with pytest.raises(CheckpointError, match="--run"):
        train(tiny_config(tmp_path, num_steps=12, resume="none"))
    assert _hashes(cfg.run_dir) == before


def test_batch_that_does_not_divide_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="total_batch_size=100"):
        train(tiny_config(tmp_path, total_batch_size=100))
    assert not (tmp_path / "runs").exists()
