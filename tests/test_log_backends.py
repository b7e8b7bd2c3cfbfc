"""--log-to: TensorBoard events read back equal metrics.jsonl; a resumed run keeps one history; W&B gets the same
scalars, offline unless WANDB_MODE says otherwise; a missing package is refused before anything is written."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import json
import sys
import types

import pytest
from helpers import run_cli
from test_train_config import tiny_config

from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.train import log_backends
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.loop import train
from ghostvis_core.train.metrics import read_metrics


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_metrics_of_every_logged_step(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, num_steps=4, save_every=0, log_to=("tensorboard",))
    train(cfg)
    records = read_metrics(cfg.run_dir / "metrics.jsonl")
    scalars = _tensorboard_scalars(cfg.run_dir / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    # float32 in the event file, float64 in metrics.jsonl
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [v for _, v in scalars["train/tokens_seen"]] == [r["tokens_seen"] for r in records]
    groups = records[0]["lr"]
    assert groups and all(f"train/lr/{g}" in scalars for g in groups)
    assert [v for _, v in scalars[f"train/lr/{next(iter(groups))}"]] == pytest.approx(
        [next(iter(r["lr"].values())) for r in records], rel=1e-6)
    assert "train/step" not in scalars and "train/mem_kind" not in scalars  # the x axis, a text field


def test_a_resumed_run_shows_one_history_in_tensorboard(tmp_path):
    """Resuming from step 2 after a run reached 4 purges events 3-4 of the first pass (as metrics.jsonl drops
    those lines): each step appears once, with the resumed run's loss."""
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, num_steps=4, save_every=2, log_to=("tensorboard",))
    train(cfg)
    train(TrainConfig(**{**cfg.to_dict(), "resume": str(cfg.run_dir / "step_000002")}))
    records = read_metrics(cfg.run_dir / "metrics.jsonl")
    losses = _tensorboard_scalars(cfg.run_dir / "tensorboard")["train/loss"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def _hide_package(monkeypatch, name: str, *, installed: bool) -> None:
    """This interpreter as one without `name` (installed=False: no distribution, nothing to import) or with a
    distribution that does not import (installed=True)."""
    real_version = importlib.metadata.version

    def version(dist):
        if dist == name:
            if installed:
                return "9.9.9"
            raise importlib.metadata.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError; find_spec finds nothing


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_message_at_launch_and_nothing_is_written(backend, tmp_path, capsys, monkeypatch):
    _hide_package(monkeypatch, backend, installed=False)
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    code, out, err = run_cli(["train", "base_train", "--gpus", "0", "--log-to", backend], capsys)
    assert code == BackendUnavailableError.exit_code
    assert f"--log-to {backend}: the {backend} package is not installed; pip install 'ghostvis[{backend}]'" in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not (tmp_path / "home" / "runs").exists()


def test_the_trainer_refuses_a_missing_package_before_building_anything(tmp_path, monkeypatch):
    _hide_package(monkeypatch, "tensorboard", installed=False)
    cfg = tiny_config(tmp_path, log_to=("tensorboard",))
    with pytest.raises(BackendUnavailableError, match=r"pip install 'ghostvis\[tensorboard\]'"):
        train(cfg)
    assert not cfg.run_dir.exists()


def test_a_package_that_does_not_import_is_named_as_such(monkeypatch):
    _hide_package(monkeypatch, "wandb", installed=True)
    with pytest.raises(BackendUnavailableError, match=r"wandb 9\.9\.9 is installed but does not import"):
        log_backends.check_available(["wandb"])


class _FakeWandb(types.ModuleType):
    """Records what GhostVis asks of wandb: init's arguments, each log call, finish."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        module = self

        class Run:
            def log(self, data, step):
                module.logged.append((data, step))

            def finish(self):
                module.finished += 1

        return Run()


@pytest.mark.parametrize("wandb_mode", [None, "disabled"])
def test_wandb_gets_the_same_scalars_offline_unless_wandb_mode_is_set(wandb_mode, tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    if wandb_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", wandb_mode)
    cfg = tiny_config(tmp_path, num_steps=3, save_every=0, log_to=("wandb",))
    train(cfg)
    (init,) = fake.inits
    assert init["mode"] == (wandb_mode or "offline")
    assert init["dir"] == str(cfg.run_dir) and init["name"] == cfg.run
    assert init["config"]["num_steps"] == 3 and init["resume"] == "allow"
    records = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert [step for _, step in fake.logged] == [1, 2, 3]
    assert [data["train/loss"] for data, _ in fake.logged] == [r["loss"] for r in records]
    assert fake.finished == 1


def test_log_to_accepts_repeats_and_comma_lists_and_names_a_typo():
    assert log_backends.parse_log_to(["tensorboard,wandb", "tensorboard"]) == ("tensorboard", "wandb")
    assert log_backends.parse_log_to([" WandB "]) == ("wandb",)
    with pytest.raises(ConfigError, match=r"--log-to tensorbord: not a logging backend; did you mean 'tensorboard'"):
        log_backends.parse_log_to(["tensorbord"])
    assert TrainConfig(log_to=["wandb", "wandb"]).log_to == ("wandb",)
    assert TrainConfig().apply_overrides(["log_to=tensorboard,wandb"]).log_to == ("tensorboard", "wandb")
    with pytest.raises(ConfigError, match="log_to='tensorboard'"):
        TrainConfig(log_to="tensorboard")


def test_the_dry_run_shows_the_backends(capsys, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    code, out, _ = run_cli(["train", "base_train", "--gpus", "0", "--log-to", "tensorboard", "--dry-run",
                            "--json"], capsys)
    assert code == 0
    assert json.loads(out)["config"]["log_to"] == ["tensorboard"]
