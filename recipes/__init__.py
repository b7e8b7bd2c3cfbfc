"""Training recipes: torchrun entry points (`python -m recipes.NAME [--config resolved.json]`).

Each recipe module defines `default_config() -> TrainConfig` and `main(argv=None)`; the registry below is what
`ghostvis train --list` shows and what the CLI resolves a recipe name against.
"""

RECIPES: dict[str, tuple[str, str]] = {
    "base_train": (
        "recipes.base_train",
        "Pretrain a text model on a corpus (default: tiny model on the embedded corpus, about a minute on CPU)",
    ),
    "chat_sft": (
        "recipes.chat_sft",
        "Fine-tune a base_train checkpoint on chats, loss on assistant tokens only (default: embedded chats); "
        "from a vision_pretrain run: image chats (default: built-in shape questions)",
    ),
    "vision_pretrain": (
        "recipes.vision_pretrain",
        "Align a vision tower to a base_train model on image captions, projector trained (default: built-in shapes)",
    ),
}
