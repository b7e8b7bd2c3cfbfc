"""TrainConfig: everything one training run needs, resolved once and written as JSON next to the run.

The CLI (`ghostvis train RECIPE key=value ...`) and the recipes (`python -m recipes.X --config resolved.json`)
both build a `TrainConfig`; `__post_init__` validates every field so a bad value fails before any work starts,
with a message naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghostvis_core.config import GPTConfig, OptimizerConfig
from ghostvis_core.errors import ConfigError, did_you_mean

_DTYPES = ("auto", "bfloat16", "float32")
_RESUME_KEYWORDS = ("auto", "none")


@dataclass(kw_only=True)
class VisionSettings:
    """The vision tower of a VLM run (`vision=PRESET` is short for vision.preset=PRESET)."""

    preset: str | None = None
    """Tower preset (vision_config.VISION_PRESETS: tiny, siglip-base-224). None: the start checkpoint's tower
    when it is a VLM, else vision.init_from's, else tiny."""
    init_from: str | None = None
    """A local Hugging Face SigLIP / SiglipModel / LLaVA folder whose vision tower starts the run (its config
    gives the tower's shape); ignored on resume, where the checkpoint holds the tower."""

    def __post_init__(self) -> None:
        for key in ("preset", "init_from"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"vision.{key}={value!r}: expected a non-empty string or none")
        if self.preset is not None:
            from ghostvis_core.vision_config import VISION_PRESETS

            if self.preset not in VISION_PRESETS:
                raise ConfigError(f"vision={self.preset!r} is not a vision preset"
                                  f"{did_you_mean(self.preset, list(VISION_PRESETS))}; available: "
                                  f"{', '.join(VISION_PRESETS)}")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run: recipe, run folder, model, optimizer, data, batch geometry, schedule, checkpoints."""

    recipe: str = "base_train"
    """Recipe name: base_train | chat_sft | vision_pretrain (the `recipes/` module that runs it)."""
    run: str = "base_train"
    """Run folder name under the runs root; checkpoints, metrics.jsonl and loss.png go there."""
    runs_root: str | None = None
    """Folder that holds run folders; None = ghostvis_core.paths.runs_dir() (GHOSTVIS_HOME aware)."""
    preset: str = "tiny"
    """Model preset: a key of ghostvis_core.model_configs.PRESETS."""
    model: dict = field(default_factory=dict)
    """GPTConfig field overrides applied on top of the preset, e.g. {"n_layer": 4}."""
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer settings (backend, lr, matrix_lr, weight_decay, betas, eps)."""
    data: str | None = None
    """Training data file or folder; None = the embedded synthetic corpus (base_train) or chats (chat_sft)."""
    data_kind: str = "auto"
    """How to read `data`: auto (from the extension) or an explicit kind understood by ghostvis_core.data."""
    text_column: str = "text"
    """Column/key holding the text in parquet/jsonl records."""
    skip_bad_records: bool = False
    """Skip malformed records (counted and logged) instead of stopping with FILE:LINE."""
    tokenizer: str | None = None
    """Folder with tokenizer.json; None = the default tokenizer (trained once on the embedded corpus, cached)."""
    vocab_size: int = 4096
    """Vocabulary size of the default tokenizer (ignored when `tokenizer` is given)."""
    init_from: str | None = None
    """chat_sft / vision_pretrain: a run folder (latest complete checkpoint), a step_NNNNNN folder, or a local
    Hugging Face Llama folder (save_pretrained layout; its vocab must cover the tokenizer's); weights only."""
    vision: VisionSettings = field(default_factory=VisionSettings)
    """VLM runs: the tower preset and the HF folder it may start from (vision=PRESET, vision.init_from=PATH)."""
    freeze: str | None = None
    """Parts not trained: any of vision, projector, llm (comma-separated), or llm:N (all but the last N decoder
    blocks). None: the recipe's default (vision_pretrain: vision,llm; image chat_sft: vision; text: none)."""
    image_root: str | None = None
    """Folder image paths in `data` are relative to; None = the data file's folder."""
    device_batch_size: int = 8
    """Rows per micro-batch per rank. Lower it on out-of-memory; total_batch_size is kept by accumulation."""
    pack_max_length: int = 256
    """Packed row length T in tokens (<= the model's sequence_len)."""
    total_batch_size: int = -1
    """Tokens per optimizer step across all ranks; -1 = one micro-batch per rank (no accumulation).
    Must be a multiple of device_batch_size * pack_max_length * world_size."""
    num_steps: int = 200
    """Optimizer steps in the run."""
    warmup_steps: int = 10
    """Steps of linear LR warmup from 0 to the base LR."""
    warmdown_frac: float = 0.2
    """Fraction of num_steps at the end over which the LR decays linearly to 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    compile: bool | None = None
    """torch.compile each decoder block; None (the default) = on for CUDA, off on CPU (where compiling a small
    model costs more time than it saves)."""
    dtype: str = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU; or bfloat16 | float32 explicitly."""
    fsdp: bool = False
    """Shard parameters with FSDP2 (fully_shard per block + root) instead of DDP; GPU only."""
    fp8: str = "none"
    """none | tensorwise | rowwise: train the decoder blocks' linears in float8 (torchao; e4m3 forward, e5m2
    gradients for tensorwise, dynamic scales). Needs an sm89+ GPU (rowwise sm90+), bf16 and torchao; refused
    elsewhere. Checkpoints keep the parameters' dtype, so a run without fp8 loads them."""
    activation_checkpointing: str = "none"
    """none | full | selective: recompute each block's (full) or every other block's (selective) activations
    in backward instead of keeping them; fits larger models or batches at the cost of extra forward work."""
    log_every: int = 10
    """Log loss, dt, tok/s, MFU, memory and ETA (and append to metrics.jsonl) every this many steps."""
    log_to: tuple[str, ...] = ()
    """Also send those metrics to: tensorboard (RUN/tensorboard event files), wandb (offline unless WANDB_MODE
    is set); rank 0 only. A backend whose package is missing is refused at launch with the pip command."""
    save_every: int = 100
    """Save a checkpoint every this many steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Keep this many most recent checkpoints; older complete ones are deleted after a new one is in place.
    0 keeps all."""
    resume: str = "auto"
    """auto = continue the latest complete checkpoint of the run if any; none = start fresh (refused if the
    run folder already has checkpoints: pick a new run name); or a path to a step_NNNNNN folder."""
    seed: int = 0
    """Seed for model init, data order and sampling."""

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = _optim_from_dict(self.optim)
        if not isinstance(self.optim, OptimizerConfig):
            raise ConfigError(f"optim: expected OptimizerConfig or dict, got {type(self.optim).__name__}")
        if isinstance(self.vision, dict):
            self.vision = _nested_from_dict(VisionSettings, self.vision, "vision")
        if not isinstance(self.vision, VisionSettings):
            raise ConfigError(f"vision: expected a vision preset name or settings, got {type(self.vision).__name__}")
        if self.freeze is not None:
            from ghostvis_core.train.freeze import parse_freeze

            parse_freeze(self.freeze)
        if not isinstance(self.model, dict):
            raise ConfigError(f"model: expected a dict of GPTConfig overrides, got {type(self.model).__name__}")
        _check_model_overrides(self.model)
        if not self.recipe or not self.recipe.isidentifier():
            raise ConfigError(f"recipe={self.recipe!r}: expected a recipe name such as base_train or chat_sft")
        if not self.run or self.run in (".", "..") or "/" in self.run or "\\" in self.run:
            raise ConfigError(f"run={self.run!r}: expected a plain folder name (no slashes), e.g. run=my_run")
        for name in ("device_batch_size", "pack_max_length", "num_steps", "log_every", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        for name in ("warmup_steps", "save_every", "keep_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 0")
        if self.total_batch_size != -1 and self.total_batch_size < 1:
            raise ConfigError(
                f"total_batch_size={self.total_batch_size}: must be -1 (one micro-batch per rank) or a "
                "positive number of tokens per step"
            )
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ConfigError(f"warmdown_frac={self.warmdown_frac}: must be between 0 and 1")
        if not 0 <= self.grad_clip < math.inf:  # also rejects NaN, which `< 0` lets through
            raise ConfigError(f"grad_clip={self.grad_clip}: must be >= 0 (0 disables clipping)")
        from ghostvis_core.backend_names import ACTIVATION_CHECKPOINTING, FP8_REQUESTS

        if self.fp8 not in FP8_REQUESTS:
            raise ConfigError(f"fp8={self.fp8!r}: expected one of {', '.join(FP8_REQUESTS)}")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(f"activation_checkpointing={self.activation_checkpointing!r}: expected one of "
                              f"{', '.join(ACTIVATION_CHECKPOINTING)}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: expected one of {', '.join(_DTYPES)}")
        if not self.resume:
            raise ConfigError("resume='': expected auto, none, or a path to a step_NNNNNN checkpoint folder")
        _check_preset(self.preset)
        from ghostvis_core.train.log_backends import parse_log_to

        if isinstance(self.log_to, str) or not isinstance(self.log_to, (list, tuple)):
            raise ConfigError(f"log_to={self.log_to!r}: expected a list of backend names, e.g. [\"tensorboard\"]")
        self.log_to = parse_log_to(self.log_to)

    @property
    def run_dir(self) -> Path:
        """The run folder: <runs_root or runs_dir()>/<run>."""
        if self.runs_root is not None:
            return Path(self.runs_root).expanduser() / self.run
        from ghostvis_core.paths import runs_dir

        return runs_dir() / self.run

    def tokens_per_micro_batch(self) -> int:
        """Tokens one rank processes per forward/backward."""
        return self.device_batch_size * self.pack_max_length

    def total_tokens_per_step(self, world_size: int) -> int:
        """Tokens per optimizer step across ranks (resolves total_batch_size=-1)."""
        if self.total_batch_size == -1:
            return self.tokens_per_micro_batch() * world_size
        return self.total_batch_size

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step; ConfigError when total_batch_size does not divide."""
        per_round = self.tokens_per_micro_batch() * world_size
        total = self.total_tokens_per_step(world_size)
        if total % per_round != 0:
            raise ConfigError(
                f"total_batch_size={total} is not a multiple of device_batch_size={self.device_batch_size} x "
                f"pack_max_length={self.pack_max_length} x world_size={world_size} = {per_round} tokens: "
                f"use a multiple of {per_round} (e.g. total_batch_size={max(1, round(total / per_round)) * per_round})"
            )
        return total // per_round

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (optim nested as a dict)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("optim", "vision"):
                value = _jsonable(dataclasses.asdict(value))
            elif f.name == "model":
                value = _jsonable(dict(value))
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. resolved.json); an unknown key is a ConfigError with a suggestion."""
        if not isinstance(d, dict):
            raise ConfigError(f"train config: expected a JSON object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ConfigError(f"unknown train config key {key!r}{did_you_mean(key, names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """Load a resolved config file written by to_json / the CLI."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror}); check the --config path") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_json(self, path: str | Path) -> None:
        """Write the config as indented JSON (atomically: a reader never sees half a file)."""
        from ghostvis_core.atomic import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())

    def apply_overrides(self, overrides: list[str]) -> TrainConfig:
        """A new config with `key=value` overrides applied (typed; `model.X` and `optim.X` for nested fields)."""
        d = self.to_dict()
        d["model"] = dict(d["model"])
        d["optim"] = dict(d["optim"])
        d["vision"] = dict(d["vision"])
        top_hints = typing.get_type_hints(TrainConfig)
        top_names = [f.name for f in dataclasses.fields(TrainConfig)]
        model_hints = typing.get_type_hints(GPTConfig)
        model_names = [f.name for f in dataclasses.fields(GPTConfig)]
        optim_hints = typing.get_type_hints(OptimizerConfig)
        optim_names = [f.name for f in dataclasses.fields(OptimizerConfig)]
        vision_hints = typing.get_type_hints(VisionSettings)
        vision_names = [f.name for f in dataclasses.fields(VisionSettings)]
        all_keys = (
            [n for n in top_names if n not in ("model", "optim")]
            + [f"model.{n}" for n in model_names]
            + [f"optim.{n}" for n in optim_names]
            + [f"vision.{n}" for n in vision_names]
        )
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. num_steps=100 or model.n_layer=4")
            key, text = item.split("=", 1)
            key = key.strip().replace("-", "_")
            if key.startswith("model."):
                sub = key[len("model.") :]
                if sub not in model_names:
                    raise ConfigError(f"unknown override key {key!r}{did_you_mean(key, all_keys)}")
                d["model"][sub] = _parse_value(text, model_hints[sub], key)
            elif key.startswith("optim."):
                sub = key[len("optim.") :]
                if sub not in optim_names:
                    raise ConfigError(f"unknown override key {key!r}{did_you_mean(key, all_keys)}")
                d["optim"][sub] = _parse_value(text, optim_hints[sub], key)
            elif key.startswith("vision."):
                sub = key[len("vision.") :]
                if sub not in vision_names:
                    raise ConfigError(f"unknown override key {key!r}{did_you_mean(key, all_keys)}")
                d["vision"][sub] = _parse_value(text, vision_hints[sub], key)
            elif key == "vision":  # vision=PRESET: the tower preset
                d["vision"]["preset"] = _parse_value(text, vision_hints["preset"], key)
            elif key in top_names and key not in ("model", "optim"):
                d[key] = _parse_value(text, top_hints[key], key)
            elif key in ("model", "optim"):
                raise ConfigError(f"override {key!r}: set nested fields one by one, e.g. {key}.<field>=value")
            else:
                raise ConfigError(f"unknown override key {key!r}{did_you_mean(key, all_keys)}")
        return TrainConfig.from_dict(d)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _nested_from_dict(cls, d: dict[str, Any], what: str):
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise ConfigError(f"unknown {what} key {key!r}{did_you_mean(key, names)}")
    return cls(**d)


def _optim_from_dict(d: dict[str, Any]) -> OptimizerConfig:
    names = [f.name for f in dataclasses.fields(OptimizerConfig)]
    hints = typing.get_type_hints(OptimizerConfig)
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise ConfigError(f"unknown optim key {key!r}{did_you_mean(key, names)}")
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return OptimizerConfig(**kwargs)


def _check_model_overrides(overrides: dict[str, Any]) -> None:
    """Every model override names a GPTConfig field and has its type (a config file's "model" object is checked
    here, where the file is still known, not when the trainer builds the model)."""
    names = [f.name for f in dataclasses.fields(GPTConfig)]
    hints = typing.get_type_hints(GPTConfig)
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown model key {key!r}{did_you_mean(key, names)} (a GPTConfig field)")
        if not _has_type(value, hints[key]):
            raise ConfigError(f"model.{key}={value!r}: expected {_type_name(hints[key])}")


def _has_type(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits an annotation (int, float, bool, str, Literal, X | None); others pass."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _check_preset(preset: str) -> None:
    from ghostvis_core.model_configs import PRESETS

    if preset not in PRESETS:
        raise ConfigError(
            f"preset={preset!r} is not a model preset{did_you_mean(preset, list(PRESETS))}; "
            f"available: {', '.join(PRESETS)}"
        )


# Optional keys whose value "none" means something of its own (see _parse_value).
_NONE_KEYWORD_KEYS = ("init_from",)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse an override string into the field's annotated type."""
    text = text.strip()
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() in ("none", "null"):
            # init_from=none is a keyword (start from random weights), unlike an unset init_from (the recipe's
            # default start), so it stays the string "none"
            return "none" if key in _NONE_KEYWORD_KEYS and text.lower() == "none" else None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse_value(text, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}={text!r}: cannot parse")
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}={text!r}: expected true or false")
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if tp is str:
        return text
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        parts = [p for p in text.strip("()[]").split(",") if p.strip()]
        if args and args[-1] is not Ellipsis and len(args) != len(parts):
            raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values")
        item_types = [args[0]] * len(parts) if args and args[-1] is Ellipsis else list(args) or [str] * len(parts)
        return tuple(_parse_value(p, t, key) for p, t in zip(parts, item_types, strict=True))
    if origin in (dict, list) or tp in (dict, list):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}={text!r}: expected JSON ({e.msg})") from None
    return text
