"""Checkpoints: atomic layout, manifest verification, tied weights, weights_only optimizer state, pruning,
resume resolution, and clear errors that leave every file byte-identical."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tree_hashes as _hashes
from plans import cpu_gpt, cpu_optimizer, cpu_plan

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.config import GPTConfig, OptimizerConfig
from ghostvis_core.errors import CheckpointError
from ghostvis_core.gpt import GPT


def _tied_model_and_optimizer():
    torch.manual_seed(0)
    model = cpu_gpt(GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, vocab_size=101, sequence_len=32,
                          tie_embeddings=True))
    opt, _ = cpu_optimizer(model, OptimizerConfig(lr=1e-2))
    ids = torch.randint(0, 101, (2, 16))
    model(ids, ids).backward()
    opt.step()
    return model, opt


def _save(run_dir: Path, step: int, model, opt, keep_last: int = 0) -> Path:
    return ckpt.save_checkpoint(run_dir, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                                state={"tokens_seen": step * 10, "model_config": model.config.to_dict()},
                                keep_last=keep_last)




def test_round_trip_with_tied_weights_and_weights_only_optimizer(tmp_path):
    model, opt = _tied_model_and_optimizer()
    path = _save(tmp_path, 7, model, opt)
    assert path.name == "step_000007" and sorted(p.name for p in path.iterdir()) == [
        "model.safetensors", "optimizer.pt", "state.json"]
    state = ckpt.verify_checkpoint(path)
    assert state["step"] == 7 and state["tokens_seen"] == 70
    assert set(state["manifest"]) == {"model.safetensors", "optimizer.pt"}
    # optimizer.pt loads with weights_only=True (no arbitrary unpickling)
    torch.load(path / "optimizer.pt", weights_only=True)

    fresh = GPT(model.config, cpu_plan(model.config))
    fresh.load_state_dict(ckpt.load_model_state(path), strict=True)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied after loading
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fresh_opt, _ = cpu_optimizer(fresh, OptimizerConfig(lr=1e-2))
    fresh_opt.load_state_dict(ckpt.load_optimizer_state(path))
    a, b = opt.state_dict(), fresh_opt.state_dict()
    for sa, sb in zip(a["optimizers"], b["optimizers"], strict=True):
        for k in sa["state"]:
            for key, value in sa["state"][k].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][k][key]))


def test_truncated_model_file_is_a_clear_error_and_changes_nothing(tmp_path):
    model, opt = _tied_model_and_optimizer()
    _save(tmp_path, 4, model, opt)
    latest = _save(tmp_path, 8, model, opt)
    model_file = latest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    before = _hashes(tmp_path)
    with pytest.raises(CheckpointError) as err:
        ckpt.verify_checkpoint(latest)
    text = str(err.value)
    assert str(latest) in text and "model.safetensors" in text and "truncated" in text
    assert "--resume" in text and "step_000004" in text and "--resume none" in text
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("damage", ["garbage", "missing_manifest", "deleted", "flipped_byte"])
def test_corrupted_state_or_payload_is_a_clear_error(tmp_path, damage):
    model, opt = _tied_model_and_optimizer()
    path = _save(tmp_path, 3, model, opt)
    if damage == "garbage":
        (path / "state.json").write_text('{"step": 3, "manif')
    elif damage == "missing_manifest":
        (path / "state.json").write_text(json.dumps({"step": 3}))
    elif damage == "deleted":
        (path / "state.json").unlink()
    else:
        data = bytearray((path / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / "optimizer.pt").write_bytes(bytes(data))
    before = _hashes(tmp_path)
    with pytest.raises(CheckpointError, match=str(path)):
        ckpt.verify_checkpoint(path)
    assert _hashes(tmp_path) == before


def test_keep_last_prunes_only_older_complete_checkpoints(tmp_path):
    model, opt = _tied_model_and_optimizer()
    (tmp_path / ".tmp_step_000099-123").mkdir()  # a crashed writer's leftovers never count
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, model, opt, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000008"
    assert ckpt.clean_stale_temporaries(tmp_path) == [tmp_path / ".tmp_step_000099-123"]
    assert not list(tmp_path.glob(".*"))


def test_resume_resolution(tmp_path):
    run = tmp_path / "runs" / "r"
    assert ckpt.resolve_resume("auto", run, tmp_path / "runs") is None
    assert ckpt.resolve_resume("none", run, tmp_path / "runs") is None
    model, opt = _tied_model_and_optimizer()
    _save(run, 2, model, opt)
    _save(run, 5, model, opt)
    assert ckpt.resolve_resume("auto", run, tmp_path / "runs").name == "step_000005"
    assert ckpt.resolve_resume(str(run / "step_000002"), run, tmp_path / "runs").name == "step_000002"
    assert ckpt.resolve_resume("r", tmp_path / "runs" / "other", tmp_path / "runs").name == "step_000005"
    with pytest.raises(CheckpointError, match="pick a new run name with --run"):
        ckpt.resolve_resume("none", run, tmp_path / "runs")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope"), run, tmp_path / "runs")


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(ckpt.capture_rng_state(torch.device("cpu"))))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.restore_rng_state(state, torch.device("cpu"))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_resume_auto_skips_an_incomplete_step_folder_and_says_so(tmp_path, caplog):
    import logging

    model, opt = _tied_model_and_optimizer()
    run = tmp_path / "run"
    _save(run, 2, model, opt)
    good = _save(run, 4, model, opt)
    (run / "step_000006").mkdir()  # emptied (or half copied) by hand: no state.json, no weights
    with caplog.at_level(logging.WARNING, logger="ghostvis"):
        assert ckpt.resolve_resume("auto", run, tmp_path) == good
    assert any("skipping" in r.message and "step_000006" in r.message for r in caplog.records)
    assert ckpt.latest_checkpoint(run) == good and not ckpt.is_complete(run / "step_000006")
