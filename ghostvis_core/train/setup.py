"""Everything the loop needs before step 0: resume point, tokenizer, packed data, model config and weights.

Kept apart from loop.py so each piece can be tested alone. Precedence when several sources could give the
tokenizer or the model shape: a checkpoint of this run (resume) > the run the recipe starts from (init_from,
RecipeSpec.starts_from) > the config (tokenizer path / preset + overrides). What a recipe does comes from its
RecipeSpec; nothing here looks at recipe names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.checkpoint import TrainState
from ghostvis_core.config import GPTConfig
from ghostvis_core.errors import CheckpointError, ConfigError
from ghostvis_core.log import get_logger
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.recipe_spec import ModelKind, RecipeSpec, spec_for
from ghostvis_core.vision_config import VisionConfig, VLMConfig

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
    spec: RecipeSpec | None = None
    """The recipe's spec for this start (RecipeSpec.for_start: chat_sft from a VLM trains image chats)."""
    base_kind: ModelKind | None = None
    """Model kind of base_model_config ("gpt" also for an HF Llama folder), None without one."""
    hf_text_weights: dict[str, Any] | None = None
    """init_from a local HF Llama folder: its state dict, loaded into the (language) model by restore()."""
    vision_config: VisionConfig | None = None
    """vision.init_from's tower config (fresh runs only), else None."""
    vision_weights: dict[str, Any] | None = None
    """vision.init_from's tower state dict, loaded into the VLM's tower by restore()."""

    @property
    def text_model_config(self) -> dict[str, Any] | None:
        """The language model's part of base_model_config (a VLM checkpoint's "text")."""
        if self.base_kind == "vlm" and self.base_model_config is not None:
            return self.base_model_config["text"]
        return self.base_model_config


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
        state.require_model_config(state.model_kind, resume_dir)  # else a preset's shape would be guessed
        _check_same_recipe_and_preset(cfg, state, resume_dir)
        log.info(f"Resuming from {resume_dir} (step {state.step})")
        return StartPoint(resume_dir, state, None, state.model_config, _tokenizer_dir(resume_dir),
                          spec.for_start(state.model_kind), state.model_kind)
    vision = _read_vision_init(cfg, spec)
    hf_folder = _hf_llama_init(cfg, spec)
    if hf_folder is not None:
        from ghostvis_core.hf_import import read_hf_llama

        text, weights = read_hf_llama(hf_folder)
        log.info(f"Initialising the language model from the Hugging Face folder {hf_folder} (GhostVis's "
                 "tokenizer is kept; optimizer starts fresh)")
        return StartPoint(None, None, hf_folder, text.to_dict(), None, spec.for_start("gpt"), "gpt", weights,
                          *vision)
    init_dir = _find_init(cfg, spec)
    if init_dir is None:
        if spec.model_kind == "vlm":
            log.warning(f"{cfg.recipe}: init_from=none: the language model starts from random weights; image "
                        "captions alone teach it little language (train base_train first for a real start)")
        return StartPoint(None, None, None, None, None, spec.for_start(None), None, None, *vision)
    state = TrainState.read(init_dir)
    state.require_model_config(state.model_kind, init_dir)
    run_spec = spec.for_start(state.model_kind)
    if state.model_kind == "vlm" and vision[0] is not None:
        raise ConfigError(f"vision.init_from={cfg.vision.init_from}: the VLM checkpoint {init_dir} already holds "
                          "the tower; drop vision.init_from (or start from a text run)")
    log.info(f"Initialising model weights from {init_dir} (step {state.step}; optimizer starts fresh)")
    return StartPoint(None, None, init_dir, state.model_config, _tokenizer_dir(init_dir), run_spec,
                      state.model_kind, None, *vision)


