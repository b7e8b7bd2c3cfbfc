"""`ghostvis train`: dry-run config/command, GPU and node checks, overrides, errors, --list, launching."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_env, run_cli, write_profile

from ghostvis_core import env as env_module
from ghostvis_core.train import launch

PY = sys.executable


@pytest.fixture(autouse=True)
def machine(tmp_path, monkeypatch):
    """GHOSTVIS_HOME in tmp, a CPU-only profile, no inherited launch variables; machine(N) = N H100s."""
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    for name in ("OMP_NUM_THREADS", "PYTHONUNBUFFERED", *launch.RANK_ENV_PASSTHROUGH):
        monkeypatch.delenv(name, raising=False)

    def use(num_gpus: int, visible: str | None = None, cpu_count: int = 16) -> None:
        facts = make_env("h100" if num_gpus else "cpu", num_gpus=num_gpus, cpu_count=cpu_count)
        facts.visible_devices = visible
        profile = write_profile(facts, tmp_path / f"profile{num_gpus}.json")
        monkeypatch.setenv("GHOSTVIS_ENV_PROFILE", str(profile))
        env_module.reset_env_cache()

    use(0)
    return use


def dry_json(args, capsys) -> dict:
    code, out, err = run_cli(["train", *args, "--dry-run", "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def config_path(tmp_path, run="base_train") -> Path:
    return tmp_path / "home" / "runs" / run / "launch" / "resolved_config.json"


# ---- dry run -------------------------------------------------------------------------------------------


def test_cpu_default_dry_run_prints_config_and_exact_command(tmp_path, capsys):
    code, out, err = run_cli(["train", "base_train", "--dry-run"], capsys)
    assert code == 0, err
    assert "Resolved config: base_train" in out
    for key in ("num_steps", "device_batch_size", "pack_max_length", "optim.lr", "preset"):
        assert key in out
    expected = f"{PY} -m recipes.base_train --config {config_path(tmp_path)}"
    assert expected in out.splitlines()
    assert "CPU, one process" in out
    assert not (tmp_path / "home" / "runs").exists()  # a dry run writes nothing


def test_cpu_default_dry_run_json(tmp_path, capsys):
    got = dry_json(["base_train"], capsys)
    assert got["device"] == "cpu" and got["nproc_per_node"] == 0 and got["world_size"] == 1
    assert got["command"] == [PY, "-m", "recipes.base_train", "--config", str(config_path(tmp_path))]
    assert got["config"]["recipe"] == "base_train"
    assert got["env"] == {"PYTHONUNBUFFERED": "1"}  # one CPU process: no thread split, no NVLS switches


def test_parent_settings_are_kept_not_overridden(capsys, monkeypatch, machine):
    """A variable the user set is inherited as is, so the dry run adds nothing for it."""
    machine(2, cpu_count=16)
    monkeypatch.setenv("PYTHONUNBUFFERED", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dry_json(["base_train", "--gpus", "2"], capsys)["env"] == {}


def test_two_gpus_use_torchrun_standalone(machine, tmp_path, capsys):
    machine(2, visible="0,1", cpu_count=16)
    got = dry_json(["base_train", "--gpus", "2"], capsys)
    assert got["device"] == "cuda" and got["world_size"] == 2
    assert got["command"] == [
        PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "recipes.base_train", "--config", str(config_path(tmp_path)),
    ]  # fmt: skip
    assert got["env"] == {"OMP_NUM_THREADS": "8", "PYTHONUNBUFFERED": "1"}  # 16 cores shared by 2 ranks


def test_gpus_default_to_all_visible(machine, capsys):
    machine(4)
    assert dry_json(["base_train"], capsys)["nproc_per_node"] == 4


def test_multinode_flags(machine, tmp_path, capsys):
    machine(8)
    got = dry_json(
        ["base_train", "--gpus", "8", "--nodes", "2", "--node-rank", "1", "--rdzv-endpoint", "10.0.0.1:29500",
         "--run", "big"],
        capsys,
    )  # fmt: skip
    assert got["world_size"] == 16
    assert got["command"] == [
        PY, "-m", "torch.distributed.run", "--nproc_per_node", "8",
        "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29500",
        "--rdzv-id", "big", "-m", "recipes.base_train", "--config", str(config_path(tmp_path, "big")),
    ]  # fmt: skip


def test_overrides_are_applied_and_typed(capsys):
    cfg = dry_json(["base_train", "model.n_layer=4", "optim.lr=3e-4", "num_steps=5"], capsys)["config"]
    assert cfg["model"]["n_layer"] == 4 and type(cfg["model"]["n_layer"]) is int
    assert cfg["optim"]["lr"] == pytest.approx(3e-4) and type(cfg["optim"]["lr"]) is float
    assert cfg["num_steps"] == 5 and type(cfg["num_steps"]) is int


def test_flags_set_config_fields(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("one document\n\nanother document\n")
    cfg = dry_json(
        ["base_train", "--num-steps", "7", "--device-batch-size", "2", "--pack-max-length", "64", "--compile",
         "--run", "r1", "--resume", "none", "--preset", "tiny", "--data", str(data)],
        capsys,
    )["config"]  # fmt: skip
    assert (cfg["num_steps"], cfg["device_batch_size"], cfg["pack_max_length"]) == (7, 2, 64)
    assert cfg["compile"] is True and cfg["run"] == "r1" and cfg["resume"] == "none"
    assert cfg["data"] == str(data.resolve())


def test_rich_dry_run_marks_who_set_what(capsys):
    code, out, _ = run_cli(["train", "base_train", "--num-steps", "9", "optim.lr=0.01", "--dry-run"], capsys)
    assert code == 0
    rows = {cells[0]: cells[1:] for cells in _table_rows(out)}
    assert rows["num_steps"] == ["9", "--num-steps"]
    assert rows["optim.lr"] == ["0.01", "key=value"]
    assert rows["recipe"] == ["base_train", ""]  # the default, set by nobody


def _table_rows(out: str) -> list[list[str]]:
    """The cells of each body row of a Rich table (rows drawn as `│ a │ b │ c │`)."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


