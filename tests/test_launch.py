"""ghostvis_core.train.launch: GPU/node checks, the torchrun command, the environment, signals, exit codes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.train import launch

PY = sys.executable


def _plan(tmp_path, **kw):
    kw.setdefault("recipe_module", "recipes.base_train")
    kw.setdefault("config_path", tmp_path / "launch" / "resolved_config.json")
    kw.setdefault("nproc", 0)
    kw.setdefault("run_id", "myrun")
    kw.setdefault("python", "python")
    return launch.LaunchPlan(**kw)


# ---- GPU count -----------------------------------------------------------------------------------------


def test_nproc_default_is_all_visible_gpus_or_cpu():
    assert launch.resolve_nproc(None, gpu_count=0, cuda_available=False, visible_devices=None) == 0
    assert launch.resolve_nproc(None, gpu_count=4, cuda_available=True, visible_devices=None) == 4
    assert launch.resolve_nproc(0, gpu_count=4, cuda_available=True, visible_devices=None) == 0
    assert launch.resolve_nproc(2, gpu_count=4, cuda_available=True, visible_devices="0,1,2,3") == 2


def test_gpus_above_visible_count_names_count_and_visible_devices():
    with pytest.raises(ConfigError) as err:
        launch.resolve_nproc(4, gpu_count=1, cuda_available=True, visible_devices="3")
    msg = str(err.value)
    assert msg.startswith("--gpus 4 but this machine has 1 visible GPU (CUDA_VISIBLE_DEVICES=3)")
    assert "--gpus 1 or fewer" in msg


def test_gpus_without_cuda_suggests_cpu():
    with pytest.raises(ConfigError, match=r"no usable CUDA GPU .*use --gpus 0"):
        launch.resolve_nproc(1, gpu_count=0, cuda_available=False, visible_devices=None)


# ---- nodes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "rank", "endpoint", "match"),
    [
        (2, 0, None, "needs --rdzv-endpoint"),
        (2, 2, "h:29500", r"--node-rank 2 with --nodes 2.*0\.\.1"),
        (1, 1, None, "--node-rank 1"),
        (2, 1, "h", "expected HOST:PORT"),
        (2, 1, "h:99999", "expected HOST:PORT"),
        (2, 1, ":29500", "expected HOST:PORT"),
    ],
)
def test_multinode_validation(nodes, rank, endpoint, match):
    with pytest.raises(ConfigError, match=match):
        launch.check_multinode(nodes, rank, endpoint)


def test_multinode_valid():
    launch.check_multinode(1, 0, None)
    launch.check_multinode(4, 3, "10.0.0.1:29500")
    launch.check_multinode(2, 1, "[fe80::1]:29500")


# ---- command -------------------------------------------------------------------------------------------


def test_cpu_single_node_runs_the_recipe_directly(tmp_path):
    plan = _plan(tmp_path)
    cfg = str(tmp_path / "launch" / "resolved_config.json")
    assert launch.build_command(plan) == ["python", "-m", "recipes.base_train", "--config", cfg]
    assert plan.world_size == 1


def test_single_node_gpus_use_standalone(tmp_path):
    plan = _plan(tmp_path, nproc=2)
    cfg = str(tmp_path / "launch" / "resolved_config.json")
    assert launch.build_command(plan) == [
        "python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "recipes.base_train", "--config", cfg,
    ]  # fmt: skip


def test_multinode_uses_c10d_rendezvous_with_run_id(tmp_path):
    plan = _plan(tmp_path, nproc=8, nodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500")
    cmd = launch.build_command(plan)
    assert cmd[:5] == ["python", "-m", "torch.distributed.run", "--nproc_per_node", "8"]
    assert "--standalone" not in cmd
    joined = " ".join(cmd)
    assert (
        "--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29500 --rdzv-id myrun "
        "-m recipes.base_train --config" in joined
    )
    assert plan.world_size == 16


def test_cpu_multinode_runs_one_process_per_node_under_torchrun(tmp_path):
    cmd = launch.build_command(_plan(tmp_path, nproc=0, nodes=2, node_rank=0, rdzv_endpoint="h:1234"))
    assert cmd[2:5] == ["torch.distributed.run", "--nproc_per_node", "1"]


def test_format_command_is_shell_quoted():
    line = launch.format_command(["python", "-m", "x", "--config", "/a b/c.json"], {"OMP_NUM_THREADS": "4"})
    assert line == "OMP_NUM_THREADS=4 python -m x --config '/a b/c.json'"


# ---- environment ---------------------------------------------------------------------------------------


def test_omp_threads_split_across_ranks_only_when_unset(tmp_path):
    plan = _plan(tmp_path, nproc=4)
    assert launch.env_changes(plan, {}, cpu_count=32)["OMP_NUM_THREADS"] == "8"
    assert launch.env_changes(plan, {}, cpu_count=2)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in launch.env_changes(plan, {"OMP_NUM_THREADS": "3"}, cpu_count=32)
    assert "OMP_NUM_THREADS" not in launch.env_changes(_plan(tmp_path, nproc=1), {}, cpu_count=32)
    assert "OMP_NUM_THREADS" not in launch.env_changes(_plan(tmp_path, nproc=0), {}, cpu_count=32)


def test_nvls_switches_are_carried_explicitly(tmp_path):
    parent = {
        "PATH": "/usr/bin",
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    plan = _plan(tmp_path, nproc=2)
    changes = launch.env_changes(plan, parent, cpu_count=8)
    for name in launch.RANK_ENV_PASSTHROUGH:
        assert changes[name] == parent[name]
    env = launch.build_env(plan, parent, cpu_count=8)
    assert env["PATH"] == "/usr/bin" and env["NCCL_NVLS_ENABLE"] == "0" and env["OMP_NUM_THREADS"] == "4"
    # Unset switches stay unset: NCCL's own default applies.
    assert "NCCL_NVLS_ENABLE" not in launch.build_env(plan, {"PATH": "/usr/bin"}, cpu_count=8)


@pytest.mark.slow
def test_torchrun_delivers_env_to_every_rank(tmp_path):
    """Two real CPU ranks under torchrun each see the NVLS switches and the shared OMP setting."""
    (tmp_path / "rank_env_probe.py").write_text(
        textwrap.dedent(
            """
            import json, os, sys
            out = os.path.join(os.path.dirname(sys.argv[-1]), "rank%s.json" % os.environ["RANK"])
            keys = ["NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                    "OMP_NUM_THREADS", "WORLD_SIZE"]
            json.dump({k: os.environ.get(k) for k in keys}, open(out, "w"))
            """
        )
    )
    plan = _plan(tmp_path, recipe_module="rank_env_probe", nproc=2, python=PY)
    plan.config_path.parent.mkdir()
    parent = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    parent.update(
        NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
        PYTHONPATH=str(tmp_path),
    )  # fmt: skip
    env = launch.build_env(plan, parent, cpu_count=4)
    assert launch.run_child(launch.build_command(plan), env) == 0
    for rank in (0, 1):
        seen = json.loads((tmp_path / "launch" / f"rank{rank}.json").read_text())
        assert seen == {
            "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1",
            "OMP_NUM_THREADS": "2",
            "WORLD_SIZE": "2",
        }


# ---- resolved config file ------------------------------------------------------------------------------


def test_write_resolved_config_is_atomic_and_leaves_run_config_alone(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"owned": "by the trainer"}')
    path = launch.resolved_config_path(run_dir)
    assert path == run_dir / "launch" / "resolved_config.json"
    launch.write_resolved_config({"num_steps": 5, "optim": {"lr": 0.0003}}, path)
    launch.write_resolved_config({"num_steps": 7, "optim": {"lr": 0.0003}}, path)
    assert json.loads(path.read_text()) == {"num_steps": 7, "optim": {"lr": 0.0003}}
    assert sorted(p.name for p in path.parent.iterdir()) == ["resolved_config.json"]  # no temp files left
    assert (run_dir / "config.json").read_text() == '{"owned": "by the trainer"}'


# ---- child process -------------------------------------------------------------------------------------


def test_exit_code_of_signalled_child():
    assert launch.exit_code(0) == 0
    assert launch.exit_code(3) == 3
    assert launch.exit_code(-signal.SIGTERM) == 128 + signal.SIGTERM


def test_run_child_returns_child_exit_code(tmp_path):
    assert launch.run_child([PY, "-c", "import sys; sys.exit(5)"], dict(os.environ)) == 5


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_reaches_child_once_and_its_code_comes_back(tmp_path, sig):
    """A signal to the launcher reaches the trainer exactly once; the launcher exits with the trainer's code."""
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(
            f"""
            import pathlib, signal, sys, time
            d = pathlib.Path({str(tmp_path)!r})
            seen = []
            def on_signal(signum, frame):
                seen.append(signum)
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
            (d / "ready").write_text("1")
            deadline = time.monotonic() + 30
            while not seen and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # a duplicate delivery would land here
            (d / "seen").write_text(",".join(str(s) for s in seen))
            sys.exit(17)
            """
        )
    )
    parent = subprocess.Popen(
        [PY, "-c", f"import sys; from ghostvis_core.train.launch import run_child; "
                   f"sys.exit(run_child([sys.executable, {str(child)!r}], __import__('os').environ))"],
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "ready").exists(), "child never started"
    parent.send_signal(sig)
    assert parent.wait(timeout=30) == 17
    assert (tmp_path / "seen").read_text() == str(int(sig))


