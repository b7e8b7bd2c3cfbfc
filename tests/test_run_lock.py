"""One trainer per run folder: a second launch on a held run is one message naming the holder, and touches
nothing; a lock left by a dead trainer is taken over with a log line; the lock goes when the trainer ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import library_log, run_cli, tree_hashes
from test_train_config import recipe_cmd, subprocess_env, tiny_config

from ghostvis_core.train import run_lock
from ghostvis_core.train.loop import train
from ghostvis_core.train.metrics import read_metrics
from ghostvis_core.train.run_lock import RunLockedError


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped), so nothing runs under it."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, pid: int, host: str, since: float = 1.7e9) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.lock").write_text(json.dumps({"pid": pid, "host": host, "since": since, "command": "x"}))


def test_second_launch_on_a_running_trainer_fails_fast_and_touches_nothing(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, num_steps=400, save_every=2)
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    first = subprocess.Popen(recipe_cmd("recipes.base_train", config_file), env=subprocess_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = cfg.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and len(read_metrics(metrics)) >= 3):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # freeze it, so its folder can be compared byte for byte
        holder = run_lock.read_holder(cfg.run_dir)
        assert holder is not None and holder.pid == first.pid and holder.host == socket.gethostname()
        before = tree_hashes(cfg.run_dir)

        # the CLI refuses before starting a child
        monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
        code, out, err = run_cli(["train", "base_train", "--gpus", "0", "--run", "tiny",
                                  f"runs_root={tmp_path / 'runs'}"], capsys)
        assert code == 2, err
        line = " ".join(err.split())
        assert f"is in use by another trainer (pid {first.pid} on host {socket.gethostname()} since" in line
        assert "another --run NAME" in line and "Traceback" not in err
        # the trainer itself refuses too (a direct `python -m recipes.X` or an in-process train())
        with pytest.raises(RunLockedError, match=f"pid {first.pid} on host"):
            train(cfg)
        assert tree_hashes(cfg.run_dir) == before
    finally:
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    assert not (cfg.run_dir / "run.lock").exists()  # released on the way out


def test_stale_lock_of_a_dead_trainer_is_taken_over_with_a_log_line(tmp_path, caplog):
    cfg = tiny_config(tmp_path, num_steps=2, save_every=0)
    dead = _dead_pid()
    _write_lock(cfg.run_dir, dead, socket.gethostname())
    with library_log(caplog):
        result = train(cfg)
    assert result.step == 2
    assert f"Taking over the stale lock {cfg.run_dir / 'run.lock'}: its holder (pid {dead} on host" in caplog.text
    assert not (cfg.run_dir / "run.lock").exists()


def test_lock_from_another_host_is_refused_with_the_manual_fix(tmp_path):
    cfg = tiny_config(tmp_path, num_steps=2)
    _write_lock(cfg.run_dir, os.getpid(), "elsewhere.example")
    before = tree_hashes(cfg.run_dir)
    with pytest.raises(RunLockedError, match=r"pid \d+ on host elsewhere.example since 2023-11-14 .*if that "
                                             r"process is gone, delete .*run.lock"):
        train(cfg)
    assert tree_hashes(cfg.run_dir) == before


def test_damaged_lock_file_names_itself(tmp_path):
    cfg = tiny_config(tmp_path, num_steps=2)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "run.lock").write_text("{not json")
    with pytest.raises(RunLockedError, match=r"run.lock is not a readable run lock .*delete"):
        train(cfg)
    assert (cfg.run_dir / "run.lock").read_text() == "{not json"


def test_refused_fresh_launch_leaves_no_run_folder(tmp_path):
    """The lock creates the run folder; a launch refused before writing anything removes it again."""
    from ghostvis_core.errors import DataError

    cfg = tiny_config(tmp_path, run="fresh", data=str(tmp_path / "empty.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError):
        train(cfg)
    assert not cfg.run_dir.exists() and not (tmp_path / "runs").exists()


def test_only_node_zero_checks_the_lock_before_launching(tmp_path, capsys, monkeypatch):
    """Node 1 of a multi-node launch starts while node 0's trainer already holds the shared run folder."""
    from helpers import make_env, write_profile

    from ghostvis_core import env as env_module
    from ghostvis_core.train import launch

    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    profile = write_profile(make_env("h100", num_gpus=2), tmp_path / "profile.json")
    monkeypatch.setenv("GHOSTVIS_ENV_PROFILE", str(profile))
    env_module.reset_env_cache()
    _write_lock(tmp_path / "home" / "runs" / "base_train", os.getpid(), socket.gethostname())
    started = []
    monkeypatch.setattr(launch, "run_child", lambda cmd, env, **_: started.append(cmd) or 0)
    common = ["train", "base_train", "--gpus", "2", "--nodes", "2", "--rdzv-endpoint", "h:29500"]
    code, _, err = run_cli([*common, "--node-rank", "1"], capsys)
    assert code == 0 and len(started) == 1, err
    code, _, err = run_cli([*common, "--node-rank", "0"], capsys)
    assert code == 2 and "is in use by another trainer" in err and len(started) == 1
    env_module.reset_env_cache()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_zombie_holder_is_not_alive():
    """A holder that exited but is not reaped yet (its parent has not waited) holds nothing."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while "Z" not in open(f"/proc/{proc.pid}/stat").read().rpartition(")")[2].split()[0]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        assert not run_lock.pid_alive(proc.pid)
        assert run_lock.pid_alive(os.getpid())
    finally:
        proc.wait()
