"""Vision-language alignment: `python -m recipes.vision_pretrain [--config resolved.json] [key=value ...]`.

Trains a LLaVA-style VLM (SigLIP tower -> projector -> the language model) on image captions: the built-in
"shapes-caption" task by default (drawn by code, no download), or LLaVA-style data=FILE. Only the projector
trains by default (freeze=vision,llm), at a high learning rate, as LLaVA's stage 1 does.

The language model comes from the latest base_train run by default, or init_from=PATH (a GhostVis run or a
local Hugging Face Llama folder), or init_from=none for a randomly initialised one (warned: captions alone
teach it little language). The tower is the vision=PRESET preset (tiny by default) or vision.init_from=PATH
(a local HF SigLIP / SiglipModel / LLaVA folder).
"""

from __future__ import annotations

from ghostvis_core.config import OptimizerConfig
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.recipe_spec import RecipeSpec
from recipes._main import default_config_for, exit_process, recipe_main

SPEC = RecipeSpec(name="vision_pretrain", data_format="image-chat", model_kind="vlm", starts_from="base_train",
                  init_from_allowed=True, scratch_allowed=True, freeze="vision,llm", image_builtin="shapes-caption")


def default_config() -> TrainConfig:
    """Tiny tower on the base_train model, projector only, 60 steps."""
    return default_config_for(SPEC, optim=OptimizerConfig(lr=3e-3), num_steps=60, warmup_steps=3, save_every=30)


def main(argv: list[str] | None = None) -> int:
    """Entry point (also under torchrun); returns the process exit code."""
    return recipe_main(SPEC, default_config, argv)


if __name__ == "__main__":
    exit_process(main())
