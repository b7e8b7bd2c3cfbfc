"""Everything the loop needs before step 0: resume point, tokenizer, packed data, model config and weights.

Kept apart from loop.py so each piece can be tested alone. Precedence when several sources could give the
tokenizer or the model shape: a checkpoint of this run (resume) > the run the recipe starts from (init_from,
RecipeSpec.starts_from) > the config (tokenizer path / preset + overrides). What a recipe does comes from its
RecipeSpec; nothing here looks at recipe names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.checkpoint import TrainState
from ghostvis_core.config import GPTConfig
from ghostvis_core.errors import CheckpointError, ConfigError
from ghostvis_core.log import get_logger
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.recipe_spec import RecipeSpec, spec_for

# Fields that fix the shape of the weights: a checkpoint only loads into a model that agrees on all of them.
ARCH_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "mlp_hidden", "tie_embeddings")


@dataclass
class StartPoint:
    """Where training starts: a checkpoint of this run to resume, and/or base weights to initialise from."""

    resume_dir: Path | None
    """step_NNNNNN folder to resume (model + optimizer + data position + RNG), or None."""
    resume_state: TrainState | None
    """Its verified state.json."""
    init_dir: Path | None
    """The checkpoint whose model weights (only) start this run (init_from / RecipeSpec.starts_from), or None."""
    base_model_config: dict[str, Any] | None
    """Model config of the checkpoint we load from (resume or init), used to build a matching model."""
    tokenizer_dir: Path | None
    """Tokenizer folder that goes with that checkpoint, or None for the config's choice."""


def runs_root(cfg: TrainConfig) -> Path:
    """The folder that holds run folders."""
    return cfg.run_dir.parent


def _check_same_recipe_and_preset(cfg: TrainConfig, state: TrainState, resume_dir: Path) -> None:
    """A resume continues the run it came from: another recipe or preset would be silently ignored."""
    for field, saved in (("recipe", state.recipe), ("preset", state.preset)):
        wanted = getattr(cfg, field)
        if saved is not None and saved != wanted:
            raise CheckpointError(
                f"{resume_dir} was trained with {field} {saved!r}, and this run asks for {wanted!r}: resuming "
                f"cannot change the {field}; start a new run with --run NAME"
                + (f" (init_from={resume_dir} starts {wanted} from those weights)" if field == "recipe" else "")
            )


def _tokenizer_dir(step_dir: Path) -> Path | None:
    tok_dir = step_dir.parent / "tokenizer"
    return tok_dir if tok_dir.is_dir() else None


def find_start(cfg: TrainConfig) -> StartPoint:
    """Resolve cfg.resume (auto | none | PATH) and the weights the recipe starts from; verify what will load."""
    log = get_logger()
    spec = spec_for(cfg.recipe)
    resume_dir = ckpt.resolve_resume(cfg.resume, cfg.run_dir, runs_root(cfg))
    if resume_dir is not None:
        state = TrainState.read(resume_dir)
        _check_same_recipe_and_preset(cfg, state, resume_dir)
        log.info(f"Resuming from {resume_dir} (step {state.step})")
        return StartPoint(resume_dir, state, None, state.model_config, _tokenizer_dir(resume_dir))
    init_dir = _find_init(cfg, spec)
    if init_dir is None:
        return StartPoint(None, None, None, None, None)
    state = TrainState.read(init_dir)
    log.info(f"Initialising model weights from {init_dir} (step {state.step}; optimizer starts fresh)")
    return StartPoint(None, None, init_dir, state.model_config, _tokenizer_dir(init_dir))


def _find_init(cfg: TrainConfig, spec: RecipeSpec) -> Path | None:
    """The checkpoint a fresh run of `spec` takes its weights from: init_from, else the run it starts from."""
    if cfg.init_from and not spec.init_from_allowed:
        raise ConfigError(f"init_from={cfg.init_from}: recipe {cfg.recipe} trains from scratch: drop init_from")
    source = cfg.init_from or spec.starts_from
    if source is None:
        return None
    try:
        return ckpt.resolve_checkpoint_spec(source, runs_root(cfg), "init_from")
    except CheckpointError as e:
        if source == spec.starts_from:
            raise CheckpointError(
                f"{cfg.recipe} starts from a {spec.starts_from} model, but run '{spec.starts_from}' has no "
                f"checkpoint in {runs_root(cfg)}: run `ghostvis train {spec.starts_from}` first (or set "
                "init_from=PATH)"
            ) from e
        raise


