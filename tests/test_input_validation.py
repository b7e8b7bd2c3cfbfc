"""Values that would fail deep inside training or sampling are refused up front with one clear message."""

from __future__ import annotations

import math

import pytest

from ghostvis_core.config import OptimizerConfig
from ghostvis_core.data import iter_chats, iter_documents
from ghostvis_core.engine import LoadedModel, generate_text
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.train.config import TrainConfig


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_optimizer_numbers_must_be_finite_and_non_negative(value):
    with pytest.raises(ConfigError, match="finite number >= 0"):
        OptimizerConfig(lr=value)
    with pytest.raises(ConfigError, match="matrix_lr"):
        OptimizerConfig(matrix_lr=value)


def test_nan_grad_clip_is_refused_not_silently_disabled():
    with pytest.raises(ConfigError, match="grad_clip"):
        TrainConfig(grad_clip=math.nan)


def test_lone_surrogate_escapes_are_malformed_records(tmp_path):
    text = tmp_path / "s.jsonl"
    text.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: .*unpaired surrogate"):
        list(iter_documents(text))
    assert list(iter_documents(text, skip_bad_records=True)) == ["fine"]
    chat = tmp_path / "c.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: .*unpaired surrogate"):
        list(iter_chats(chat))


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "--top-k must be >= 1"),
    (dict(top_k=-3), "--top-k must be >= 1"),
    (dict(temperature=math.nan), "--temperature must be a finite number"),
    (dict(temperature=-1.0), "--temperature must be a finite number"),
    (dict(max_new_tokens=0), "--max-tokens must be >= 1"),  # the flag is --max-tokens now
])
def test_sampling_options_are_checked_before_generating(kwargs, match):
    loaded = LoadedModel(model=None, tokenizer=None, checkpoint=None, recipe="chat_sft",
                         data_format="chat")  # never reached
    with pytest.raises(ConfigError, match=match):
        generate_text(loaded, "hi", **kwargs)


def test_chat_data_in_another_format_names_the_format(tmp_path):
    parquet = tmp_path / "chats.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"chats\.parquet: a parquet file, but chat data is jsonl"):
        list(iter_chats(parquet))
