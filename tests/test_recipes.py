"""Recipes: the registry, base_train's default run on CPU, chat_sft from a base checkpoint, one-line errors."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys

import pytest
from helpers import library_log
from helpers import tree_hashes as _hashes
from test_train_config import subprocess_env, tiny_config

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.log import get_logger
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.loop import train
from ghostvis_core.train.metrics import read_metrics
from recipes import RECIPES


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_registry_entries_build_valid_default_configs(name):
    module_name, description = RECIPES[name]
    module = importlib.import_module(module_name)
    cfg = module.default_config()
    assert isinstance(cfg, TrainConfig) and cfg.recipe == name and description
    assert callable(module.main)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_chat_sft_without_a_base_run_says_what_to_run_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path))
    from recipes import chat_sft

    logger = get_logger()
    handlers = list(logger.handlers)
    try:
        assert chat_sft.main([]) == 2
    finally:
        # a handler created here would keep writing to capsys's stream after this test closes it
        for handler in logger.handlers[:]:
            if handler not in handlers:
                logger.removeHandler(handler)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert "run `ghostvis train base_train` first" in err


def test_chat_sft_starts_from_the_base_weights_and_tokenizer(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    base = train(tiny_config(tmp_path, run="base_train", num_steps=12))
    sft_cfg = tiny_config(tmp_path, recipe="chat_sft", run="chat_sft", init_from=None, num_steps=4,
                          pack_max_length=64)
    with library_log(caplog):  # the base run's setup_logging stopped propagation to caplog's root handler
        sft = train(sft_cfg)
    assert f"Initialising model weights from {base.checkpoint}" in caplog.text
    assert _hashes(sft_cfg.run_dir / "tokenizer") == _hashes(base.run_dir / "tokenizer")
    # the base model already knows the token statistics: far below a fresh model's first loss (measured: fresh
    # 6.468, from base 5.475 after 12 base steps; the base run's own loss is 4.99 by then)
    first_base, first_sft = base.losses[0][1], sft.losses[0][1]
    print(f"first loss: fresh model {first_base:.3f}, SFT from base {first_sft:.3f}")
    assert first_sft < first_base - 0.8
    state = ckpt.verify_checkpoint(sft.checkpoint)
    assert state["step"] == 4 and state["recipe"] == "chat_sft"
    # resume of the SFT run continues its own checkpoint, not the base again
    more = train(tiny_config(tmp_path, recipe="chat_sft", run="chat_sft", num_steps=6, pack_max_length=64))
    assert more.step == 6 and [s for s, _ in more.losses] == [5, 6]


@pytest.mark.slow
def test_base_train_default_run_learns_and_a_truncated_checkpoint_is_refused(tmp_path):
    env = subprocess_env(tmp_path)
    env.pop("OMP_NUM_THREADS")
    env.pop("MKL_NUM_THREADS")
    done = subprocess.run([sys.executable, "-m", "recipes.base_train"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "home" / "runs" / "base_train"
    records = read_metrics(run / "metrics.jsonl")
    first, last = records[0]["loss"], records[-1]["loss"]
    print(f"default base_train: loss {first:.3f} at step {records[0]['step']} -> {last:.3f} at step "
          f"{records[-1]['step']}")
    assert math.isfinite(last) and last < 0.5 * first  # stated margin: the loss at least halves
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [40, 80]
    assert (run / "loss.png").stat().st_size > 1000
    for piece in ("=== GhostVis backends ===", "Sequence packing:", "parameters", "tokens per step",
                  "accumulation step"):
        assert piece in done.stderr

    latest = run / "step_000080" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])
    before = _hashes(run)
    again = subprocess.run([sys.executable, "-m", "recipes.base_train", "num_steps=100"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "Traceback" not in again.stderr
    error_lines = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "step_000080" in error_lines[0] and "truncated" in error_lines[0]
    assert "--resume" in error_lines[0] and "step_000040" in error_lines[0]
    assert _hashes(run) == before
