"""Where step metrics go besides metrics.jsonl: TensorBoard event files and Weights & Biases (`--log-to`).

Both are fed the same records the trainer appends to metrics.jsonl (MetricsLog.append), on rank 0 only. Each
numeric field of a record becomes one scalar `train/<field>`, and each optimizer group's rate `train/lr/<group>`.

Neither package is a dependency. A requested backend whose package is absent (or does not import) is refused
before anything is built or written, with the pip command that fixes it (`check_available`): a run never gets
far and then loses its metrics. W&B runs offline unless WANDB_MODE says otherwise (`wandb sync` uploads later),
so a launch never waits on, or needs, the network.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ghostvis_core.errors import BackendUnavailableError, ConfigError, did_you_mean

LOG_BACKENDS = ("tensorboard", "wandb")
"""The names `--log-to` accepts."""

# backend -> (import name probed, the pip command that installs it)
_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install 'ghostvis[tensorboard]'"),
    "wandb": ("wandb", "pip install 'ghostvis[wandb]'"),
}
TENSORBOARD_DIR = "tensorboard"
"""Event files go to RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""
WANDB_DEFAULT_MODE = "offline"


def parse_log_to(values: Iterable[str]) -> tuple[str, ...]:
    """The backend names of `--log-to` values (repeatable, each maybe a comma list), in order, without repeats;
    an unknown name is a ConfigError naming the flag."""
    names: list[str] = []
    for value in values:
        for part in str(value).split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in LOG_BACKENDS:
                raise ConfigError(f"--log-to {part.strip()}: not a logging backend{did_you_mean(name, LOG_BACKENDS)}; "
                                  f"choose from {', '.join(LOG_BACKENDS)} (metrics.jsonl is always written)")
            if name not in names:
                names.append(name)
    return tuple(names)


def check_available(names: Sequence[str]) -> None:
    """Refuse (BackendUnavailableError, one line with the pip command) a backend whose package is absent or
    does not import; probed through env.probe_package like every other optional package."""
    from ghostvis_core.env import probe_package

    for name in names:
        module, pip = _PACKAGES[name]
        status = probe_package(module)
        if not status.installed:
            raise BackendUnavailableError(f"--log-to {name}: the {module} package is not installed; {pip} "
                                          f"(or drop --log-to {name}: metrics.jsonl is always written)")
        if not status.importable:
            raise BackendUnavailableError(f"--log-to {name}: {module} {status.version or ''} is installed but does "
                                          f"not import ({status.error}); reinstall it: {pip}")


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record as `train/<field>` scalars (lr groups as train/lr/<group>);
    the step itself, text fields and unknown values (mfu on a CPU) are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if key == "lr" and isinstance(value, Mapping):
            out.update({f"train/lr/{group}": float(lr) for group, lr in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"train/{key}"] = float(value)
    return out


class MetricsSink(Protocol):
    """One backend: takes a record per logged step, closes at the end of the run."""

    def log(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Event files through torch.utils.tensorboard. A resumed run purges the events after its resume step
    (as metrics.jsonl drops those lines), so TensorBoard shows one history."""

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, record: Mapping[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        # flushed every logged step, so a killed run keeps what it logged (like metrics.jsonl)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run named after the run folder, offline unless WANDB_MODE is set; its files go to RUN_DIR/wandb.
    The id comes from the run folder's path, so a resumed run continues the same W&B run."""

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any], env: Mapping[str, str]):
        import wandb

        self.mode = env.get("WANDB_MODE") or WANDB_DEFAULT_MODE
        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=env.get("WANDB_PROJECT") or "ghostvis", name=run_name, id=run_id,
                              resume="allow", dir=str(run_dir), config=dict(config), mode=self.mode)

    def log(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


@dataclass
class LogBackends:
    """The run's requested backends, opened on the first record (once the launch is accepted and the run
    folder is in place), so a launch refused later leaves no event files behind."""

    names: tuple[str, ...]
    run_dir: Path
    run_name: str
    config: dict[str, Any]
    start_step: int = 0
    """The step the run continues from (set by the trainer after restoring)."""
    sinks: list[MetricsSink] | None = None

    def log(self, record: Mapping[str, Any]) -> None:
        """Hand one metrics record to every backend."""
        if not self.names:
            return
        if self.sinks is None:
            self.sinks = [self._open(name) for name in self.names]
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        """Close every opened backend (flushes TensorBoard, finishes the W&B run)."""
        for sink in self.sinks or []:
            sink.close()
        self.sinks = None

    def describe(self) -> str:
        """Where the metrics go, for the startup log."""
        where = [f"{self.run_dir / 'metrics.jsonl'}"]
        if "tensorboard" in self.names:
            where.append(f"TensorBoard ({self.run_dir / TENSORBOARD_DIR}: tensorboard --logdir "
                         f"{self.run_dir / TENSORBOARD_DIR})")
        if "wandb" in self.names:
            mode = os.environ.get("WANDB_MODE") or WANDB_DEFAULT_MODE
            where.append(f"W&B ({mode}{', wandb sync to upload' if mode == 'offline' else ''})")
        return ", ".join(where)

    def _open(self, name: str) -> MetricsSink:
        if name == "tensorboard":
            return TensorBoardSink(self.run_dir, self.start_step)
        return WandbSink(self.run_dir, self.run_name, self.config, os.environ)


def open_log_backends(names: Sequence[str], run_dir: Path, run_name: str, config: Mapping[str, Any]) -> LogBackends:
    """The run's backends after checking each one's package (BackendUnavailableError with the pip command)."""
    check_available(names)
    return LogBackends(tuple(names), Path(run_dir), run_name, dict(config))
