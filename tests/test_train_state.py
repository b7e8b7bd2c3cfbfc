"""TrainState (state.json) round trip and validation, legacy state.json files, GPT.from_checkpoint's strict
loading, and one-piece atomic writers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from plans import cpu_plan
from test_checkpoint import _hashes, _save, _tied_model_and_optimizer

from ghostvis_core import atomic
from ghostvis_core import checkpoint as ckpt
from ghostvis_core.checkpoint import TrainState
from ghostvis_core.errors import CheckpointError
from ghostvis_core.gpt import GPT


def _legacy_state(model, recipe: str) -> dict:
    """What the trainer wrote into state.json before TrainState (no data_format, no model_kind)."""
    return {"tokens_seen": 70, "lr_multiplier": 0.5, "world_size": 1,
            "loader": [{"epoch": 0, "position": 8, "seed": 0}], "rng": [ckpt.capture_rng_state(torch.device("cpu"))],
            "model_config": model.config.to_dict(), "recipe": recipe, "preset": "tiny", "time": 1.0}


def _rewrite_state(step_dir: Path, **changes) -> None:
    """Edit state.json in place (the manifest covers the other files, so the checkpoint still verifies)."""
    data = json.loads((step_dir / "state.json").read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    (step_dir / "state.json").write_text(json.dumps(data))


def test_train_state_round_trips_through_a_checkpoint(tmp_path):
    model, opt = _tied_model_and_optimizer()
    state = TrainState(step=7, tokens_seen=70, lr_multiplier=0.25, world_size=2,
                       loader=[{"epoch": 0, "position": 4, "seed": 0}, {"epoch": 0, "position": 4, "seed": 0}],
                       rng=[{"torch": "a"}, {"torch": "b"}], model_kind="gpt", model_config=model.config.to_dict(),
                       recipe="chat_sft", preset="tiny", data_format="chat", time=123.5)
    path = ckpt.save_checkpoint(tmp_path, 7, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                                state=state.to_dict(), keep_last=0)
    assert TrainState.read(path) == state
    assert TrainState.from_dict(json.loads(json.dumps(state.to_dict())), path / "state.json") == state


@pytest.mark.parametrize("field, value, message", [
    ("step", "two", "field 'step' must be an integer >= 0, got 'two'"),
    ("step", True, "field 'step' must be an integer >= 0, got True"),
    ("tokens_seen", -5, "field 'tokens_seen' must be an integer >= 0, got -5"),
    ("world_size", 0, "field 'world_size' must be an integer >= 1, got 0"),
    ("loader", {"epoch": 0}, "field 'loader' must be a list of objects, one per rank, got {'epoch': 0}"),
    ("rng", ["x"], "field 'rng' must be a list of objects, one per rank, got ['x']"),
    ("model_kind", "llama", "field 'model_kind' must be one of gpt, vlm, got 'llama'"),
    ("data_format", "chats", "field 'data_format' must be one of text, chat, image-chat, got 'chats'"),
    ("model_config", [1], "field 'model_config' must be an object or null, got [1]"),
    ("recipe", 3, "field 'recipe' must be a string or null, got 3"),
    ("lr_multiplier", "1", "field 'lr_multiplier' must be a number or null, got '1'"),
    ("time", "noon", "field 'time' must be a number or null, got 'noon'"),
    ("step", ..., "field 'step' is missing"),
    ("manifest", ..., "field 'manifest' is missing"),
])
def test_a_bad_field_names_the_file_and_the_field(tmp_path, field, value, message):
    model, opt = _tied_model_and_optimizer()
    path = _save(tmp_path, 3, model, opt)
    _rewrite_state(path, **{field: value})
    before = _hashes(tmp_path)
    with pytest.raises(CheckpointError) as err:
        TrainState.read(path)
    assert str(err.value).startswith(f"{path / 'state.json'}: {message}"), str(err.value)
    assert "\n" not in str(err.value) and _hashes(tmp_path) == before


def test_a_state_json_that_is_not_an_object_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'state.json'}: expected a JSON object, got list")):
        TrainState.from_dict([1, 2], tmp_path / "state.json")


@pytest.mark.parametrize("recipe, data_format", [("base_train", "text"), ("chat_sft", "chat"),
                                                  ("retired_recipe", "text")])
def test_a_legacy_state_json_reads_with_documented_defaults(tmp_path, recipe, data_format):
    model, opt = _tied_model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 7, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                                state=_legacy_state(model, recipe), keep_last=0)
    state = TrainState.read(path)
    assert (state.step, state.tokens_seen, state.world_size, state.recipe) == (7, 70, 1, recipe)
    assert state.data_format == data_format and state.model_kind == "gpt"
    assert state.loader == [{"epoch": 0, "position": 8, "seed": 0}]


def test_an_older_state_json_takes_model_and_recipe_from_the_run_config(tmp_path):
    model, opt = _tied_model_and_optimizer()
    run = tmp_path / "run"
    path = ckpt.save_checkpoint(run, 2, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                                state={"tokens_seen": 20}, keep_last=0)
    atomic.write_json_atomic(run / "config.json", {"train": {"recipe": "chat_sft"}, "model": model.config.to_dict()})
    state = TrainState.read(path)
    assert state.model_config == model.config.to_dict() and state.recipe == "chat_sft"
    assert state.data_format == "chat" and state.world_size == 1 and state.loader == []
    (run / "config.json").unlink()
    bare = TrainState.read(path)
    assert bare.model_config is None and bare.recipe is None and bare.data_format == "text"
    with pytest.raises(CheckpointError, match="field 'model_config' is missing"):
        GPT.from_checkpoint(path, cpu_plan(model.config))


def test_from_checkpoint_loads_the_exact_weights(tmp_path):
    model, opt = _tied_model_and_optimizer()
    path = _save(tmp_path, 5, model, opt)
    loaded = GPT.from_checkpoint(path, cpu_plan(model.config))
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _save_weights(tmp_path: Path, model, tensors: dict) -> Path:
    return ckpt.save_checkpoint(tmp_path, 1, model_state=tensors, optimizer_state={},
                                state={"model_config": model.config.to_dict()}, keep_last=0)


@pytest.mark.parametrize("damage, message", [
    ("shape", "tensor 'model.layers.1.mlp.up_proj.weight' has shape (10, 64), the model's is "),
    ("missing", "has no tensor 'model.norm.weight', which the model needs"),
    ("extra", "has tensor 'model.extra.weight', which the model does not have"),
])
def test_from_checkpoint_names_the_folder_and_the_key_of_a_bad_tensor(tmp_path, damage, message):
    model, _ = _tied_model_and_optimizer()
    tensors = dict(model.state_dict())
    if damage == "shape":
        tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(10, 64)
    elif damage == "missing":
        del tensors["model.norm.weight"]
    else:
        tensors["model.extra.weight"] = torch.zeros(3)
    path = _save_weights(tmp_path, model, tensors)
    with pytest.raises(CheckpointError) as err:
        GPT.from_checkpoint(path, cpu_plan(model.config))
    text = str(err.value)
    assert text.startswith(f"checkpoint {path}: model.safetensors {message}") and "\n" not in text, text


def test_from_checkpoint_refuses_another_model_kind(tmp_path):
    model, opt = _tied_model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 1, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                                state={"model_config": model.config.to_dict(), "model_kind": "vlm"}, keep_last=0)
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} holds a vlm model, not a gpt"):
        GPT.from_checkpoint(path, cpu_plan(model.config))


# ------------------------------------------------------------------------------------------------ atomic


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_writers_replace_whole_files(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic.write_json_atomic(target, {"x": 1})
    assert target.read_text() == '{\n  "x": 1\n}\n'
    atomic.write_text_atomic(target, "é")
    atomic.write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert target.read_bytes() == "é".encode() and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _listing(tmp_path / "sub") == ["a.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic.write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("disk on fire")
    with pytest.raises(TypeError):
        atomic.write_json_atomic(target, {"x": object()})
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text_atomic(target, "new")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert target.read_text() == "old" and _listing(tmp_path) == ["a.txt"]


def test_directories_are_published_whole(tmp_path):
    final = tmp_path / "tok"
    with atomic.atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert _listing(final) == ["a"]
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("stop")
    assert _listing(final) == ["a"] and _listing(tmp_path) == ["tok"]
    with atomic.atomic_dir(final, keep_existing=True) as tmp:  # a cache someone else filled first: kept
        (tmp / "c").write_text("3")
    assert _listing(final) == ["a"] and _listing(tmp_path) == ["tok"]
    with atomic.atomic_dir(final) as tmp:  # replaced as a whole
        (tmp / "d").write_text("4")
    assert _listing(final) == ["d"] and _listing(tmp_path) == ["tok"]


def test_training_records_the_recipe_spec_in_state_json(tmp_path, monkeypatch):
    from test_train_config import tiny_config

    from ghostvis_core.engine import load_for_inference
    from ghostvis_core.train.loop import train

    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    result = train(tiny_config(tmp_path, num_steps=2, save_every=2))
    state = TrainState.read(result.checkpoint)
    assert (state.step, state.recipe, state.data_format, state.model_kind) == (2, "base_train", "text", "gpt")
    assert state.world_size == 1 and len(state.loader) == len(state.rng) == 1
    loaded = load_for_inference(str(result.checkpoint))
    assert loaded.data_format == "text" and not loaded.is_chat
