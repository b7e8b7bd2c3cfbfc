"""ghostvis_core.tokenizer_training: chat detection, output folder rules, BPE input, the round-trip guard."""

import json

import pytest

from ghostvis_core import tokenizer_training as tt
from ghostvis_core.errors import ConfigError, DataError


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_looks_like_chat(tmp_path):
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    docs = _jsonl(tmp_path / "docs.jsonl", [{"text": "hello", "messages": []}])
    assert tt.looks_like_chat(chat, "text") is True
    assert tt.looks_like_chat(docs, "text") is False  # has the text field: documents
    assert tt.looks_like_chat(tmp_path / "chat.jsonl", "body") is True
    (tmp_path / "notes.txt").write_text("plain text")
    assert tt.looks_like_chat(tmp_path / "notes.txt", "text") is False


def test_output_dir_default_and_refusals(tmp_path):
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": "hello"}])
    root = tmp_path / "tokenizers"
    assert tt.output_dir(data, 300, None, None, "auto", False, root) == root / "docs-vocab300"
    assert tt.output_dir(data, 300, None, "mine", "auto", False, root) == root / "mine"
    with pytest.raises(ConfigError, match="--kind csv: expected one of auto, txt, jsonl, parquet, chat"):
        tt.output_dir(data, 300, None, None, "csv", False, root)
    with pytest.raises(ConfigError, match="--name and --out both given"):
        tt.output_dir(data, 300, tmp_path / "o", "mine", "auto", False, root)
    with pytest.raises(DataError, match="no such file or folder"):
        tt.output_dir(tmp_path / "nope.jsonl", 300, None, None, "auto", False, root)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a tokenizer; pass --force"):
        tt.output_dir(data, 300, tmp_path / "full", None, "auto", False, root)
    assert tt.output_dir(data, 300, tmp_path / "full", None, "auto", True, root) == tmp_path / "full"


def test_chats_train_on_message_texts_and_count(tmp_path):
    chats = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(40)
    ]
    data = _jsonl(tmp_path / "chat.jsonl", chats)
    trained = tt.train_from_data(data, 300, "auto", "text", False)
    assert trained.chat is True
    stats = trained.stats
    assert (stats.chats, stats.docs, stats.sample) == (40, 80, "question 0")
    assert stats.chars == sum(len(m["content"]) for c in chats for m in c["messages"])


def test_round_trip_guard():
    tt.check_round_trip("same", "same")
    with pytest.raises(DataError, match="round trip changed the sample text: 'other'; not saved"):
        tt.check_round_trip("same", "other")
