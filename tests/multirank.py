"""Helpers for tests that run several ranks under torchrun on CPU and kill them like a power loss."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ghostvis_core.checkpoint import step_dir_name
from ghostvis_core.train.metrics import read_metrics


def end_rank_process() -> None:
    """The last line of a gloo rank script, once its results are written: barrier, destroy the process group, and
    leave without interpreter finalisation, where gloo's worker threads can still hold tensors and abort the
    process ("terminate called without an active exception", SIGABRT; pytorch#179291)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun_cmd(config: Path) -> list[str]:
    """2-rank standalone torchrun of recipes.base_train with a config file."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "recipes.base_train", "--config", str(config)]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every line of the run's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def children(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun starts each worker in its own session, so killpg misses them)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces/parens, so split after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's process group and each worker's own group, like a machine losing power."""
    workers = children(proc.pid)
    assert len(workers) == 2, f"expected 2 torchrun workers, found {workers}"
    for pid in workers:
        os.killpg(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker survived SIGKILL"
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def kill_after_checkpoint(config: Path, env: dict[str, str], cwd: Path, run_dir: Path, step: int) -> None:
    """Start a 2-rank run and SIGKILL every process once step_NNNNNN (a complete checkpoint) exists."""
    proc = subprocess.Popen(torchrun_cmd(config), env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / step_dir_name(step)).is_dir():
            assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint at step {step} in time"
            time.sleep(0.02)
        kill_everything(proc)
    finally:
        if proc.poll() is None:  # an assertion above failed: do not leave the run behind
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in children(proc.pid):
                os.killpg(pid, signal.SIGKILL)
            proc.wait(timeout=60)
        proc.stderr.close()
