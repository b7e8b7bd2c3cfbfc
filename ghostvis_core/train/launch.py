"""Launching a training run: resolve the recipe config, check GPUs/nodes, build the command and environment.

Everything here except `run_child` is a pure function of its arguments (GPU count, parent environment, CPU
count are parameters), so the CLI's decisions are testable on any machine.

Process layout:
- GPUs (nproc >= 1): `python -m torch.distributed.run --nproc_per_node N ... -m recipes.X --config FILE`.
  One node uses `--standalone` (a local rendezvous on a free port); several nodes use a c10d rendezvous at
  `--rdzv-endpoint` with the run name as `--rdzv-id`, so every node of one run meets in the same group.
- CPU on one node (nproc 0): one plain process, `python -m recipes.X --config FILE`. A single CPU process needs
  no process group, and without the torchrun agent in between, Ctrl-C reaches the trainer directly (no agent
  shutdown timeout, no agent traceback on top of the trainer's output).
- CPU on several nodes: torchrun with one process per node (the trainer picks the gloo backend on CPU).

Signals: the child runs in its own session, so a terminal Ctrl-C reaches it exactly once, forwarded by us (a
trainer that sees a second SIGINT may treat it as "stop now, skip the checkpoint"). torchrun forwards the
signal it receives to every worker and waits for them (30 s by default) before killing them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghostvis_core.atomic import write_json_atomic
from ghostvis_core.errors import ConfigError, DataError, did_you_mean

# Multicast/NVLS switches that must be identical on every rank (a rank that tries NVLS while another does not
# hangs the first collective). Inherited environment already reaches every rank; build_env copies these by
# name as well so the guarantee does not rest on a default, and the dry run lists them.
RANK_ENV_PASSTHROUGH = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")

# CLI flag -> TrainConfig field, for flags that are shorthands of config fields.
FLAG_FIELDS = {
    "--run": "run",
    "--resume": "resume",
    "--preset": "preset",
    "--data": "data",
    "--image-root": "image_root",
    "--skip-bad-records": "skip_bad_records",
    "--device-batch-size": "device_batch_size",
    "--pack-max-length": "pack_max_length",
    "--num-steps": "num_steps",
    "--compile/--no-compile": "compile",
    "--fsdp/--no-fsdp": "fsdp",
    "--fp8": "fp8",
    "--recompute": "activation_checkpointing",
    "--log-to": "log_to",
}

# Config fields that name files or folders which must exist before anything is launched.
_PATH_FIELDS = ("data", "tokenizer", "image_root")
# Checkpoint specs: a path, or a run name the trainer looks up under the runs folder (checkpoint.py).
_CHECKPOINT_FIELDS = ("init_from", "resume")

LAUNCH_DIR = "launch"
RESOLVED_CONFIG_NAME = "resolved_config.json"


def lookup_recipe(name: str, registry: Mapping[str, tuple[str, str]]) -> str:
    """The module of recipe `name`; unknown name -> ConfigError with a suggestion and the list."""
    if name in registry:
        return registry[name][0]
    raise ConfigError(
        f"unknown recipe {name!r}{did_you_mean(name, list(registry), cutoff=0.5)} "
        f"(available: {', '.join(registry)}; see `ghostvis train --list`)"
    )


def resolve_config(default: Any, recipe: str, flags: Mapping[str, Any], overrides: Sequence[str]) -> Any:
    """The recipe's default TrainConfig with `key=value` overrides, then the given CLI flags, applied.

    `flags` maps a FLAG_FIELDS flag to its value (flags the user did not give are left out). A field set both
    by a flag and an override is refused rather than silently picking one.
    """
    override_keys = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r}: expected key=value, e.g. num_steps=100 or model.n_layer=4 "
                "(flags start with --; see `ghostvis train --help`)"
            )
        override_keys[item.split("=", 1)[0].strip().replace("-", "_")] = item
    if "recipe" in override_keys:
        raise ConfigError(
            f"override {override_keys['recipe']!r}: the recipe is the first argument, "
            f"e.g. `ghostvis train chat_sft ...`"
        )
    fields: dict[str, Any] = {}
    for flag, value in flags.items():
        key = FLAG_FIELDS[flag]
        if key in override_keys:
            raise ConfigError(
                f"{key} is given twice ({flag.split('/')[0]} {value} and {override_keys[key]!r}): keep one"
            )
        fields[key] = value
    cfg = default.apply_overrides(list(overrides)) if overrides else default
    fields["recipe"] = recipe
    # dataclasses.replace re-runs __post_init__, so flag values are validated like overrides are.
    cfg = dataclasses.replace(cfg, **fields)
    return absolutize_paths(cfg)


def absolutize_paths(cfg: Any) -> Any:
    """The config with its paths made absolute; a missing data/tokenizer path is a DataError naming the flag.

    init_from/resume may also be run names, which the trainer resolves under the runs folder (and reports
    when missing), so they are made absolute only when they name an existing path here.
    """
    changes: dict[str, Any] = {}
    for key in _PATH_FIELDS:
        value = getattr(cfg, key)
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            flag = {"data": "--data", "image_root": "--image-root"}.get(key, key)
            raise DataError(f"{flag} {value}: no such file or folder; check the path ({key}=PATH)")
        changes[key] = str(path.resolve())
    for key in _CHECKPOINT_FIELDS:
        value = getattr(cfg, key)
        if value is None or value in ("auto", "none"):
            continue
        path = Path(value).expanduser()
        if path.exists():
            changes[key] = str(path.resolve())
    if cfg.runs_root is not None:
        changes["runs_root"] = str(Path(cfg.runs_root).expanduser().resolve())
    return dataclasses.replace(cfg, **changes) if changes else cfg


def resolve_nproc(
    gpus: int | None, *, gpu_count: int, cuda_available: bool, visible_devices: str | None
) -> int:
    """Processes per node: `gpus` checked against the visible GPUs; None = all of them; 0 = one CPU process."""
    visible = (
        f"CUDA_VISIBLE_DEVICES={visible_devices}"
        if visible_devices is not None
        else "CUDA_VISIBLE_DEVICES unset"
    )
    if gpus is None:
        return gpu_count if cuda_available else 0
    if gpus < 0:
        raise ConfigError(f"--gpus {gpus}: expected 0 (CPU) or a number of GPUs")
    if gpus == 0:
        return 0
    if not cuda_available or gpu_count == 0:
        raise ConfigError(
            f"--gpus {gpus} but this machine has no usable CUDA GPU ({visible}); "
            "use --gpus 0 to train on CPU, or run `ghostvis doctor` to see why CUDA is unavailable"
        )
    if gpus > gpu_count:
        noun = "GPU" if gpu_count == 1 else "GPUs"
        raise ConfigError(
            f"--gpus {gpus} but this machine has {gpu_count} visible {noun} ({visible}); "
            f"use --gpus {gpu_count} or fewer, or make more GPUs visible"
        )
    return gpus


def check_multinode(nodes: int, node_rank: int, rdzv_endpoint: str | None) -> None:
    """Validate --nodes/--node-rank/--rdzv-endpoint together (ConfigError naming the flag)."""
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: expected 1 or more")
    if not 0 <= node_rank < nodes:
        raise ConfigError(
            f"--node-rank {node_rank} with --nodes {nodes}: the node rank must be 0..{nodes - 1} "
            "(0 on the first node, 1 on the second, ...)"
        )
    if nodes > 1 and not rdzv_endpoint:
        raise ConfigError(
            f"--nodes {nodes} needs --rdzv-endpoint HOST:PORT: the address every node can reach "
            "(usually node 0, e.g. --rdzv-endpoint 10.0.0.1:29500)"
        )
    if rdzv_endpoint is not None:
        host, sep, port = rdzv_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--rdzv-endpoint {rdzv_endpoint!r}: expected HOST:PORT, e.g. 10.0.0.1:29500")


@dataclass(frozen=True)
class LaunchPlan:
    """What to start on this node."""

    recipe_module: str
    """Module run with -m, e.g. recipes.base_train."""
    config_path: Path
    """The resolved config JSON passed as --config."""
    nproc: int
    """Processes (GPUs) on this node; 0 = CPU."""
    run_id: str
    """Rendezvous id shared by all nodes of the run (the run name)."""
    nodes: int = 1
    """Number of nodes."""
    node_rank: int = 0
    """This node's rank, 0..nodes-1."""
    rdzv_endpoint: str | None = None
    """HOST:PORT of the c10d rendezvous (multi-node only)."""
    python: str = sys.executable
    """Interpreter for the child (this one by default)."""

    @property
    def uses_torchrun(self) -> bool:
        """False only for one CPU process on one node."""
        return self.nproc > 0 or self.nodes > 1

    @property
    def world_size(self) -> int:
        """Total processes across nodes."""
        return max(self.nproc, 1) * self.nodes


