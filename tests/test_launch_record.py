"""RUN/launch/resolved_config.json records the newest ACCEPTED launch: every refused launch (resume none,
another preset or recipe, bad data, a corrupt newest checkpoint) leaves it byte-identical and creates no run
folder. `ghostvis train` runs in-process with the child trainer called in-process too (same code both sides of
the process boundary, a fraction of the time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import in_process_child, run_cli, tree_hashes

from ghostvis_core.train import launch

TINY = ["--gpus", "0", "--device-batch-size", "2", "--pack-max-length", "32", "model.n_layer=1",
        "model.n_embd=64", "model.n_head=2", "model.n_kv_head=1", "log_every=1", "save_every=2", "warmup_steps=0"]


@pytest.fixture
def trained(tmp_path, monkeypatch, capsys):
    """Run 'x' trained 2 steps through `ghostvis train`; returns (runs folder, the record's bytes)."""
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(launch, "run_child", in_process_child)
    code, _, err = run_cli(["train", "base_train", "--run", "x", "--num-steps", "2", *TINY], capsys)
    assert code == 0, err
    runs = tmp_path / "home" / "runs"
    record = runs / "x" / "launch" / "resolved_config.json"
    assert json.loads(record.read_text())["num_steps"] == 2
    return runs, record.read_bytes()


def _bad_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    return str(path)


REFUSALS = {
    "resume none": (lambda tmp: ["base_train", "--resume", "none"], "--resume none would overwrite"),
    "other preset": (lambda tmp: ["base_train", "--preset", "small"], "trained with preset 'tiny'"),
    "other recipe": (lambda tmp: ["chat_sft"], "trained with recipe 'base_train'"),
    "bad data": (lambda tmp: ["base_train", "--data", _bad_jsonl(tmp)], "bad.jsonl:2"),
    "corrupt newest checkpoint": (lambda tmp: ["base_train"], "does not match its sha256"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_refused_launch_keeps_the_record_and_the_run(kind, trained, tmp_path, capsys):
    runs, record_bytes = trained
    args, message = REFUSALS[kind]
    if kind == "corrupt newest checkpoint":
        weights = runs / "x" / "step_000002" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    before = tree_hashes(runs)
    code, out, err = run_cli(["train", *args(tmp_path), "--run", "x", "--num-steps", "4", *TINY], capsys)
    assert code != 0
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert (runs / "x" / "launch" / "resolved_config.json").read_bytes() == record_bytes
    assert tree_hashes(runs) == before
    assert sorted(p.name for p in runs.iterdir()) == ["x"]


def test_refused_fresh_launch_leaves_no_stub_folder(trained, tmp_path, capsys):
    runs, _ = trained
    code, _, err = run_cli(["train", "base_train", "--run", "fresh", "--data", _bad_jsonl(tmp_path), *TINY], capsys)
    assert code != 0 and "bad.jsonl:2" in err
    assert sorted(p.name for p in runs.iterdir()) == ["x"]


def test_accepted_resume_rewrites_the_record(trained, capsys):
    runs, _ = trained
    code, _, err = run_cli(["train", "base_train", "--run", "x", "--num-steps", "3", *TINY], capsys)
    assert code == 0, err
    assert json.loads((runs / "x" / "launch" / "resolved_config.json").read_text())["num_steps"] == 3
    assert sorted(p.name for p in (runs / "x" / "launch").iterdir()) == ["resolved_config.json"]
