"""Crash-safe checkpoints: step_NNNNNN/{model.safetensors, optimizer.pt, state.json} inside a run folder.

A checkpoint is written into `.tmp_step_NNNNNN-<pid>/`, every file fsynced, the folder fsynced, then renamed to
`step_NNNNNN/` and the run folder fsynced. A rename is atomic, so a `step_*` folder was complete when written;
`state.json` carries a manifest (size + sha256 of every other file) so truncation or corruption after the fact
is caught on load. Loading never unpickles: safetensors for weights, torch.load(weights_only=True) for the
optimizer, JSON for the rest. An error while loading never changes anything on disk.

state.json is a `TrainState` (step, tokens, per-rank loader position and RNG, the model's kind and config, the
recipe and its data format) plus the format number and the manifest; `TrainState.read` validates it, naming the
file and the field, and gives fields older writers did not record their documented defaults. Weights go into a
model only through `load_model_weights` (every key and shape checked), which `GPT.from_checkpoint` uses too.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ghostvis_core.atomic import atomic_path, fsync_dir, fsync_file, replace_dir_atomic, write_json_atomic
from ghostvis_core.errors import CheckpointError
from ghostvis_core.log import get_logger
from ghostvis_core.train.recipe_spec import (
    DATA_FORMATS,
    MODEL_KINDS,
    DataFormat,
    ModelKind,
    legacy_data_format,
)

STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_TIED_KEY = "ghostvis_tied"


def step_dir_name(step: int) -> str:
    """'step_000042'."""
    return f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_NNNNNN folder in the run, oldest first (temporary folders never match)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for child in run_dir.iterdir():
        m = STEP_DIR_RE.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), child))
    return sorted(out)


def is_complete(step_dir: Path) -> bool:
    """True when a step folder holds its weights and state.json. Folders are renamed into place whole, so an
    incomplete one was emptied or copied by hand; it is never resumed from or answered with."""
    return (Path(step_dir) / STATE_FILE).is_file() and (Path(step_dir) / MODEL_FILE).is_file()


def latest_checkpoint(run_dir: Path, *, log_skipped: bool = False) -> Path | None:
    """The newest complete step_NNNNNN folder of a run (see is_complete), or None; log_skipped names each newer
    incomplete folder passed over."""
    for _, path in reversed(list_checkpoints(run_dir)):
        if is_complete(path):
            return path
        if log_skipped:
            get_logger().warning(f"skipping {path}: an incomplete checkpoint folder (no {STATE_FILE} or {MODEL_FILE})")
    return None


# ---------------------------------------------------------------------------------------------- file helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_info(path: Path) -> dict[str, Any]:
    """Manifest entry: size in bytes and sha256 hex digest."""
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


# ------------------------------------------------------------------------------------------------ RNG state


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, CUDA of `device`) as JSON-able values."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "cuda": None,
    }
    if device.type == "cuda":
        out["cuda"] = _b64(torch.cuda.get_rng_state(device).numpy().tobytes())
    return out


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of capture_rng_state."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if device.type == "cuda" and state.get("cuda"):
        cuda_state = torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8)
        torch.cuda.set_rng_state(cuda_state, device)


# ------------------------------------------------------------------------------------------------ save


def _dedup_tied(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop aliases of shared tensors (tied embeddings) that safetensors refuses; return {alias: kept name}."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        t = tensor.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.to("cpu").contiguous()
    return kept, aliases


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: Mapping[str, Any],
    keep_last: int,
) -> Path:
    """Write step_NNNNNN atomically (tmp folder + fsync + rename), then prune to the newest `keep_last`.

    `state` is what state.json holds besides format/step/manifest: `TrainState.to_dict()` in training.
    """
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp_{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    tensors, aliases = _dedup_tied(model_state)
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", _TIED_KEY: json.dumps(aliases)})
    fsync_file(tmp / MODEL_FILE)
    with atomic_path(tmp / OPTIMIZER_FILE) as optimizer_file:
        torch.save(optimizer_state, optimizer_file)
    manifest = {name: file_info(tmp / name) for name in (MODEL_FILE, OPTIMIZER_FILE)}
    full_state = {"format": FORMAT_VERSION, **state, "step": step, "manifest": manifest}
    write_json_atomic(tmp / STATE_FILE, full_state, indent=None)

    # final exists only when a run restarted from an older step re-reaches this one: the new timeline wins
    replace_dir_atomic(tmp, final)
    prune_checkpoints(run_dir, step, keep_last)
    return final


def prune_checkpoints(run_dir: Path, newest_step: int, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints up to `newest_step` (0 keeps all); returns deleted."""
    if keep_last <= 0:
        return []
    ckpts = [(s, p) for s, p in list_checkpoints(run_dir) if s <= newest_step]
    deleted = []
    for _, path in ckpts[:-keep_last]:
        # rename first: a half-deleted folder must never look like a checkpoint
        doomed = path.with_name(f".del_{path.name}-{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        deleted.append(path)
    if deleted:
        fsync_dir(run_dir)
    return deleted


def clean_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove .tmp_/.del_/.old_ folders left by a crashed process (never complete checkpoints)."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for child in run_dir.iterdir():
        if child.is_dir() and re.match(r"^\.(tmp|del|old)_step_\d+-\d+$", child.name):
            shutil.rmtree(child)
            removed.append(child)
    return removed


def supersede_newer(run_dir: Path, step: int) -> list[Path]:
    """Rename checkpoints newer than `step` to superseded_step_NNNNNN (kept, no longer resumable by auto)."""
    moved = []
    for s, path in list_checkpoints(run_dir):
        if s > step:
            target = path.with_name(f"superseded_{path.name}")
            if target.exists():
                target = path.with_name(f"superseded_{path.name}-{os.getpid()}")
            os.rename(path, target)
            moved.append(target)
    if moved:
        fsync_dir(Path(run_dir))
    return moved


# ------------------------------------------------------------------------------------------------ load


def _fix_hint(path: Path) -> str:
    older = [p for s, p in list_checkpoints(path.parent) if p != path and STEP_DIR_RE.match(path.name)
             and s < int(STEP_DIR_RE.match(path.name).group(1))]
    options = []
    if older:
        options.append(f"use the older checkpoint {older[-1]} (`ghostvis train --resume` or `ghostvis infer "
                       "--model` take it)")
    options.append("train again with --resume none under a new --run NAME, or answer with another --model")
    return "Fix: " + ", or ".join(options) + ". Nothing on disk was changed."


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder, checked for the fields a resume needs (no file hashing)."""
    path = Path(path)
    state_path = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (a step_NNNNNN folder or a run)")
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing. {_fix_hint(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted: {STATE_FILE} is not valid JSON ({e}). "
                              f"{_fix_hint(path)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path}: expected a JSON object, got {type(state).__name__}. {_fix_hint(path)}")
    for name in ("step", "manifest"):
        if name not in state:
            raise CheckpointError(f"{state_path}: field {name!r} is missing. {_fix_hint(path)}")
    if not isinstance(state["manifest"], dict):
        raise CheckpointError(f"{state_path}: field 'manifest' must be an object, got {state['manifest']!r}. "
                              f"{_fix_hint(path)}")
    return state


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every manifest entry (size, sha256); returns state.json; CheckpointError naming the bad file."""
    path = Path(path)
    state = read_state(path)
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        if name not in state["manifest"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: the manifest lacks {name}. {_fix_hint(path)}")
    for name, info in state["manifest"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing. {_fix_hint(path)}")
        size = file.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupted: {name} has {size} bytes, the manifest says "
                f"{info.get('size')}. {_fix_hint(path)}"
            )
        if _sha256(file) != info.get("sha256"):
            raise CheckpointError(
                f"checkpoint {path} is corrupted: {name} does not match its sha256 in the manifest. {_fix_hint(path)}"
            )
    return state


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Model weights of a (verified) checkpoint, tied aliases restored."""
    file = Path(path) / MODEL_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {MODEL_FILE} ({e}). {_fix_hint(Path(path))}") from e
    for alias, name in json.loads(metadata.get(_TIED_KEY, "{}")).items():
        tensors[alias] = tensors[name]
    return tensors


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """Optimizer state of a (verified) checkpoint, loaded with weights_only=True."""
    file = Path(path) / OPTIMIZER_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {OPTIMIZER_FILE} ({e}). {_fix_hint(Path(path))}") from e


def check_model_state(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Every key of the model present with its shape, and nothing else: one CheckpointError naming the key."""
    problem = None
    for key, value in expected.items():
        if key not in tensors:
            problem = f"has no tensor {key!r}, which the model needs"
        elif tuple(tensors[key].shape) != tuple(value.shape):
            problem = (f"tensor {key!r} has shape {tuple(tensors[key].shape)}, the model's is "
                       f"{tuple(value.shape)}")
        if problem:
            break
    extra = [key for key in tensors if key not in expected]
    if problem is None and extra:
        problem = f"has tensor {extra[0]!r}, which the model does not have"
    if problem:
        raise CheckpointError(f"checkpoint {path}: {MODEL_FILE} {problem}: it was written for another model "
                              "shape or kind; load it with the model config in its state.json")


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load checkpoint `path`'s weights into `model` (plain, DDP's module or FSDP2-sharded), keys and shapes checked.

    The one way weights get from disk into a model: training (resume, init_from) and GPT.from_checkpoint.
    """
    from ghostvis_core.train.distributed import load_full_model_state

    tensors = load_model_state(path)
    check_model_state(model.state_dict(), tensors, Path(path))
    load_full_model_state(model, tensors)


# ------------------------------------------------------------------------------------------------ state.json


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _is_per_rank_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


# field -> (what it must be, check); every TrainState field is here, so to_dict() output always validates
_FIELD_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "step": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "tokens_seen": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "lr_multiplier": ("a number or null", _is_number_or_none),
    "world_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "loader": ("a list of objects, one per rank", _is_per_rank_list),
    "rng": ("a list of objects, one per rank", _is_per_rank_list),
    "model_kind": (f"one of {', '.join(MODEL_KINDS)}", lambda v: v in MODEL_KINDS),
    "model_config": ("an object or null", lambda v: v is None or isinstance(v, dict)),
    "recipe": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "preset": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "data_format": (f"one of {', '.join(DATA_FORMATS)}", lambda v: v in DATA_FORMATS),
    "time": ("a number or null", _is_number_or_none),
}


@dataclass(kw_only=True, slots=True)
class TrainState:
    """Everything in state.json besides the format number and the manifest: where a run stands at a checkpoint.

    Defaults are what a state.json written before the field existed means (read() fills them in; the one place).
    """

    step: int
    """Optimizer steps completed (required)."""
    tokens_seen: int = 0
    """Training tokens consumed over all ranks."""
    lr_multiplier: float | None = None
    """Schedule multiplier of the learning rate at `step` (informational; the schedule recomputes it)."""
    world_size: int = 1
    """Ranks that wrote `loader` and `rng`."""
    loader: list[dict[str, Any]] = field(default_factory=list)
    """PackedBatchLoader.state_dict() of each rank, rank order."""
    rng: list[dict[str, Any]] = field(default_factory=list)
    """capture_rng_state() of each rank, rank order."""
    model_kind: ModelKind = "gpt"
    """Which model class the weights belong to."""
    model_config: dict[str, Any] | None = None
    """The model's config dict (GPTConfig.to_dict()); legacy: the run's config.json "model" entry."""
    recipe: str | None = None
    """Recipe that trained it; legacy: the run's config.json "train.recipe", else None."""
    preset: str | None = None
    """Model preset name of the run."""
    data_format: DataFormat = "text"
    """What the model was trained on; inference prompts chat models through the chat template. Legacy: the
    recipe's RecipeSpec.data_format ("text" for an unregistered or unknown recipe)."""
    time: float | None = None
    """Unix time the checkpoint was written."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields, as written into state.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> TrainState:
        """Validate a state.json object read from `where` (the file, for messages); CheckpointError names the
        file and the field."""
        where = Path(where)
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}. "
                                  f"{_fix_hint(where.parent)}")
        if "step" not in data:
            raise CheckpointError(f"{where}: field 'step' is missing. {_fix_hint(where.parent)}")
        for name, (expected, ok) in _FIELD_RULES.items():
            if name in data and not ok(data[name]):
                raise CheckpointError(f"{where}: field {name!r} must be {expected}, got {data[name]!r}. "
                                      f"{_fix_hint(where.parent)}")
        return cls(**{name: data[name] for name in _FIELD_RULES if name in data})

    @classmethod
    def read(cls, step_dir: Path, *, verify: bool = True) -> TrainState:
        """state.json of checkpoint `step_dir`, validated, legacy fields filled in; verify: also check the
        manifest (size and sha256 of every file) first."""
        step_dir = Path(step_dir)
        data = verify_checkpoint(step_dir) if verify else read_state(step_dir)
        return cls.from_dict(_with_legacy_fields(data, step_dir.parent), step_dir / STATE_FILE)

    def require_model_config(self, kind: ModelKind, step_dir: Path) -> dict[str, Any]:
        """The model config, checked to belong to a `kind` model (CheckpointError otherwise)."""
        if self.model_kind != kind:
            raise CheckpointError(f"checkpoint {step_dir} holds a {self.model_kind} model, not a {kind} model")
        if self.model_config is None:
            raise CheckpointError(f"{Path(step_dir) / STATE_FILE}: field 'model_config' is missing, and the run's "
                                  "config.json has no \"model\" entry either")
        _check_model_config(self, Path(step_dir) / STATE_FILE)
        return self.model_config


def _check_model_config(state: TrainState, where: Path) -> None:
    """The model config builds a config of the state's model kind; CheckpointError naming the file and field."""
    from ghostvis_core.errors import ConfigError

    if state.model_config is None:
        return
    if state.model_kind == "vlm":
        from ghostvis_core.vision_config import VLMConfig as config_cls
    else:
        from ghostvis_core.config import GPTConfig as config_cls
    try:
        config_cls.from_dict(state.model_config)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: field 'model_config' is not a valid {state.model_kind} model config "
                              f"({e}). {_fix_hint(where.parent)}") from None


