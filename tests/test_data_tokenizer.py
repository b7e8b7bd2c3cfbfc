"""A pretraining run on --data without tokenizer=: a tokenizer trained on that data (not the embedded corpus's), cached by the data's
content and reused while it is unchanged; .txt split into documents at blank lines, the count logged."""

from __future__ import annotations

import json
import re
import shutil

from helpers import library_log
from test_train_config import tiny_config

from ghostvis_core.data import default_tokenizer
from ghostvis_core.paths import datasets_dir
from ghostvis_core.tokenizer import Tokenizer
from ghostvis_core.tokenizer_training import data_fingerprint
from ghostvis_core.train.loop import train

WORDS = ["quasarlantern", "meadowcopper", "harborviolet", "thunderzebra"]


def _corpus(path, n=120):
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + j) % 4] for j in range(12))}) + "\n"
                            for i in range(n)))
    return path


def _cache_dirs():
    return sorted(p.name for p in (datasets_dir() / "tokenizers").glob("data-*"))


def test_data_without_tokenizer_trains_one_on_that_data_and_reuses_it(tmp_path, caplog):
    data = _corpus(tmp_path / "corpus.jsonl")
    with library_log(caplog):
        train(tiny_config(tmp_path, run="a", num_steps=1, data=str(data)))
    assert f"Tokenizer: trained on --data {data} (120 documents" in caplog.text
    (cache,) = _cache_dirs()
    run_tok = Tokenizer.load(tmp_path / "runs" / "a" / "tokenizer")
    # the corpus's words are single tokens for its own tokenizer; the embedded corpus's splits them up
    assert [len(run_tok.encode(w)) for w in WORDS] == [1, 1, 1, 1]
    assert min(len(default_tokenizer(4096).encode(w)) for w in WORDS) >= 4
    cached = datasets_dir() / "tokenizers" / cache / "tokenizer.json"
    before = cached.stat().st_mtime_ns

    # the same content elsewhere: reused, not retrained
    moved = shutil.copy(data, tmp_path / "moved.jsonl")
    caplog.clear()
    with library_log(caplog):
        train(tiny_config(tmp_path, run="b", num_steps=1, data=str(moved)))
    assert "Tokenizer: reusing the one trained on this data (content hash" in caplog.text
    assert "trained on --data" not in caplog.text
    assert cached.stat().st_mtime_ns == before
    assert ((tmp_path / "runs" / "b" / "tokenizer" / "tokenizer.json").read_bytes() == cached.read_bytes())

    # changed content: a tokenizer of its own
    _corpus(moved, n=121)
    train(tiny_config(tmp_path, run="c", num_steps=1, data=str(moved)))
    assert len(_cache_dirs()) == 2


def test_the_fingerprint_covers_content_settings_and_folder_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    _corpus(folder / "a.jsonl")
    key = data_fingerprint(folder, 4096, "auto", "text")
    assert key == data_fingerprint(folder, 4096, "auto", "text") and len(key) == 16
    assert key != data_fingerprint(folder, 2048, "auto", "text")
    assert key != data_fingerprint(folder, 4096, "auto", "body")
    (folder / "notes.csv").write_text("not read by the run\n")  # not a data file: the key stays
    assert key == data_fingerprint(folder, 4096, "auto", "text")
    _corpus(folder / "b.jsonl", n=3)
    assert key != data_fingerprint(folder, 4096, "auto", "text")


def test_txt_is_split_into_documents_at_blank_lines_and_the_count_is_logged(tmp_path, caplog):
    text = "\n\n".join(" ".join(WORDS[(i + j) % 4] for j in range(10)) for i in range(4))
    data = tmp_path / "book.txt"
    data.write_text(text.replace("\n\n", "\n  \n", 1))  # a whitespace-only line separates too
    with library_log(caplog):
        train(tiny_config(tmp_path, num_steps=1, data=str(data)))
    assert f"trained on --data {data} (4 documents" in caplog.text
    assert re.search(rf"Data: 4 documents, \d+ tokens from {re.escape(str(data))} \(\.txt: one document per "
                     r"paragraph, split at blank lines\)", caplog.text)
