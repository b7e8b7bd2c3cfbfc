"""Chat fine-tuning: `python -m recipes.chat_sft [--config resolved.json] [key=value ...]`.

Starts from the latest complete checkpoint of run "base_train" (init_from: model weights only, a fresh
optimizer), reuses that run's tokenizer, and learns only the assistant tokens of the embedded chats. With
init_from=<a vision_pretrain run> it fine-tunes that VLM on image chats instead (the built-in shapes
questions by default, or LLaVA-style data=FILE), the LLM unfrozen.
"""

from __future__ import annotations

from ghostvis_core.config import OptimizerConfig
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.recipe_spec import RecipeSpec
from recipes._main import default_config_for, exit_process, recipe_main

# Started from a VLM (init_from=<a vision_pretrain run>), chat_sft trains that VLM on image chats: the data
# format follows the start checkpoint's model kind (RecipeSpec.vlm_variant). The tower stays frozen, the
# projector and the whole LLM train (freeze=vision,llm:N trains only the LLM's last N blocks).
IMAGE_SPEC = RecipeSpec(name="chat_sft", data_format="image-chat", model_kind="vlm", starts_from="base_train",
                        init_from_allowed=True, freeze="vision", image_builtin="shapes-qa")
SPEC = RecipeSpec(name="chat_sft", data_format="chat", model_kind="gpt", starts_from="base_train",
                  init_from_allowed=True, vlm_variant=IMAGE_SPEC)


def default_config() -> TrainConfig:
    """SFT of the base_train checkpoint on the embedded chats, 40 steps at a lower LR."""
    return default_config_for(SPEC, optim=OptimizerConfig(lr=1e-3), num_steps=40, warmup_steps=2, save_every=20)


def main(argv: list[str] | None = None) -> int:
    """Entry point (also under torchrun); returns the process exit code."""
    return recipe_main(SPEC, default_config, argv)


if __name__ == "__main__":
    exit_process(main())