def test_nvls_switches_reach_the_command_env(capsys, monkeypatch, machine):
    machine(2)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    got = dry_json(["base_train", "--gpus", "2"], capsys)
    assert got["env"] == {
        "OMP_NUM_THREADS": "8", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    code, out, _ = run_cli(["train", "base_train", "--gpus", "2", "--dry-run"], capsys)
    assert "NCCL_NVLS_ENABLE=0" in out


# ---- user errors: one line, exit 2, no traceback ---------------------------------------------------------


def assert_user_error(args, capsys, *fragments):
    code, out, err = run_cli(["train", *args], capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_unknown_override_key_suggests(capsys):
    assert_user_error(
        ["base_train", "num_step=5", "--dry-run"], capsys, "num_step", "did you mean 'num_steps'"
    )
    assert_user_error(["base_train", "optim.lrr=1e-3", "--dry-run"], capsys, "did you mean 'optim.lr'")


def test_bad_value_names_key_and_type(capsys):
    assert_user_error(["base_train", "num_steps=abc", "--dry-run"], capsys, "num_steps", "integer")
    assert_user_error(["base_train", "optim.lr=fast", "--dry-run"], capsys, "optim.lr", "number")


def test_override_without_equals(capsys):
    assert_user_error(["base_train", "num_steps", "--dry-run"], capsys, "expected key=value")


def test_flag_and_override_of_same_field(capsys):
    assert_user_error(["base_train", "--num-steps", "5", "num_steps=10", "--dry-run"], capsys, "given twice")


def test_gpus_above_visible_count(machine, capsys):
    machine(1, visible="0")
    assert_user_error(
        ["base_train", "--gpus", "4", "--dry-run"], capsys,
        "--gpus 4 but this machine has 1 visible GPU (CUDA_VISIBLE_DEVICES=0)",
    )  # fmt: skip


def test_gpus_on_a_machine_without_cuda(capsys):
    assert_user_error(["base_train", "--gpus", "2", "--dry-run"], capsys, "no usable CUDA GPU", "--gpus 0")


def test_multinode_needs_endpoint(machine, capsys):
    machine(8)
    assert_user_error(["base_train", "--nodes", "2", "--dry-run"], capsys, "--rdzv-endpoint")
    assert_user_error(
        ["base_train", "--nodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1", "--dry-run"], capsys,
        "--node-rank 2",
    )  # fmt: skip


def test_unknown_recipe(capsys):
    assert_user_error(["base_trian", "--dry-run"], capsys, "unknown recipe 'base_trian'",
                      "did you mean 'base_train'", "base_train, chat_sft")  # fmt: skip


def test_missing_recipe(capsys):
    assert_user_error([], capsys, "missing RECIPE", "--list")


def test_missing_data_file(tmp_path, capsys):
    assert_user_error(["base_train", "--data", str(tmp_path / "nope.jsonl"), "--dry-run"], capsys,
                      "--data", "nope.jsonl", "no such file")  # fmt: skip


def test_unknown_preset(capsys):
    assert_user_error(["base_train", "--preset", "tinny", "--dry-run"], capsys, "tinny", "tiny")


def test_fsdp_on_cpu(capsys):
    assert_user_error(["base_train", "--fsdp", "--dry-run"], capsys, "--fsdp", "--gpus")


def test_chat_sft_dry_run_keeps_base_run_name(tmp_path, capsys):
    got = dry_json(["chat_sft", "--num-steps", "2"], capsys)
    assert got["command"][1:3] == ["-m", "recipes.chat_sft"]
    assert got["config"]["recipe"] == "chat_sft" and got["config"]["init_from"] == "base_train"
    assert got["config_path"] == str(config_path(tmp_path, got["config"]["run"]))


# ---- --list --------------------------------------------------------------------------------------------


def test_list_shows_recipes_and_presets(capsys):
    code, out, err = run_cli(["train", "--list"], capsys)
    assert code == 0, err
    for name in ("base_train", "chat_sft", "vision_pretrain", "tiny", "d12", "d20"):
        assert name in out
    from ghostvis_core.model_configs import PRESETS
    from recipes import RECIPES

    lines = out.splitlines()
    # Names padded to the longest recipe or preset name ("vision_pretrain", 15), two spaces, the description.
    assert f"  base_train       {RECIPES['base_train'][1]}" in lines
    assert f"  chat_sft         {RECIPES['chat_sft'][1]}" in lines
    assert f"  vision_pretrain  {RECIPES['vision_pretrain'][1]}" in lines
    assert f"  tiny             {PRESETS['tiny'][0]}" in lines
    assert lines.index("Recipes (ghostvis train RECIPE):") < lines.index("Model presets (--preset NAME):")
    code, out, _ = run_cli(["train", "--list", "--json"], capsys)
    listed = json.loads(out)
    assert {"base_train", "chat_sft"} <= set(listed["recipes"]) and "tiny" in listed["presets"]


# ---- launching -----------------------------------------------------------------------------------------


def test_launch_passes_a_temporary_config_and_returns_child_code(tmp_path, capsys, monkeypatch):
    """The child reads the resolved config from a temporary file outside the run folder (the trainer publishes
    RUN/launch/resolved_config.json once it accepts the launch); the file is gone afterwards; the run folder
    is not touched; the child's exit code becomes ours with a one-line summary."""
    run_dir = tmp_path / "home" / "runs" / "base_train"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"written": "by the trainer"}')
    seen = {}

    def fake_run_child(cmd, env, **_):
        seen["cmd"], seen["env"] = cmd, env
        seen["path"] = Path(cmd[cmd.index("--config") + 1])
        seen["config"] = json.loads(seen["path"].read_text())
        return 3

    monkeypatch.setattr(launch, "run_child", fake_run_child)
    code, out, err = run_cli(["train", "base_train", "num_steps=4", "model.n_layer=2"], capsys)
    assert code == 3
    assert "training exited with code 3" in err
    assert seen["cmd"][:4] == [PY, "-m", "recipes.base_train", "--config"] and len(seen["cmd"]) == 5
    assert run_dir not in seen["path"].parents and not seen["path"].exists()
    assert seen["config"]["num_steps"] == 4 and seen["config"]["model"] == {"n_layer": 2}
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
    assert (run_dir / "config.json").read_text() == '{"written": "by the trainer"}'
    assert seen["env"]["GHOSTVIS_HOME"] == str(tmp_path / "home")  # parent env passes through


@pytest.mark.slow
def test_end_to_end_tiny_cpu_run_writes_a_checkpoint(tmp_path):
    """The real thing: ghostvis train -> python -m recipes.base_train -> three steps -> a checkpoint."""
    env = {k: v for k, v in os.environ.items() if k != "GHOSTVIS_ENV_PROFILE"}
    env["GHOSTVIS_HOME"] = str(tmp_path / "home")
    cmd = [PY, "-m", "ghostvis_cli", "train", "base_train", "--gpus", "0", "--num-steps", "3",
           "--device-batch-size", "2", "--pack-max-length", "64", "--run", "e2e",
           "model.n_layer=1", "log_every=1", "save_every=0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "home" / "runs" / "e2e"
    steps = sorted(p.name for p in run_dir.glob("step_*"))
    assert steps and steps[-1] == "step_000003", (steps, proc.stderr)
    assert (run_dir / steps[-1] / "model.safetensors").stat().st_size > 0
    assert json.loads((run_dir / "launch" / "resolved_config.json").read_text())["num_steps"] == 3


def test_train_uses_the_light_gpu_probe(machine, monkeypatch, capsys):
    """`ghostvis train` counts GPUs without the full probe (which imports every optional package)."""

    def full_probe(*_a, **_k):
        raise AssertionError("ghostvis train called probe_env()")

    monkeypatch.setattr(env_module, "probe_env", full_probe)
    machine(4, visible="0,1,2,3")
    got = dry_json(["base_train"], capsys)
    assert got["nproc_per_node"] == 4 and got["device"] == "cuda"


@pytest.mark.parametrize("debug", [False, True])
def test_debug_reaches_the_trainer_through_its_environment(debug, capsys, monkeypatch):
    """`ghostvis --debug train` exports GHOSTVIS_DEBUG=1, which the child (recipes/_main.py) reads."""
    monkeypatch.delenv("GHOSTVIS_DEBUG", raising=False)
    seen = {}

    def fake_run_child(cmd, env, **_):
        seen["env"] = env
        return 0

    monkeypatch.setattr(launch, "run_child", fake_run_child)
    args = ["--debug"] * debug + ["train", "base_train", "num_steps=1"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert seen["env"].get("GHOSTVIS_DEBUG") == ("1" if debug else None)


def test_cli_modules_do_not_import_the_app():
    """The app imports the subcommands, never the other way round (no import cycle)."""
    import ast

    cli = Path(__file__).resolve().parents[1] / "ghostvis_cli"
    for path in sorted(cli.glob("*.py")):
        if path.name in ("app.py", "__main__.py"):
            continue
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert "ghostvis_cli.app" not in imported, path.name


# Every option of `ghostvis train`, written out: adding, removing or renaming a flag is a deliberate change
# that updates this list (and the docs that name the flags).
TRAIN_OPTIONS = {
    "--gpus", "--nodes", "--node-rank", "--rdzv-endpoint", "--run", "--resume", "--preset", "--data",
    "--image-root", "--skip-bad-records",
    "--device-batch-size", "--pack-max-length", "--num-steps", "--compile", "--no-compile", "--fsdp",
    "--no-fsdp", "--fp8", "--recompute", "--log-to", "--dry-run", "--json", "--list",
}  # fmt: skip (-h/--help come from the app's context settings, checked in test_cli_basics)
TRAIN_ARGUMENTS = ["recipe", "overrides"]


def test_train_flags_are_frozen():
    import typer.main

    from ghostvis_cli.app import app

    params = typer.main.get_command(app).commands["train"].params
    # param_type_name rather than isinstance: typer builds on its own copy of click's classes.
    options = [p for p in params if p.param_type_name == "option"]
    assert {name for p in options for name in (*p.opts, *p.secondary_opts)} == TRAIN_OPTIONS
    assert [p.name for p in params if p.param_type_name == "argument"] == TRAIN_ARGUMENTS
    # Every flag the library maps to a config field (launch.FLAG_FIELDS) is a real flag of the command.
    assert set(launch.FLAG_FIELDS) <= {"/".join((*p.opts, *p.secondary_opts)) for p in options}


@pytest.mark.parametrize("columns", [80, 100])
def test_train_help_shows_every_flag_whole(columns):
    """Rich shrinks the flag column when the type column is wide (`<int range> [x>=0]`); at 80 columns every
    flag must still be printed whole, so the ranges are checked by the launcher, not shown as types."""
    from helpers import run_cli_process

    out = run_cli_process(["train", "--help"], env={**os.environ, "COLUMNS": str(columns)}).stdout
    assert max(len(line) for line in out.splitlines()) <= columns
    assert "…" not in out
    for option in TRAIN_OPTIONS:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", out), option
