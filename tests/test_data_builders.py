"""Embedded synthetic data, the default tokenizer cache, and the build_*_dataset entry points."""

import json
import logging
import re

import numpy as np
import pytest

from ghostvis_core.data import (
    IGNORE_INDEX,
    PackedBatchLoader,
    build_chat_dataset,
    build_text_dataset,
    default_tokenizer,
    default_tokenizer_dir,
    embedded_chats,
    embedded_corpus,
)
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = embedded_corpus(500, seed=0) + [m["content"] for c in embedded_chats(300, seed=0) for m in c]
    return Tokenizer.train(texts, 600)


def test_embedded_data_is_deterministic():
    assert embedded_corpus(50, seed=0) == embedded_corpus(50, seed=0)
    assert embedded_corpus(50, seed=0) != embedded_corpus(50, seed=1)
    assert embedded_chats(50, seed=2) == embedded_chats(50, seed=2)
    docs = embedded_corpus(2000)
    assert len(docs) == 2000 and all(isinstance(d, str) and d for d in docs)
    assert len(set(docs)) > 1500


def test_embedded_chat_answers_follow_from_the_question():
    chats = embedded_chats(500, seed=0)
    for chat in chats:
        roles = [m["role"] for m in chat]
        assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
        for q, a in zip(chat, chat[1:], strict=False):
            m = re.fullmatch(r"The (\w+) is (\w+)\. What color is the \1\?", q["content"])
            if q["role"] == "user" and m:
                assert a["content"] == f"The {m[1]} is {m[2]}."
            m = re.fullmatch(r"What is (\d+) plus (\d+)\?", q["content"])
            if q["role"] == "user" and m:
                assert a["content"] == f"{m[1]} plus {m[2]} is {int(m[1]) + int(m[2])}."


def test_default_tokenizer_is_cached_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    first = default_tokenizer(vocab_size=700)
    folder = default_tokenizer_dir(700)
    assert folder.is_relative_to(tmp_path / "home")
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folders left behind
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    second = default_tokenizer(vocab_size=700)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime  # loaded, not retrained
    text = embedded_corpus(5, seed=4)[0]
    assert first.encode(text) == second.encode(text)
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "other"))
    retrained = default_tokenizer(vocab_size=700)
    assert retrained.hf_tokenizer.to_str() == first.hf_tokenizer.to_str()


def test_build_text_dataset_embedded(tok, caplog):
    with caplog.at_level(logging.INFO, logger="ghostvis"):
        packed = build_text_dataset(None, tok, 64, max_docs=300)
    assert packed.num_docs == 300 and packed.input_ids.shape == (packed.num_rows, 64)
    assert packed.fill > 0.9
    assert packed.stats_line() in caplog.text
    assert re.search(r"Sequence packing: 300 -> \d+ sequences \(fill \d+\.\d%\)", caplog.text)
    # every document starts with BOS at position 0; other starts are the padding tails
    starts = packed.input_ids[packed.position_ids == 0]
    assert np.all((starts == tok.bos_id) | (starts == tok.pad_id))
    assert np.all(packed.position_ids[packed.input_ids == tok.bos_id] == 0)


def test_build_text_dataset_from_file(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a red ball", "two cats", "3 plus 4 is 7."]))
    packed = build_text_dataset(str(f), tok, 32)
    assert packed.num_docs == 3 and packed.num_rows == 1
    learned = packed.targets[packed.targets != IGNORE_INDEX].tolist()
    assert sorted(learned) == sorted(sum((tok.encode(t) for t in ["a red ball", "two cats", "3 plus 4 is 7."]),
                                         []))
    assert build_text_dataset(str(f), tok, 32, max_docs=2).num_docs == 2
    with pytest.raises(ConfigError, match="max_docs"):
        build_text_dataset(str(f), tok, 32, max_docs=0)
    with pytest.raises(DataError, match="no such file"):
        build_text_dataset(str(tmp_path / "nope.jsonl"), tok, 32)


def test_build_chat_dataset_learns_assistant_tokens_only(tok):
    chats = embedded_chats(200, seed=0)
    packed = build_chat_dataset(None, tok, 128, max_docs=200)
    expected = []
    for chat in chats:
        ids, mask = tok.encode_chat(chat)
        expected += [i for i, m in zip(ids, mask, strict=True) if m]
    learned = packed.targets[packed.targets != IGNORE_INDEX].tolist()
    assert sorted(learned) == sorted(expected)
    assert packed.num_target_tokens == len(expected)
    scaffolding = {tok.bos_id, tok.pad_id, tok.image_id} | {
        tok.token_id(t) for t in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                  "<|system_start|>", "<|system_end|>")}
    assert not set(learned) & scaffolding
    batch = next(PackedBatchLoader(packed, batch_size=2))
    assert batch["input_ids"].shape == (2, 128)


def test_build_chat_dataset_from_file_with_bad_record(tok, tmp_path, caplog):
    f = tmp_path / "c.jsonl"
    good = {"messages": [{"role": "user", "content": "What is 1 plus 1?"},
                         {"role": "assistant", "content": "1 plus 1 is 2."}]}
    f.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:2: message 0: unknown role 'narrator'"):
        build_chat_dataset(str(f), tok, 64)
    with caplog.at_level(logging.WARNING, logger="ghostvis"):
        packed = build_chat_dataset(str(f), tok, 64, skip_bad_records=True)
    assert packed.num_docs == 1 and "skipped 1 malformed records" in caplog.text


def test_a_damaged_tokenizer_cache_folder_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path))
    stale = default_tokenizer_dir(300)
    stale.mkdir(parents=True)
    (stale / "leftover").write_text("from an interrupted run")
    with pytest.raises(DataError, match="delete it and run again"):
        default_tokenizer(300)
    assert (stale / "leftover").read_text() == "from an interrupted run"
