"""Data sources: txt/jsonl/parquet/chat jsonl readers and their FILE:LINE errors."""

import json
import logging

import pytest

from ghostvis_core.data.sources import SkipReport, iter_chats, iter_documents
from ghostvis_core.errors import DataError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path, records):
    return _write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_txt_paragraphs_are_documents(tmp_path):
    f = _write(tmp_path / "a.txt", "first line\nsecond line\n\n\n  \nthird\r\n\nfourth\n")
    assert list(iter_documents(f)) == ["first line\nsecond line", "third", "fourth"]
    assert list(iter_documents(_write(tmp_path / "one.md", "only one"))) == ["only one"]


def test_jsonl_and_text_column(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", [{"text": "hello"}, "", {"text": "world", "id": 3}])
    assert list(iter_documents(f)) == ["hello", "world"]
    g = _jsonl(tmp_path / "b.jsonl", [{"body": "x"}])
    assert list(iter_documents(g, text_column="body")) == ["x"]


@pytest.mark.parametrize("record, what", [
    ('{"text": "ok"', "invalid JSON"),
    ('["text"]', "expected a JSON object, got list"),
    ('{"content": "x"}', "missing 'text' field (keys: content)"),
    ('{"text": 5}', "'text' must be a string, got int"),
    ('{"text": "  "}', "'text' is empty"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, record, what):
    f = _jsonl(tmp_path / "bad.jsonl", [{"text": "good"}, "", record])
    with pytest.raises(DataError) as e:
        list(iter_documents(f))
    assert f"{f}:3: {what}" in str(e.value)


def test_skip_bad_records_counts_and_logs(tmp_path, caplog):
    f = _jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, "{oops", {"text": "b"}, {"x": 1}, {"text": 2}])
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="ghostvis"):
        docs = list(iter_documents(f, skip_bad_records=True, report=report))
    assert docs == ["a", "b"]
    assert report.num_skipped == 3 and report.first_error.startswith(f"{f}:2: invalid JSON")
    assert f"skipped 3 malformed records in {f} (first: {f}:2: invalid JSON" in caplog.text


def test_all_records_bad_with_skip_is_an_error(tmp_path):
    f = _jsonl(tmp_path / "bad.jsonl", ["nope", "{}"])
    with pytest.raises(DataError, match="no valid records .all 2 malformed"):
        list(iter_documents(f, skip_bad_records=True))


def test_missing_empty_unknown_and_invalid_utf8(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="empty file"):
        list(iter_documents(_write(tmp_path / "empty.jsonl", "")))
    with pytest.raises(DataError, match="empty file"):
        list(iter_documents(_write(tmp_path / "blank.txt", "\n \n")))
    with pytest.raises(DataError, match="cannot tell the format"):
        list(iter_documents(_write(tmp_path / "data.csv", "a,b")))
    assert list(iter_documents(tmp_path / "data.csv", kind="txt")) == ["a,b"]
    (tmp_path / "latin.txt").write_bytes(b"ok\nline two \xff\n")
    with pytest.raises(DataError, match=r"latin.txt:2: not valid UTF-8"):
        list(iter_documents(tmp_path / "latin.txt"))
    with pytest.raises(DataError, match="unknown data kind"):
        list(iter_documents(tmp_path / "latin.txt", kind="csv"))


def test_folder_reads_matching_files_sorted(tmp_path):
    _write(tmp_path / "b.txt", "second")
    _jsonl(tmp_path / "a.jsonl", [{"text": "first"}])
    _write(tmp_path / "notes.csv", "ignored")
    assert list(iter_documents(tmp_path)) == ["first", "second"]
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="holds no"):
        list(iter_documents(tmp_path / "sub"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["one", None, "three"], "n": [1, 2, 3]}), f)
    with pytest.raises(DataError, match=r"no column 'text'; available columns: body, n"):
        list(iter_documents(f))
    with pytest.raises(DataError, match=r"d.parquet:row 2: 'body' is null"):
        list(iter_documents(f, text_column="body"))
    report = SkipReport()
    assert list(iter_documents(f, text_column="body", skip_bad_records=True, report=report)) == ["one", "three"]
    assert report.num_skipped == 1
    with pytest.raises(DataError, match="has type int64, expected string"):
        list(iter_documents(f, text_column="n"))
    g = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), g)
    with pytest.raises(DataError, match="empty file"):
        list(iter_documents(g))
    h = _write(tmp_path / "fake.parquet", "not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        list(iter_documents(h))


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_chats_read(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [GOOD_CHAT, {"messages": [{"role": "system", "content": "s"}] +
                                                  GOOD_CHAT["messages"], "id": 7}])
    chats = list(iter_chats(f))
    assert chats[0] == GOOD_CHAT["messages"] and chats[1][0] == {"role": "system", "content": "s"}


@pytest.mark.parametrize("record, what", [
    ({"msgs": []}, "missing 'messages' field"),
    ({"messages": "hi"}, "'messages' must be a list"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "message 0: content must be a string, got list"),
    ({"messages": [{"role": "user"}]}, "message 0 needs 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
])
def test_malformed_chats(tmp_path, record, what):
    f = _jsonl(tmp_path / "c.jsonl", [GOOD_CHAT, record])
    with pytest.raises(DataError) as e:
        list(iter_chats(f))
    assert f"{f}:2: {what}" in str(e.value)
    report = SkipReport()
    assert list(iter_chats(f, skip_bad_records=True, report=report)) == [GOOD_CHAT["messages"]]
    assert report.num_skipped == 1
