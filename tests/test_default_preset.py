"""The preset a pretraining run gets without --preset: tiny on a CPU, a GPU-sized one on GPUs (by the smallest
card's memory, hardware_limits.GPU_DEFAULT_PRESETS), the checkpoint's own when resuming; the banner says which
and how to pick another."""

from __future__ import annotations

import json
import os

import pytest
from helpers import make_env, run_cli
from test_train_config import tiny_config

from ghostvis_core.hardware_limits import GPU_DEFAULT_PRESETS, default_gpu_preset
from ghostvis_core.model_configs import PRESETS
from ghostvis_core.train import launch
from ghostvis_core.train.loop import train
from recipes import RECIPES


def _prepare(recipe="base_train", flags=None, overrides=(), gpus=None):
    return launch.prepare_launch(RECIPES, recipe, flags or {}, list(overrides), gpus=gpus, nodes=1, node_rank=0,
                                 rdzv_endpoint=None, parent_env=os.environ)


def test_the_table_covers_every_card_with_a_real_preset():
    assert all(preset in PRESETS for _, preset in GPU_DEFAULT_PRESETS)
    assert [default_gpu_preset(m) for m in (4.0, 14.6, 23.5, 31.7, 79.2, 139.8)] == [
        "small", "small", "d12", "d12", "d20", "d20"]


@pytest.mark.parametrize("profile, preset", [("h100", "d20"), ("v100", "d12"), ("rtx4090", "d12"), ("t4", "small")])
def test_a_fresh_gpu_run_gets_the_preset_for_its_card(profile, preset, use_profile):
    use_profile(make_env(profile, num_gpus=2))
    job = _prepare()
    assert job.plan.nproc == 2 and job.cfg.preset == preset
    assert job.preset_note.startswith(f"Preset {preset}: the default for a ")
    assert "--preset NAME picks another" in job.preset_note
    assert job.set_by["preset"] == "default here"


def test_the_smallest_card_decides(use_profile):
    env = make_env("h100", num_gpus=2)
    env.gpus[1].memory_gib = 23.5
    use_profile(env)
    assert _prepare().cfg.preset == "d12"


def test_the_cpu_keeps_the_tiny_demo_preset(use_profile):
    use_profile(make_env("cpu"))
    job = _prepare()
    assert job.plan.nproc == 0 and job.cfg.preset == "tiny"
    assert job.preset_note.startswith("Preset tiny: the CPU default (") and "preset" not in job.set_by


def test_an_explicit_preset_and_a_run_from_a_base_model_are_left_alone(use_profile):
    use_profile(make_env("h100"))
    job = _prepare(flags={"--preset": "small"})
    assert job.cfg.preset == "small" and job.preset_note is None
    assert _prepare(overrides=["preset=tiny"]).cfg.preset == "tiny"
    chat = _prepare("chat_sft")  # starts from base_train's weights: its shape is the checkpoint's
    assert chat.cfg.preset == "tiny" and chat.preset_note is None


def test_a_resumed_run_keeps_its_checkpoints_preset_on_a_gpu(use_profile, tmp_path):
    cfg = tiny_config(tmp_path, num_steps=1, save_every=0)
    train(cfg)  # a CPU run with the tiny preset
    use_profile(make_env("h100"))
    job = _prepare(overrides=[f"runs_root={cfg.run_dir.parent}", f"run={cfg.run}"])
    assert job.cfg.preset == "tiny"
    assert job.preset_note == f"Preset tiny: this run's, from {cfg.run_dir / 'step_000001'}"
    fresh = _prepare(overrides=[f"runs_root={cfg.run_dir.parent}", "run=other"])
    assert fresh.cfg.preset == "d20"


def test_the_dry_run_banner_says_which_preset_and_how_to_pick_another(use_profile, capsys):
    use_profile(make_env("h100"))
    code, out, _ = run_cli(["train", "base_train", "--dry-run"], capsys)
    assert code == 0
    assert f"Preset d20: the default for a 79 GiB GPU ({PRESETS['d20'][0]}); --preset NAME picks another " \
           "(see ghostvis train --list)" in out
    code, out, _ = run_cli(["train", "base_train", "--dry-run", "--json"], capsys)
    assert json.loads(out)["config"]["preset"] == "d20"