def load_tokenizer(cfg: TrainConfig, start: StartPoint):
    """The run's tokenizer: the checkpoint's (resume / SFT base), else cfg.tokenizer, else the default."""
    from ghostvis_core.data import default_tokenizer
    from ghostvis_core.tokenizer import Tokenizer

    if start.tokenizer_dir is not None:
        if cfg.tokenizer and start.init_dir is not None:
            get_logger().warning(f"tokenizer={cfg.tokenizer} ignored: the base model's tokenizer "
                                 f"{start.tokenizer_dir} must be used with its weights")
        return Tokenizer.load(start.tokenizer_dir)
    if cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"tokenizer={cfg.tokenizer}: no tokenizer.json in that folder; "
                              "train one with `ghostvis tokenizer train` or leave tokenizer unset")
        return Tokenizer.load(path)
    return default_tokenizer(cfg.vocab_size)


def build_dataset(cfg: TrainConfig, tokenizer):
    """Packed rows of (pack_max_length) tokens in the recipe's data format: chats with assistant-only loss, or
    text."""
    from ghostvis_core.data import build_chat_dataset, build_text_dataset

    data_format = spec_for(cfg.recipe).data_format
    if data_format == "chat":
        return build_chat_dataset(cfg.data, tokenizer, cfg.pack_max_length, skip_bad_records=cfg.skip_bad_records)
    if data_format == "text":
        return build_text_dataset(cfg.data, tokenizer, cfg.pack_max_length, kind=cfg.data_kind,
                                  text_column=cfg.text_column, skip_bad_records=cfg.skip_bad_records)
    raise ConfigError(f"recipe {cfg.recipe}: data_format {data_format!r} is not trainable by the GPT trainer yet")


def build_model_config(cfg: TrainConfig, vocab_size: int, start: StartPoint) -> GPTConfig:
    """GPTConfig: the loaded checkpoint's shape (+ cfg.model overrides), or the preset sized to the tokenizer."""
    from ghostvis_core.model_configs import get_preset

    if start.base_model_config is not None:
        fields = {**start.base_model_config, **cfg.model}
        model_config = GPTConfig.from_dict(fields)
        changed = [f for f in ARCH_FIELDS if f in cfg.model and cfg.model[f] != start.base_model_config.get(f)]
        if changed:
            src = start.resume_dir or start.init_dir
            raise ConfigError(
                f"model.{changed[0]}={cfg.model[changed[0]]} differs from the checkpoint {src} "
                f"({start.base_model_config.get(changed[0])}); drop the override or start a new run"
            )
    else:
        overrides = {"vocab_size": vocab_size, **cfg.model}
        if overrides["vocab_size"] < vocab_size:
            raise ConfigError(f"model.vocab_size={overrides['vocab_size']} is smaller than the tokenizer's "
                              f"{vocab_size} tokens: drop the override or raise it")
        model_config = get_preset(cfg.preset, **overrides)
    if cfg.pack_max_length > model_config.sequence_len:
        raise ConfigError(
            f"pack_max_length={cfg.pack_max_length} exceeds the model's sequence_len={model_config.sequence_len}: "
            f"lower pack_max_length or set model.sequence_len={cfg.pack_max_length}"
        )
    return model_config


def check_resume_compatible(model_config: GPTConfig, state: TrainState, path: Path) -> None:
    """The resumed checkpoint's weights fit this model (architecture fields agree)."""
    saved = state.model_config
    if not saved:
        return
    current = dataclasses.asdict(model_config)
    diff = [f for f in ARCH_FIELDS if f in saved and saved[f] != current.get(f)]
    if diff:
        f = diff[0]
        raise CheckpointError(
            f"checkpoint {path} was trained with {f}={saved[f]}, this config has {f}={current.get(f)}: "
            "resume with the same model settings, or start a new run with --run NAME"
        )
