"""Chat fine-tuning: `python -m recipes.chat_sft [--config resolved.json] [key=value ...]`.

Starts from the latest complete checkpoint of run "base_train" (init_from: model weights only, a fresh
optimizer), reuses that run's tokenizer, and learns only the assistant tokens of the embedded chats.
"""

from __future__ import annotations

import sys

from ghostvis_core.config import OptimizerConfig
from ghostvis_core.train.config import TrainConfig


def default_config() -> TrainConfig:
    """SFT of the base_train checkpoint on the embedded chats, 40 steps at a lower LR."""
    return TrainConfig(
        recipe="chat_sft",
        run="chat_sft",
        preset="tiny",
        init_from="base_train",
        optim=OptimizerConfig(lr=1e-3),
        device_batch_size=8,
        pack_max_length=128,
        num_steps=40,
        warmup_steps=2,
        warmdown_frac=0.3,
        log_every=5,
        save_every=20,
        keep_last=2,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point (also under torchrun); returns the process exit code."""
    from recipes._main import run_recipe

    return run_recipe(argv, default_config, "python -m recipes.chat_sft")


if __name__ == "__main__":
    sys.exit(main())