def run_config(run_dir: Path) -> dict[str, Any]:
    """A run folder's config.json ({"train": ..., "model": ...}), or {} when it has none."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the run folder is damaged") from None
    return data if isinstance(data, dict) else {}


def _with_legacy_fields(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """state.json of an older writer with the fields it lacks derived as TrainState documents."""
    out = dict(data)
    if "model_config" not in out or "recipe" not in out:
        config = run_config(run_dir)
        out.setdefault("model_config", config.get("model"))
        out.setdefault("recipe", (config.get("train") or {}).get("recipe"))
    if "data_format" not in out:
        out["data_format"] = legacy_data_format(out["recipe"] if isinstance(out["recipe"], str) else None)
    return out


def resolve_checkpoint_spec(spec: str, runs_root: Path, what: str) -> Path:
    """A step_NNNNNN folder from a path to one, a run folder (its latest) or a run name under runs_root."""
    path = Path(spec).expanduser()
    if not path.exists() and not path.is_absolute() and (Path(runs_root) / spec).exists():
        path = Path(runs_root) / spec
    if not path.exists():
        raise CheckpointError(f"{what} {spec}: no such checkpoint or run folder (looked in {runs_root} too)")
    if STEP_DIR_RE.match(path.name):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{what} {spec}: {path} has no step_NNNNNN checkpoint folders")
    return latest


def resolve_resume(resume: str, run_dir: Path, runs_root: Path) -> Path | None:
    """The checkpoint to resume from per TrainConfig.resume (auto | none | PATH), or None for a fresh start."""
    existing = list_checkpoints(run_dir)
    if resume == "none":
        if existing:
            raise CheckpointError(
                f"run folder {run_dir} already has checkpoints ({existing[-1][1].name} is the latest) and "
                "--resume none would overwrite them: pick a new run name with --run NAME, or continue this run "
                "with --resume auto"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir, log_skipped=True)
    path = resolve_checkpoint_spec(resume, runs_root, "--resume")
    if existing and path.parent.resolve() != Path(run_dir).resolve():
        # continuing this run from another run's weights would interleave two histories in one folder
        raise CheckpointError(
            f"--resume {resume}: {path} belongs to another run, and run folder {run_dir} already has checkpoints "
            f"({existing[-1][1].name} is the latest): start a new run with --run NAME --resume {path}, or "
            "continue this run with --resume auto"
        )
    return path


def log_superseded(moved: list[Path]) -> None:
    """One log line per checkpoint moved aside by a resume from an older step."""
    for p in moved:
        get_logger().warning(f"Renamed {p.name.removeprefix('superseded_')} to {p.name}: it is newer than the "
                             "resume point (kept, but --resume auto no longer picks it)")


def build_from_checkpoint(model_cls, config_cls, kind: ModelKind, step_dir: Path, plan, state: TrainState | None):
    """model_cls(config, plan) on the plan's device with checkpoint `step_dir`'s weights: the body of
    GPT.from_checkpoint and VLM.from_checkpoint. The config comes from state.json (checked to be a `kind`
    model); every key and shape is checked while loading."""
    state = state if state is not None else TrainState.read(step_dir)
    config = config_cls.from_dict(state.require_model_config(kind, step_dir))
    with torch.device(plan.device_type):
        model = model_cls(config, plan)
    load_model_weights(model, step_dir)
    return model