def _is_hf_folder(path: Path) -> bool:
    """A save_pretrained folder: config.json with a model_type (a GhostVis run's config.json has none)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # not ours to judge here: the checkpoint reader names the damaged file
    return isinstance(data, dict) and "model_type" in data


def _hf_llama_init(cfg: TrainConfig, spec: RecipeSpec) -> Path | None:
    """init_from as a local Hugging Face folder, else None (a run / checkpoint, or no init_from)."""
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from).expanduser()
    if not _is_hf_folder(path):
        return None
    if not spec.init_from_allowed:
        raise ConfigError(f"init_from={cfg.init_from}: recipe {cfg.recipe} trains from scratch: drop init_from")
    return path


def _read_vision_init(cfg: TrainConfig, spec: RecipeSpec) -> tuple[VisionConfig | None, dict | None]:
    """(tower config, state dict) of vision.init_from, or (None, None) without it."""
    if cfg.vision.init_from is None:
        return None, None
    if spec.model_kind != "vlm" and spec.vlm_variant is None:
        raise ConfigError(f"vision.init_from={cfg.vision.init_from}: recipe {cfg.recipe} trains a text model; "
                          "drop vision.init_from")
    from ghostvis_core.hf_import import read_hf_siglip_vision

    config, weights = read_hf_siglip_vision(cfg.vision.init_from)
    get_logger().info(f"Vision tower from the Hugging Face folder {cfg.vision.init_from}")
    return config, weights


def _find_init(cfg: TrainConfig, spec: RecipeSpec) -> Path | None:
    """The checkpoint a fresh run of `spec` takes its weights from: init_from, else the run it starts from
    (none for a recipe that may start from scratch and init_from=none)."""
    if cfg.init_from and not spec.init_from_allowed:
        raise ConfigError(f"init_from={cfg.init_from}: recipe {cfg.recipe} trains from scratch: drop init_from")
    if cfg.init_from is not None and cfg.init_from.strip().lower() == "none":
        if not spec.scratch_allowed:
            raise ConfigError(f"init_from=none: recipe {cfg.recipe} cannot start from random weights; give "
                              f"init_from=PATH or train `ghostvis train {spec.starts_from}` first")
        return None
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
    """The run's tokenizer: the checkpoint's (resume / SFT base), else cfg.tokenizer, else one trained on a
    pretraining run's cfg.data (cached by its content hash), else the default (the embedded data's)."""
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
    if cfg.data is not None and (start.spec or spec_for(cfg.recipe)).data_format == "text":
        from ghostvis_core.paths import datasets_dir
        from ghostvis_core.tokenizer_training import data_tokenizer

        return data_tokenizer(Path(cfg.data), cfg.vocab_size, kind=cfg.data_kind, text_column=cfg.text_column,
                              skip_bad_records=cfg.skip_bad_records, cache_root=datasets_dir() / "tokenizers")
    return default_tokenizer(cfg.vocab_size)


def build_data(cfg: TrainConfig, tokenizer, spec: RecipeSpec, info, vision: VisionConfig | None = None):
    """(packed data, this rank's batch loader) in the run's data format: the one place the trainer builds them."""
    if spec.data_format == "image-chat":
        return build_image_data(cfg, tokenizer, spec, info, vision)
    from ghostvis_core.data import PackedBatchLoader

    packed = build_dataset(cfg, tokenizer, spec)
    return packed, PackedBatchLoader(packed, cfg.device_batch_size, rank=info.rank, world_size=info.world_size,
                                     seed=cfg.seed)


def build_image_data(cfg: TrainConfig, tokenizer, spec: RecipeSpec, info, vision: VisionConfig):
    """Image chats (LLaVA-style data, or the recipe's built-in image task) packed into rows, and their loader
    (pixels decoded in DataLoader workers)."""
    from ghostvis_core.data import ImageBatchLoader, build_image_chat_dataset

    packed = build_image_chat_dataset(cfg.data, tokenizer, cfg.pack_max_length, vision, image_root=cfg.image_root,
                                      skip_bad_records=cfg.skip_bad_records, builtin=spec.image_builtin)
    loader = ImageBatchLoader(packed, cfg.device_batch_size, rank=info.rank, world_size=info.world_size,
                              seed=cfg.seed, vision=vision)
    return packed, loader


def build_dataset(cfg: TrainConfig, tokenizer, spec: RecipeSpec | None = None):
    """Packed rows of (pack_max_length) tokens in the recipe's data format: chats with assistant-only loss, or
    text."""
    from ghostvis_core.data import build_chat_dataset, build_text_dataset

    data_format = (spec or spec_for(cfg.recipe)).data_format
    if data_format == "chat":
        return build_chat_dataset(cfg.data, tokenizer, cfg.pack_max_length, skip_bad_records=cfg.skip_bad_records)
    if data_format == "text":
        return build_text_dataset(cfg.data, tokenizer, cfg.pack_max_length, kind=cfg.data_kind,
                                  text_column=cfg.text_column, skip_bad_records=cfg.skip_bad_records)
    raise ConfigError(f"recipe {cfg.recipe}: data_format {data_format!r} is not trainable by the GPT trainer yet")


def build_model_config(cfg: TrainConfig, vocab_size: int, start: StartPoint) -> GPTConfig:
    """GPTConfig: the loaded checkpoint's shape (+ cfg.model overrides), or the preset sized to the tokenizer."""
    from ghostvis_core.model_configs import get_preset

    base = start.text_model_config
    if base is not None:
        fields = {**base, **cfg.model}
        model_config = GPTConfig.from_dict(fields)
        changed = [f for f in ARCH_FIELDS if f in cfg.model and cfg.model[f] != base.get(f)]
        if changed:
            src = start.resume_dir or start.init_dir
            raise ConfigError(
                f"model.{changed[0]}={cfg.model[changed[0]]} differs from the checkpoint {src} "
                f"({base.get(changed[0])}); drop the override or start a new run"
            )
        if start.hf_text_weights is not None and model_config.vocab_size < vocab_size:
            raise ConfigError(
                f"init_from={start.init_dir}: its vocab_size {model_config.vocab_size} is smaller than the "
                f"tokenizer's {vocab_size} tokens; a run keeps GhostVis's tokenizer, so the Llama folder needs "
                "a vocabulary at least that large (tokenizer=PATH picks a smaller GhostVis tokenizer)"
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


VISION_SHAPE_FIELDS = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")


def build_vlm_config(cfg: TrainConfig, text: GPTConfig, image_token_id: int, start: StartPoint) -> VLMConfig:
    """The VLMConfig of a VLM run: the text config, and the tower of (first that applies) the VLM checkpoint it
    starts from, vision.init_from's folder, or the vision preset (tiny by default). An explicit vision preset
    that disagrees with the checkpoint's or the folder's tower is one ConfigError."""
    from ghostvis_core.vision_config import get_vision_config

    projector_hidden = None
    if start.base_kind == "vlm":
        saved = VLMConfig.from_dict(start.base_model_config)
        vision, projector_hidden, source = saved.vision, saved.projector_hidden, start.resume_dir or start.init_dir
    elif start.vision_config is not None:
        vision, source = start.vision_config, f"vision.init_from={cfg.vision.init_from}"
    else:
        return VLMConfig(text=text, vision=get_vision_config(cfg.vision.preset or "tiny"),
                         image_token_id=image_token_id)
    if cfg.vision.preset is not None:
        preset = get_vision_config(cfg.vision.preset)
        diff = [f for f in VISION_SHAPE_FIELDS if getattr(preset, f) != getattr(vision, f)]
        if diff:
            raise ConfigError(
                f"vision={cfg.vision.preset} has {diff[0]}={getattr(preset, diff[0])} but the tower of {source} "
                f"has {getattr(vision, diff[0])}: drop vision= (the tower's shape comes from {source})"
            )
    return VLMConfig(text=text, vision=vision, image_token_id=image_token_id, projector_hidden=projector_hidden)


def check_vlm_resume_compatible(config: VLMConfig, state: TrainState, path: Path) -> None:
    """check_resume_compatible for a VLM: the text decoder's shape and the tower's agree with the checkpoint."""
    saved = state.model_config or {}
    text_state = dataclasses.replace(state, model_config=saved.get("text"))
    check_resume_compatible(config.text, text_state, path)
    tower = saved.get("vision") or {}
    diff = [f for f in VISION_SHAPE_FIELDS if f in tower and tower[f] != getattr(config.vision, f)]
    if diff:
        raise CheckpointError(f"checkpoint {path} has a tower with {diff[0]}={tower[diff[0]]}, this config "
                              f"{getattr(config.vision, diff[0])}: resume with the same vision settings")
