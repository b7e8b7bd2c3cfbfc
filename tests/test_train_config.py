"""TrainConfig: validation, JSON round trip, typed key=value overrides with did-you-mean, batch geometry.

Also holds `tiny_config`, the few-second CPU config the other train/checkpoint/resume tests build on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ghostvis_core.config import OptimizerConfig
from ghostvis_core.errors import ConfigError
from ghostvis_core.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_kv_head": 1}


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    """2 layers x 64 wide, rows of 32 tokens, a dozen steps: a few seconds on a 2-core CPU."""
    fields = dict(
        runs_root=str(tmp_path / "runs"), run="tiny", preset="tiny", model=dict(TINY_MODEL),
        device_batch_size=4, pack_max_length=32, num_steps=12, warmup_steps=2, warmdown_frac=0.25,
        log_every=1, save_every=4, keep_last=0, optim=OptimizerConfig(lr=3e-3),
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for recipe subprocesses: private GHOSTVIS_HOME, one thread (bitwise-reproducible CPU math)."""
    import os

    env = dict(os.environ)
    # the repo first, then the caller's path (a GPU image carries packages through PYTHONPATH)
    path = os.pathsep.join([str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    env.update(GHOSTVIS_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=path, GHOSTVIS_DEBUG="0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def recipe_cmd(module: str, config_path: Path, *extra: str) -> list[str]:
    """`python -m recipes.X --config FILE [overrides]`."""
    return [sys.executable, "-m", module, "--config", str(config_path), *extra]


def test_defaults_validate_and_round_trip_json(tmp_path):
    cfg = TrainConfig()
    assert cfg.recipe == "base_train" and cfg.resume == "auto" and cfg.total_batch_size == -1
    path = tmp_path / "resolved.json"
    cfg.to_json(path)
    data = json.loads(path.read_text())
    assert data["optim"]["betas"] == [0.9, 0.95]
    back = TrainConfig.from_json(path)
    assert back == cfg
    assert isinstance(back.optim, OptimizerConfig) and back.optim.betas == (0.9, 0.95)


def test_run_dir_uses_runs_root_or_ghostvis_home(tmp_path, monkeypatch):
    assert TrainConfig(runs_root=str(tmp_path), run="x").run_dir == tmp_path / "x"
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    assert TrainConfig(run="y").run_dir == tmp_path / "home" / "runs" / "y"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'num_steps'"):
        TrainConfig.from_dict({"num_step": 3})
    with pytest.raises(ConfigError, match="n_layer"):
        TrainConfig(model={"n_layers": 2})
    with pytest.raises(ConfigError, match="preset='tyny'.*did you mean 'tiny'"):
        TrainConfig(preset="tyny")


def test_overrides_are_typed_and_nested():
    cfg = TrainConfig().apply_overrides([
        "num_steps=50", "model.n_layer=4", "optim.lr=1e-3", "optim.betas=0.8,0.99", "compile=true",
        "tokenizer=none", "data=/tmp/x.jsonl", "grad_clip=0", "model.tie_embeddings=false", "optim.matrix_lr=null",
    ])
    assert cfg.num_steps == 50 and cfg.model == {"n_layer": 4, "tie_embeddings": False}
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.99) and cfg.optim.matrix_lr is None
    assert cfg.compile is True and cfg.tokenizer is None and cfg.data == "/tmp/x.jsonl" and cfg.grad_clip == 0.0


@pytest.mark.parametrize(
    "item, message",
    [
        ("num_step=3", "did you mean 'num_steps'"),
        ("model.n_layers=3", "did you mean 'model.n_layer'"),
        ("lr=1e-3", "did you mean 'optim.lr'"),
        ("num_steps=many", "expected an integer"),
        ("compile=maybe", "expected true or false"),
        ("num_steps", "expected key=value"),
        ("num_steps=0", "positive integer"),
        ("dtype=fp8", "dtype='fp8'"),
    ],
)
def test_bad_overrides_name_the_fix(item, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig().apply_overrides([item])


def test_grad_accum_divides_or_names_the_numbers():
    cfg = TrainConfig(device_batch_size=4, pack_max_length=32, total_batch_size=4 * 32 * 2 * 3)
    assert cfg.grad_accum_steps(world_size=2) == 3
    assert cfg.total_tokens_per_step(2) == 768
    assert TrainConfig(device_batch_size=4, pack_max_length=32).grad_accum_steps(world_size=4) == 1
    with pytest.raises(ConfigError) as err:
        TrainConfig(device_batch_size=4, pack_max_length=32, total_batch_size=1000).grad_accum_steps(world_size=2)
    text = str(err.value)
    for piece in ("total_batch_size=1000", "device_batch_size=4", "pack_max_length=32", "world_size=2", "256"):
        assert piece in text
