"""The model factory: which class a model kind is, its config, and loading it from a checkpoint.

Keyed on `TrainState.model_kind` / `RecipeSpec.model_kind` ("gpt" | "vlm"), never on recipe names; the trainer
and the engine build and load every model through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ghostvis_core.backends import BackendPlan
from ghostvis_core.config import GPTConfig
from ghostvis_core.train.recipe_spec import ModelKind
from ghostvis_core.vision_config import VLMConfig

ModelConfig = GPTConfig | VLMConfig


def _classes(kind: ModelKind):
    from ghostvis_core.gpt import GPT
    from ghostvis_core.vlm import VLM

    return {"gpt": (GPT, GPTConfig), "vlm": (VLM, VLMConfig)}[kind]


def model_config_from_dict(kind: ModelKind, data: dict[str, Any]) -> ModelConfig:
    """The config of a `kind` model from its dict (TrainState.model_config)."""
    return _classes(kind)[1].from_dict(data)


def model_kind_of(config: ModelConfig) -> ModelKind:
    """"vlm" for a VLMConfig, "gpt" for a GPTConfig."""
    return "vlm" if isinstance(config, VLMConfig) else "gpt"


def text_config(config: ModelConfig) -> GPTConfig:
    """The language model's config (a GPT's own; a VLM's text decoder): what backend plans are made for."""
    return config.text if isinstance(config, VLMConfig) else config


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT of a model: a GPT itself, a VLM's text decoder (what the engine decodes through)."""
    return getattr(model, "language_model", model)


def build_model(config: ModelConfig, plan: BackendPlan) -> torch.nn.Module:
    """A freshly initialised model of `config`'s kind, built with `plan` (in the caller's device context)."""
    return _classes(model_kind_of(config))[0](config, plan)


def from_checkpoint(step_dir: Path, plan: BackendPlan, state=None) -> torch.nn.Module:
    """The model saved in `step_dir`, of the kind its state.json records (GPT or VLM)."""
    from ghostvis_core.checkpoint import TrainState

    state = state if state is not None else TrainState.read(step_dir)
    return _classes(state.model_kind)[0].from_checkpoint(step_dir, plan, state)
