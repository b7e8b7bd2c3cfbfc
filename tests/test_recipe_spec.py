"""Recipes declare what they do (RecipeSpec); the library asks the spec and never compares recipe names."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from ghostvis_core.errors import ConfigError
from ghostvis_core.train.recipe_spec import RecipeSpec, legacy_data_format, spec_for
from recipes import RECIPES

LIBRARY = Path(__file__).resolve().parents[1] / "ghostvis_core"


def test_each_recipe_module_declares_its_spec():
    assert spec_for("base_train") == RecipeSpec(name="base_train", data_format="text", model_kind="gpt")
    image_sft = RecipeSpec(name="chat_sft", data_format="image-chat", model_kind="vlm", starts_from="base_train",
                           init_from_allowed=True, freeze="vision", image_builtin="shapes-qa")
    assert spec_for("chat_sft") == RecipeSpec(name="chat_sft", data_format="chat", model_kind="gpt",
                                              starts_from="base_train", init_from_allowed=True,
                                              vlm_variant=image_sft)
    # the data format follows the start checkpoint's model kind: chat_sft from a VLM trains image chats
    assert spec_for("chat_sft").for_start("vlm") == image_sft
    assert spec_for("chat_sft").for_start("gpt") is spec_for("chat_sft")
    assert spec_for("vision_pretrain").for_start("gpt").model_kind == "vlm"
    with pytest.raises(ConfigError, match="cannot start from a VLM"):
        spec_for("base_train").for_start("vlm")
    for name, (module, _) in RECIPES.items():
        assert importlib.import_module(module).SPEC is spec_for(name)
    assert spec_for("chat_sft").is_chat and not spec_for("base_train").is_chat


def test_spec_lookup_and_legacy_format():
    with pytest.raises(ConfigError, match="unknown recipe 'chat_stf'.*chat_sft"):
        spec_for("chat_stf")
    assert legacy_data_format("chat_sft") == "chat"
    assert legacy_data_format(None) == legacy_data_format("retired") == "text"


def test_a_spec_is_validated():
    with pytest.raises(ValueError, match="data_format 'chats'"):
        RecipeSpec(name="x", data_format="chats")
    with pytest.raises(ValueError, match="starts_from needs init_from_allowed"):
        RecipeSpec(name="x", data_format="chat", starts_from="base_train")


def _names_in(node: ast.AST) -> set[str]:
    """Registered recipe names written as string literals in `node` (or a tuple/list/set of them)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in RECIPES}


def test_the_library_never_compares_recipe_names():
    found = []
    for path in sorted(LIBRARY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = set().union(*(_names_in(n) for n in [node.left, *node.comparators]))
            elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List, ast.Set)):
                names = _names_in(node.value)  # a table of recipe names (SFT_RECIPES)
            else:
                continue
            if names:
                found.append(f"{path.relative_to(LIBRARY)}:{node.lineno} {sorted(names)}")
    assert found == []