def test_missing_path_fields_are_reported(tmp_path, monkeypatch):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        data: str | None = None
        tokenizer: str | None = None
        image_root: str | None = None
        init_from: str | None = None
        resume: str = "auto"
        runs_root: str | None = None

    with pytest.raises(DataError, match=r"--data .*nope.jsonl: no such file"):
        launch.absolutize_paths(Cfg(data=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"--image-root .*no-images: no such file or folder"):
        launch.absolutize_paths(Cfg(image_root=str(tmp_path / "no-images")))
    with pytest.raises(DataError, match=r"tokenizer .*tok: no such file"):
        launch.absolutize_paths(Cfg(tokenizer=str(tmp_path / "tok")))
    (tmp_path / "d.txt").write_text("x")
    (tmp_path / "runs" / "base" / "step_000002").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    out = launch.absolutize_paths(Cfg(data="d.txt", resume="runs/base/step_000002", init_from="base_train"))
    assert out.data == str((tmp_path / "d.txt").resolve())
    assert out.resume == str((tmp_path / "runs" / "base" / "step_000002").resolve())
    # A run name is the trainer's to resolve under the runs folder: passed through unchanged.
    assert out.init_from == "base_train"


# ---- what the dry run shows: where each config key came from -------------------------------------------


def test_config_sources_name_the_flag_or_key_value():
    flags = {"--num-steps": 5, "--compile/--no-compile": False}
    assert launch.config_sources(flags, ["optim.lr=1e-3", "model.n-layer = 2"]) == {
        "num_steps": "--num-steps", "compile": "--compile",
        "optim.lr": "key=value", "model.n_layer": "key=value",
    }  # fmt: skip


def test_flatten_config_dots_model_and_optim_only():
    cfg = {"num_steps": 3, "model": {"n_layer": 2}, "optim": {"lr": 0.1}, "x": {"a": 1}}
    flat = launch.flatten_config(cfg)
    assert flat == {"num_steps": 3, "model.n_layer": 2, "optim.lr": 0.1, "x": {"a": 1}}


def test_config_rows_mark_changes_and_sources(tmp_path, monkeypatch):
    from recipes import RECIPES

    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path))
    job = launch.prepare_launch(
        RECIPES, "base_train", {"--num-steps": 9, "--run": None}, ["model.n_layer=3"],
        gpus=0, nodes=1, node_rank=0, rdzv_endpoint=None, parent_env={},
    )  # fmt: skip
    rows = {row.key: row for row in launch.config_rows(job)}
    assert rows["num_steps"] == launch.ConfigRow("num_steps", "9", True, "--num-steps")
    assert rows["model.n_layer"] == launch.ConfigRow("model.n_layer", "3", True, "key=value")
    assert rows["recipe"] == launch.ConfigRow("recipe", "base_train", False, "")
    assert rows["compile"].value == "auto: off (on for CUDA, off on CPU)"
    assert job.changes == {"PYTHONUNBUFFERED": "1"} and job.plan.nproc == 0