def build_command(plan: LaunchPlan) -> list[str]:
    """The exact argv that runs the recipe (see the module docstring for the layout)."""
    recipe = ["-m", plan.recipe_module, "--config", str(plan.config_path)]
    if not plan.uses_torchrun:
        return [plan.python, "-m", plan.recipe_module, "--config", str(plan.config_path)]
    cmd = [plan.python, "-m", "torch.distributed.run", "--nproc_per_node", str(max(plan.nproc, 1))]
    if plan.nodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            "--nnodes", str(plan.nodes),
            "--node-rank", str(plan.node_rank),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", str(plan.rdzv_endpoint),
            "--rdzv-id", plan.run_id,
        ]  # fmt: skip
    return cmd + recipe


def env_changes(plan: LaunchPlan, parent_env: Mapping[str, str], cpu_count: int) -> dict[str, str]:
    """Variables the child gets on top of (or explicitly carried from) the parent environment."""
    changes: dict[str, str] = {}
    if plan.nproc > 1 and "OMP_NUM_THREADS" not in parent_env:
        # N ranks each running one OpenMP thread per core oversubscribe the CPU N times over; share the
        # cores instead (torchrun would set 1, with a warning banner).
        changes["OMP_NUM_THREADS"] = str(max(1, cpu_count // plan.nproc))
    for name in RANK_ENV_PASSTHROUGH:
        if name in parent_env:
            changes[name] = parent_env[name]
    # Progress lines from ranks appear as they are printed, not when a pipe buffer fills.
    if "PYTHONUNBUFFERED" not in parent_env:
        changes["PYTHONUNBUFFERED"] = "1"
    return changes


def build_env(plan: LaunchPlan, parent_env: Mapping[str, str], cpu_count: int) -> dict[str, str]:
    """The child's full environment: the parent's, plus env_changes (torchrun passes it to every rank)."""
    env = dict(parent_env)
    env.update(env_changes(plan, parent_env, cpu_count))
    return env


def format_command(cmd: Sequence[str], changes: Mapping[str, str] | None = None) -> str:
    """A copy-pasteable shell line: VAR=value ... argv."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (changes or {}).items()]
    return " ".join(prefix + [shlex.join(cmd)])


def resolved_config_path(run_dir: Path) -> Path:
    """The launch record, RUN_DIR/launch/resolved_config.json: the config of the newest accepted launch,
    written by the trainer (config.json also holds the model's config)."""
    return Path(run_dir) / LAUNCH_DIR / RESOLVED_CONFIG_NAME


def write_resolved_config(config: Mapping[str, Any], path: Path) -> Path:
    """Write the config JSON atomically: a reader never sees half a file."""
    return write_json_atomic(path, dict(config))


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell would report it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def describe_child_exit(code: int) -> str:
    """What a non-zero `exit_code` of the trainer means, for the one-line error after it (128 + N = signal N)."""
    if code > 128 and code - 128 in {int(s) for s in signal.Signals}:
        sig = signal.Signals(code - 128)
        if sig == signal.SIGKILL:
            return (
                "was killed by SIGKILL, which nothing in GhostVis sends: most often the OS out-of-memory killer "
                "(see `dmesg | grep -i oom`); lower --device-batch-size or --pack-max-length, or free host memory"
            )
        return f"was killed by {sig.name}"
    return f"exited with code {code}; its output above says why"


def run_child(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    forward: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
) -> int:
    """Run `cmd`, forwarding SIGINT/SIGTERM to it, and return its exit code (see exit_code)."""
    state: dict[str, Any] = {"proc": None, "pending": []}

    def _forward(signum: int, _frame: Any) -> None:
        proc = state["proc"]
        if proc is None:
            state["pending"].append(signum)
        elif proc.poll() is None:
            proc.send_signal(signum)

    # Handlers go in before the child starts, so a signal that arrives during Popen is not lost.
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in forward:
            previous[sig] = signal.signal(sig, _forward)
    try:
        proc = subprocess.Popen(list(cmd), env=dict(env), start_new_session=os.name == "posix")
        state["proc"] = proc
        for signum in state["pending"]:
            proc.send_signal(signum)
        # wait() resumes after each forwarded signal (PEP 475), so this returns only when the child exits.
        return exit_code(proc.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- one `ghostvis train` launch: config, machine checks, command, and where each config key came from ----


@dataclass(frozen=True)
class Launch:
    """Everything `ghostvis train` decided, ready to print (dry run) or start."""

    cfg: Any
    """The resolved TrainConfig."""
    default: Any
    """The recipe's default TrainConfig (the dry run marks what differs)."""
    plan: LaunchPlan
    cmd: list[str]
    """The argv that runs the recipe."""
    changes: dict[str, str]
    """Environment variables the child gets on top of the parent's (env_changes)."""
    set_by: dict[str, str]
    """Config key -> what set it (the flag name, or "key=value")."""
    cpu_count: int
    """CPU cores of this node (build_env shares them between ranks)."""
    preset_note: str | None = None
    """The banner line saying which preset a run the user gave none gets, and how to pick another."""


def prepare_launch(
    registry: Mapping[str, tuple[str, str]],
    recipe: str,
    flags: Mapping[str, Any],
    overrides: Sequence[str],
    *,
    gpus: int | None,
    nodes: int,
    node_rank: int,
    rdzv_endpoint: str | None,
    parent_env: Mapping[str, str],
) -> Launch:
    """Resolve `recipe` with `flags` (FLAG_FIELDS flag -> value; None = not given) and `key=value` overrides,
    check GPUs and nodes, and build the command: every decision of `ghostvis train` before anything runs."""
    import importlib

    from ghostvis_core.env import probe_gpus

    module_name = lookup_recipe(recipe, registry)
    given = {flag: value for flag, value in flags.items() if value is not None}
    default = importlib.import_module(module_name).default_config()
    cfg = resolve_config(default, recipe, given, overrides)
    # Only GPU/CPU counts: the full probe_env() also imports every optional package (seconds for vLLM).
    facts = probe_gpus()
    nproc = resolve_nproc(
        gpus,
        gpu_count=facts.gpu_count,
        cuda_available=facts.cuda_available,
        visible_devices=facts.visible_devices,
    )
    check_multinode(nodes, node_rank, rdzv_endpoint)
    if cfg.fsdp and nproc == 0:
        raise ConfigError("--fsdp shards across GPUs: it needs --gpus 1 or more (this launch runs on CPU)")
    cfg, preset_note = choose_preset(cfg, "preset" in config_sources(given, overrides), nproc)
    plan = LaunchPlan(
        recipe_module=module_name,
        config_path=resolved_config_path(cfg.run_dir),
        nproc=nproc,
        run_id=cfg.run,
        nodes=nodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
    )
    cmd = build_command(plan)
    set_by = config_sources(given, overrides)
    if cfg.preset != default.preset and "preset" not in set_by:
        set_by["preset"] = "default here"  # see preset_note
    return Launch(
        cfg=cfg,
        default=default,
        plan=plan,
        cmd=cmd,
        changes=env_changes(plan, parent_env, facts.cpu_count),
        set_by=set_by,
        cpu_count=facts.cpu_count,
        preset_note=preset_note,
    )


def choose_preset(cfg: Any, user_set: bool, nproc: int) -> tuple[Any, str | None]:
    """(config, banner line): the preset of a run whose model is built from one and whose preset the user did not
    set. A run with a checkpoint to resume keeps its own; a fresh one gets the tiny demo preset on a CPU and on
    GPUs the one hardware_limits.GPU_DEFAULT_PRESETS gives for the smallest card's memory."""
    from ghostvis_core import checkpoint as ckpt
    from ghostvis_core.env import probe_gpu_memory_gib
    from ghostvis_core.hardware_limits import default_gpu_preset
    from ghostvis_core.model_configs import PRESETS

    from_preset = cfg.init_from is None or cfg.init_from.strip().lower() == "none"
    if user_set or not from_preset:
        return cfg, None
    pick = "--preset NAME picks another (see ghostvis train --list)"
    latest = ckpt.latest_checkpoint(cfg.run_dir) if cfg.resume == "auto" else None
    if latest is not None:
        # resuming: the trainer refuses another preset than the checkpoint's, so a default must not differ
        saved = ckpt.TrainState.read(latest, verify=False).preset or cfg.preset
        return dataclasses.replace(cfg, preset=saved), f"Preset {saved}: this run's, from {latest}"
    if nproc == 0:
        return cfg, f"Preset {cfg.preset}: the CPU default ({PRESETS[cfg.preset][0]}); {pick}"
    memory = min(probe_gpu_memory_gib())
    preset = default_gpu_preset(memory)
    return (dataclasses.replace(cfg, preset=preset),
            f"Preset {preset}: the default for a {memory:.0f} GiB GPU ({PRESETS[preset][0]}); {pick}")


def config_sources(flags: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Config key -> what set it: the flag (its first spelling, e.g. --compile) or "key=value"."""
    set_by = {FLAG_FIELDS[flag]: flag.split("/")[0] for flag in flags}
    set_by.update({o.split("=", 1)[0].strip().replace("-", "_"): "key=value" for o in overrides})
    return set_by


def flatten_config(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """model.* and optim.* as dotted keys, the way overrides name them."""
    flat: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        if key in ("model", "optim") and isinstance(value, dict):
            for sub, sub_value in value.items():
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


@dataclass(frozen=True)
class ConfigRow:
    """One key of the resolved config as the dry run shows it."""

    key: str
    value: str
    """The value as text: strings as they are, everything else as JSON; compile=None explained."""
    changed: bool
    """Set by the user or different from the recipe's default."""
    source: str
    """What set it ("" = the recipe default)."""


def config_rows(launch: Launch) -> list[ConfigRow]:
    """The resolved config, key by key, with what differs from the default and what set it."""
    flat = flatten_config(launch.cfg.to_dict())
    defaults = flatten_config(launch.default.to_dict())
    rows = []
    for key, value in flat.items():
        source = launch.set_by.get(key, "")
        if not source and key.startswith("model.") and key not in defaults:
            source = "key=value"  # a model field the preset does not set can only come from an override
        changed = key in launch.set_by or defaults.get(key, object()) != value
        shown = json.dumps(value) if not isinstance(value, str) else value
        if key == "compile" and value is None:
            shown = f"auto: {'on' if launch.plan.nproc else 'off'} (on for CUDA, off on CPU)"
        rows.append(ConfigRow(key, shown, changed, source))
    return rows


def dry_run_dict(launch: Launch) -> dict[str, Any]:
    """The dry run as JSON: config, paths, process layout, the exact command and the added environment."""
    cfg, plan = launch.cfg, launch.plan
    return {
        "recipe": cfg.recipe,
        "config": cfg.to_dict(),
        "config_path": str(plan.config_path),
        "run_dir": str(cfg.run_dir),
        "nproc_per_node": plan.nproc,
        "nodes": plan.nodes,
        "node_rank": plan.node_rank,
        "world_size": plan.world_size,
        "device": "cuda" if plan.nproc > 0 else "cpu",
        "command": launch.cmd,
        "command_line": format_command(launch.cmd),
        "env": launch.changes,
        "preset_note": launch.preset_note,
    }


def write_launch_config(launch: Launch) -> Launch:
    """Write the resolved config for the child to a temporary file OUTSIDE the run folder; the Launch that
    passes it. The trainer publishes it as RUN/launch/resolved_config.json only once it accepts the launch
    (publish_launch_record), so a refused launch never rewrites the run's record. The caller removes the file
    (remove_pending_config) when the child has exited."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=f"ghostvis-launch-{launch.cfg.run}-", suffix=".json")
        os.close(fd)
        write_resolved_config(launch.cfg.to_dict(), Path(name))
    except OSError as e:
        raise ConfigError(
            f"cannot write the launch config to the temporary folder {tempfile.gettempdir()} ({e.strerror}): "
            "free space there or point TMPDIR at a writable folder"
        ) from e
    plan = dataclasses.replace(launch.plan, config_path=Path(name))
    return dataclasses.replace(launch, plan=plan, cmd=build_command(plan))


def remove_pending_config(launch: Launch) -> None:
    """Delete the temporary config of write_launch_config (never the published record)."""
    if launch.plan.config_path != resolved_config_path(launch.cfg.run_dir):
        launch.plan.config_path.unlink(missing_ok=True)


def publish_launch_record(cfg: Any) -> Path:
    """The trainer, having accepted the launch: RUN/launch/resolved_config.json, atomically."""
    return write_resolved_config(cfg.to_dict(), resolved_config_path(cfg.run_dir))
