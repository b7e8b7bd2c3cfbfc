"""What a recipe is, as data: the library asks the spec, never the recipe's name.

Each recipe module in `recipes/` declares `SPEC = RecipeSpec(...)`; `spec_for(name)` finds it through the
registry (`recipes.RECIPES`), so the trainer and checkpoint readers learn "chats or text", "GPT or VLM" and
"starts from which run" from the recipe itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal, get_args

from ghostvis_core.errors import ConfigError

DataFormat = Literal["text", "chat", "image-chat"]
ModelKind = Literal["gpt", "vlm"]
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)


@dataclass(frozen=True, kw_only=True, slots=True)
class RecipeSpec:
    """A recipe's behaviour: its data, its model and where its weights come from."""

    name: str
    """Registry name, e.g. base_train (the module recipes/<name>.py)."""
    data_format: DataFormat
    """text: documents, loss on every token; chat: conversations, loss on assistant tokens; image-chat: chats
    with images (the VLM)."""
    model_kind: ModelKind = "gpt"
    """The model the recipe trains."""
    starts_from: str | None = None
    """Recipe whose run (its latest checkpoint) gives the initial weights by default; None: from scratch."""
    init_from_allowed: bool = False
    """Whether `init_from=PATH` may name the weights to start from."""
    scratch_allowed: bool = False
    """init_from=none trains from random weights (with a warning) instead of taking starts_from's run."""
    freeze: str = ""
    """Parts frozen unless TrainConfig.freeze says otherwise (train/freeze.py's syntax; "" = none)."""
    image_builtin: str | None = None
    """image-chat: the built-in image task trained on when no data is given (shapes-caption | shapes-qa)."""
    vlm_variant: RecipeSpec | None = None
    """What the recipe becomes when the checkpoint it starts from (init_from, or a resumed one) holds a VLM:
    chat_sft trains image chats on the VLM. None: the recipe trains its own model_kind whatever it starts
    from (a VLM recipe starting from a GPT run takes that run as its language model)."""

    def __post_init__(self):
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"RecipeSpec {self.name}: data_format {self.data_format!r} not in {DATA_FORMATS}")
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"RecipeSpec {self.name}: model_kind {self.model_kind!r} not in {MODEL_KINDS}")
        if self.starts_from is not None and not self.init_from_allowed:
            raise ValueError(f"RecipeSpec {self.name}: starts_from needs init_from_allowed=True")
        if (self.data_format == "image-chat") != (self.model_kind == "vlm"):
            raise ValueError(f"RecipeSpec {self.name}: image-chat data goes with model_kind vlm, and only it")
        if self.vlm_variant is not None and (self.vlm_variant.model_kind != "vlm"
                                             or self.vlm_variant.name != self.name):
            raise ValueError(f"RecipeSpec {self.name}: vlm_variant must be a vlm spec of the same name")

    def for_start(self, start_kind: ModelKind | None) -> RecipeSpec:
        """The spec a run follows when its start checkpoint holds a `start_kind` model (None: no checkpoint)."""
        if start_kind == "vlm" and self.vlm_variant is not None:
            return self.vlm_variant
        if start_kind == "vlm" and self.model_kind != "vlm":
            raise ConfigError(f"recipe {self.name} trains a {self.model_kind} model and cannot start from a VLM "
                              "checkpoint: start it from a text run, or use a recipe that trains VLMs")
        return self

    @property
    def is_chat(self) -> bool:
        """Prompts and data go through the chat template."""
        return self.data_format != "text"


def spec_for(recipe: str) -> RecipeSpec:
    """The RecipeSpec that recipe module `recipe` declares; ConfigError for a name not in the registry."""
    from ghostvis_core.train.launch import lookup_recipe
    from recipes import RECIPES

    module = importlib.import_module(lookup_recipe(recipe, RECIPES))
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, RecipeSpec) or spec.name != recipe:
        raise ConfigError(f"recipe module {module.__name__} must declare SPEC = RecipeSpec(name={recipe!r}, ...)")
    return spec


def legacy_data_format(recipe: str | None) -> DataFormat:
    """data_format of a checkpoint written before state.json recorded it: its recipe's spec; "text" when the
    recipe is unknown or no longer registered (what inference assumed for those runs)."""
    from recipes import RECIPES

    return spec_for(recipe).data_format if recipe in RECIPES else "text"
