"""`ghostvis tokenizer train`: trains on text and chat jsonl, round-trips, saves, refuses to clobber."""

import json
import os

import pytest
from helpers import run_cli, run_cli_process

from ghostvis_core.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def text_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    with path.open("w") as f:
        for i in range(300):
            text = " ".join(words[(i + j) % len(words)] for j in range(12)) + f" number {i}."
            f.write(json.dumps({"text": text}) + "\n")
    return path


def test_trains_round_trips_and_saves_to_default_place(text_jsonl, tmp_path, capsys):
    code, out, err = run_cli(["tokenizer", "train", "--data", str(text_jsonl), "--vocab-size", "290"], capsys)
    assert code == 0, err
    saved = tmp_path / "home" / "datasets" / "tokenizers" / "docs-vocab290"
    assert "Read 300 documents" in out
    assert "Vocab size: 290" in out
    assert "identical round trip" in out
    assert f"Saved: {saved}" in out
    tok = Tokenizer.load(saved)
    assert tok.vocab_size == 290
    assert tok.bos_id == 0  # special tokens come first
    unseen = "gamma kappa Ünïcode 12345 ✓"
    assert tok.decode(tok.encode(unseen)) == unseen
    # Merges were learned: a frequent word is fewer tokens than bytes.
    assert len(tok.encode("epsilon")) < len("epsilon")


def test_chat_jsonl_is_detected_and_trains_on_message_texts(tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    with path.open("w") as f:
        for i in range(50):
            msgs = [{"role": "user", "content": f"What is {i} plus one?"},
                    {"role": "assistant", "content": f"It is {i + 1}."}]  # fmt: skip
            f.write(json.dumps({"messages": msgs}) + "\n")
    out_dir = tmp_path / "tok"
    code, out, err = run_cli(
        ["tokenizer", "train", "--data", str(path), "--vocab-size", "300", "--out", str(out_dir)], capsys
    )
    assert code == 0, err
    assert "Read 50 chats (100 messages" in out
    tok = Tokenizer.load(out_dir)
    # Role markers are single special tokens, never learned from text.
    vocab = tok.hf_tokenizer.get_vocab()
    assert not any("user_start" in t for t in vocab if t not in SPECIAL_TOKENS)
    ids, mask = tok.encode_chat(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "It is 3."}]
    )
    assert sum(mask) == len(tok.encode("It is 3.")) + 1


def test_existing_output_needs_force(text_jsonl, tmp_path, capsys):
    out_dir = tmp_path / "tok"
    args = ["tokenizer", "train", "--data", str(text_jsonl), "--vocab-size", "300", "--out", str(out_dir)]
    assert run_cli(args, capsys)[0] == 0
    (out_dir / "NOTES.md").write_text("mine")
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert "already holds a tokenizer; pass --force" in err
    code, _, err = run_cli(args + ["--force"], capsys)
    assert code == 0, err
    assert (out_dir / "NOTES.md").read_text() == "mine"  # other files survive a --force


def test_missing_data_and_bad_vocab_are_one_line_errors(text_jsonl, tmp_path, capsys):
    code, _, err = run_cli(["tokenizer", "train", "--data", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "no such file" in err and "Traceback" not in err
    code, _, err = run_cli(["tokenizer", "train", "--data", str(text_jsonl), "--vocab-size", "100"], capsys)
    assert code == 2 and "vocab_size=100 is too small" in err and "Traceback" not in err


def test_malformed_record_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 3}\n')
    code, _, err = run_cli(["tokenizer", "train", "--data", str(path), "--vocab-size", "300"], capsys)
    assert code == 2
    assert f"{path}:2" in err


@pytest.mark.parametrize("name", ["a/../../x", "..", "sub/dir"])
def test_name_must_be_a_plain_folder_name(tmp_path, name):
    data = tmp_path / "t.txt"
    data.write_text("hello world\n\nanother paragraph here\n")
    proc = run_cli_process(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--name", name],
                           env={**os.environ, "GHOSTVIS_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2 and "a plain folder name" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "home" / "datasets").exists()
