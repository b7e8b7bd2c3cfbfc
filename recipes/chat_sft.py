"""Chat fine-tuning: `python -m recipes.chat_sft [--config resolved.json] [key=value ...]`.

Starts from the latest complete checkpoint of run "base_train" (init_from: model weights only, a fresh
optimizer), reuses that run's tokenizer, and learns only the assistant tokens of the embedded chats.
"""

from __future__ import annotations

import sys

from ghostvis_core.config import OptimizerConfig
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.recipe_spec import RecipeSpec
from recipes._main import default_config_for, recipe_main

SPEC = RecipeSpec(name="chat_sft", data_format="chat", model_kind="gpt", starts_from="base_train",
                  init_from_allowed=True)


def default_config() -> TrainConfig:
    """SFT of the base_train checkpoint on the embedded chats, 40 steps at a lower LR."""
    return default_config_for(SPEC, optim=OptimizerConfig(lr=1e-3), num_steps=40, warmup_steps=2, save_every=20)


def main(argv: list[str] | None = None) -> int:
    """Entry point (also under torchrun); returns the process exit code."""
    return recipe_main(SPEC, default_config, argv)


if __name__ == "__main__":
    sys.exit(main())
